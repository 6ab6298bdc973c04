"""Sharing a run on the Hugging Face Hub, one module per job:

- `token`: the token (`hub_token`, else huggingface_hub's: HF_TOKEN, then the login cached by `hf auth login`) and the
  checked target of a push, found before any work so that a push never fails at the end;
- `upload`: the allow-list of an output folder's files that are pushed (weights as safetensors, configs, processor,
  recipe, logs, results, report, plot, card; never checkpoints, optimizer states, pickles or predictions);
- `license`: the base model's license, for the card;
- `card`: the model card written from a saved run (`run_folder.SavedRun`);
- `push`: one `create_repo` and one `create_commit` of the allow-listed files.

The token is handed to `HfApi` only: never printed, logged, or written to a file or the card. A training run keeps it in
its `HubTarget` alone: it is cleared from the training arguments, which the Trainer pickles into every checkpoint.
"""
