"""Sharing a run on the Hugging Face Hub: the model card, and one push of a finished output folder.

What is pushed is an allow-list of the output folder's top-level files: the adapter (or full model) weights as
safetensors, its config, the processor, the recipe as run, the training log, the evaluation results, the data report,
the training plot and the model card; and from `sft_adapter/` (DPO with `reference: sft_merged`: the SFT adapter the
DPO adapter applies on top of) its weights and config. Checkpoints, optimizer and scheduler states, pickles and
predictions stay local.

The token is taken from `hub_token`, else from huggingface_hub (`HF_TOKEN`, then the login cached by `hf auth login`).
It is handed to `HfApi` only: never printed, logged, or written to a file or the card. A training run keeps it in its
`HubTarget` alone: it is cleared from the training arguments, which the Trainer pickles into every checkpoint.
"""

import json
from dataclasses import dataclass, field
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

import yaml

from vlm_recipes.console import print_main
from vlm_recipes.errors import RecipeError
from vlm_recipes.evaluation.card import evaluation_lines, is_local_path, last_training_evaluation, model_index
from vlm_recipes.evaluation.sets import EvalSet, saved_eval_sets
from vlm_recipes.modeling.loading import ADAPTER_CONFIG, SFT_ADAPTER_COPY, trains_in_4bit
from vlm_recipes.recipe import entry_point_of
from vlm_recipes.training.outputs import RECIPE_FILE, TRAINING_LOG, losses, read_saved_recipe
from vlm_recipes.training.plots import PLOT_FILE


CARD_FILE = "README.md"
EVAL_RESULTS_FILE = "eval_results.json"
DATA_REPORT_FILE = "data_report.json"
PUSHED_PATTERNS = (
    "*.safetensors",  # adapter_model.safetensors, or a full model's shards
    "model.safetensors.index.json",
    "adapter_config.json",
    "config.json",
    "generation_config.json",
    "processor_config.json",
    "preprocessor_config.json",
    "video_preprocessor_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    RECIPE_FILE,
    TRAINING_LOG,
    EVAL_RESULTS_FILE,
    DATA_REPORT_FILE,
    PLOT_FILE,
    CARD_FILE,
)
# Subfolders pushed with the allow-list of their files: the SFT adapter a `reference: sft_merged` DPO adapter sits on.
PUSHED_SUBFOLDERS = {SFT_ADAPTER_COPY: ("*.safetensors", ADAPTER_CONFIG)}
NETWORK_ERROR_MODULES = ("httpx2", "httpx", "requests", "urllib3")
CARD_MARKER = "<!-- model card written by vlm-recipes -->"
# Cards the libraries write on their own (PEFT's template on save, TRL's on checkpoint): ours replaces them.
GENERATED_CARD_MARKERS = (
    CARD_MARKER,
    "<!-- Provide a quick summary of what the model is/does. -->",
    "It has been trained using [TRL](https://github.com/huggingface/trl).",
)
NO_TOKEN_MESSAGE = (
    "Pushing to the Hub needs a Hugging Face token with write access, and none was found. Log in once with "
    "`hf auth login`, or set the HF_TOKEN environment variable, or pass `--hub_token`. Nothing was pushed."
)


@dataclass
class HubTarget:
    """Where a push goes. The token is kept out of the repr so that it never lands in a log."""

    repo_id: str
    private: bool | None = None
    token: str = field(default="", repr=False)


def find_token(explicit: str | None = None) -> str:
    """`explicit`, else huggingface_hub's token (HF_TOKEN, then the cached login); a clear error when there is none."""
    from huggingface_hub import get_token

    token = explicit or get_token()
    if not token:
        raise RecipeError(NO_TOKEN_MESSAGE)
    return token


def hub_target(repo_id: str | None, private: bool | None = None, token: str | None = None) -> HubTarget:
    """A checked target: a valid repo id and a token. Called before any work, so a push never fails at the end."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if not repo_id:
        raise RecipeError(
            "Pushing to the Hub needs `hub_model_id`, the repository to push to (e.g. your-name/my-vlm)."
        )
    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise RecipeError(f"`hub_model_id` '{repo_id}' is not a valid repository id: {error}") from None
    return HubTarget(repo_id=repo_id, private=private, token=find_token(token))


def prepare_training_push(training_args: Any) -> HubTarget | None:
    """With `push_to_hub`, check the target and the token before training, and push once at the end ourselves:
    the Trainer's own push would upload at every save, checkpoints and all.

    `hub_token` is cleared from the training arguments in every case (pushing or not): the Trainer pickles them into
    each checkpoint's `training_args.bin`, so the token would be written to disk. It lives on in the target only."""
    token, training_args.hub_token = training_args.hub_token, None
    if not training_args.push_to_hub:
        return None
    target = hub_target(training_args.hub_model_id, training_args.hub_private_repo, token)
    training_args.push_to_hub = False
    return target


# ---------------------------------------------------------------------------------------------------------------------
# What is pushed


def files_to_push(output_dir: str | Path) -> tuple[list[str], list[str]]:
    """(files on the allow-list, everything else in the folder), both sorted by name, as paths in the folder: the
    top-level files of `PUSHED_PATTERNS`, and in each of `PUSHED_SUBFOLDERS` the files of its own patterns."""
    output_dir = Path(output_dir)
    pushed, left_out = [], []
    for path in sorted(output_dir.iterdir()):
        if path.is_file() and any(fnmatch(path.name, pattern) for pattern in PUSHED_PATTERNS):
            pushed.append(path.name)
        elif path.is_dir() and not path.is_symlink() and path.name in PUSHED_SUBFOLDERS:
            for inner in sorted(path.iterdir()):
                name = f"{path.name}/{inner.name}"
                if inner.is_file() and any(fnmatch(inner.name, p) for p in PUSHED_SUBFOLDERS[path.name]):
                    pushed.append(name)
                else:
                    left_out.append(name + ("/" if inner.is_dir() else ""))
        else:
            left_out.append(path.name + ("/" if path.is_dir() else ""))
    return pushed, left_out


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
    except json.JSONDecodeError:
        return None


def _front_matter(text: str) -> dict[str, Any]:
    if not text.startswith("---"):
        return {}
    try:
        data = yaml.safe_load(text.split("---", 2)[1])
    except (yaml.YAMLError, IndexError):
        return {}
    return data if isinstance(data, dict) else {}


def base_model_license(base_model: str | None, token: str | None = None) -> str | None:
    """The base model's license, from its local card or its Hub card data; None when it cannot be found."""
    if not base_model:
        return None
    local = Path(str(base_model)).expanduser()
    if local.is_dir():
        card = local / CARD_FILE
        return _front_matter(card.read_text(encoding="utf-8")).get("license") if card.is_file() else None
    if is_local_path(base_model):
        return None
    try:
        from huggingface_hub import HfApi

        card_data = HfApi(token=token).model_info(base_model).card_data
    except Exception:  # offline, gated or private: the card says the license is unknown
        return None
    if card_data is None:
        return None
    license_name = card_data.get("license")
    if license_name == "other":  # a custom license: its name is in `license_name`
        return card_data.get("license_name") or license_name
    return license_name


# ---------------------------------------------------------------------------------------------------------------------
# The model card


@dataclass
class RunFacts:
    """What an output folder says about its run."""

    output_dir: Path
    recipe: dict[str, Any]
    recipe_text: str
    base_model: str | None
    is_adapter: bool
    sft_adapter: bool  # the adapter applies on top of base + the SFT adapter in `sft_adapter/` (DPO, sft_merged)
    quantized: bool
    log_history: list[dict[str, Any]]
    eval_results: dict[str, Any] | None
    has_plot: bool
    entry_point: str
    eval_sets: list[EvalSet]  # what the run evaluated on during training (an SFT recipe's sets)

    @classmethod
    def read(cls, output_dir: str | Path) -> "RunFacts":
        output_dir = Path(output_dir)
        recipe = read_saved_recipe(output_dir)
        adapter_config = _read_json(output_dir / "adapter_config.json")
        base_model = (adapter_config or {}).get("base_model_name_or_path") or recipe.get("model_name_or_path")
        recipe_path = output_dir / RECIPE_FILE
        recipe_text = recipe_path.read_text(encoding="utf-8") if recipe_path.is_file() else ""
        return cls(
            output_dir=output_dir,
            recipe=recipe,
            recipe_text=recipe_text,
            base_model=base_model,
            is_adapter=adapter_config is not None,
            sft_adapter=adapter_config is not None and (output_dir / SFT_ADAPTER_COPY / ADAPTER_CONFIG).is_file(),
            quantized=trains_in_4bit(recipe),
            log_history=_read_json(output_dir / TRAINING_LOG) or [],
            eval_results=_read_json(output_dir / EVAL_RESULTS_FILE),
            has_plot=(output_dir / PLOT_FILE).is_file(),
            entry_point=entry_point_of(recipe_text),
            eval_sets=saved_eval_sets(recipe) if entry_point_of(recipe_text) == "vlm_recipes.sft" else [],
        )


def _format_number(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _training_section(facts: RunFacts) -> list[str]:
    recipe = facts.recipe
    method = "QLoRA (4-bit base)" if facts.quantized else "LoRA" if facts.is_adapter else "full fine-tuning"
    if recipe.get("tuning_strategy"):
        method += f", tuning strategy `{recipe['tuning_strategy']}`"
    lines = ["## Training", ""]
    training = (
        "direct preference optimization with TRL's `DPOTrainer`"
        if facts.entry_point == "vlm_recipes.dpo"
        else "supervised fine-tuning with TRL's `SFTTrainer`"
    )
    lines.append(f"- method: {training}, {method}")
    if recipe.get("dataset_name"):
        split = recipe.get("dataset_train_split", "train")
        lines.append(
            f"- data: `{recipe['dataset_name']}` (split `{split}`, formatter `{recipe.get('formatter', '?')}`)"
        )
    for key in (
        "lora_r",
        "lora_alpha",
        "learning_rate",
        "num_train_epochs",
        "max_steps",
        "per_device_train_batch_size",
    ):
        if key in recipe:
            lines.append(f"- {key}: {recipe[key]}")
    points = losses(facts.log_history)
    if points:
        (first_step, first), (last_step, last) = points[0], points[-1]
        lines.append(f"- training loss: {first:.4f} at step {first_step} -> {last:.4f} at step {last_step}")
    last = last_training_evaluation(facts.log_history, facts.eval_sets)
    if last:
        shown = [(key if key == "eval_loss" else key.removeprefix("eval_"), value) for key, (value, _) in last.items()]
        lines.append(
            "- last evaluation during training: " + ", ".join(f"{key} {_format_number(value)}" for key, value in shown)
        )
    if facts.has_plot:
        lines += ["", f"![training curves]({PLOT_FILE})"]
    return lines


def _evaluation_command(facts: RunFacts) -> list[str]:
    """How to evaluate the run. The evaluate command takes a task recipe (SFT fields: its data and metrics), so a DPO
    run names one with the run's base model and precision, not the DPO recipe (whose fields evaluate refuses)."""
    if facts.entry_point != "vlm_recipes.dpo":
        option = "--adapter DIR" if facts.is_adapter else "--model_name_or_path DIR"
        return [f"Not evaluated yet: `python -m vlm_recipes.evaluate RECIPE.yaml {option}`."]
    if not facts.is_adapter:
        command = "python -m vlm_recipes.evaluate recipes/chartqa.yaml --model_name_or_path DIR"
        folder = "the model's folder"
    else:
        strategy = "qlora" if facts.quantized else "lora"
        command = (
            f"python -m vlm_recipes.evaluate recipes/chartqa.yaml --model_name_or_path {facts.base_model or 'BASE'} "
            f"--tuning_strategy {strategy} --adapter DIR"
        )
        folder = "the adapter's folder" + (" (with its `sft_adapter/`)" if facts.sft_adapter else "")
    lines = [
        "Not evaluated yet. The evaluation command takes a task recipe, one that names evaluation data such as "
        f"`recipes/chartqa.yaml` (an SFT recipe), not this DPO recipe, with DIR {folder}:",
        "",
        "```bash",
        command,
        "```",
    ]
    if facts.sft_adapter:
        lines += ["", "Its `base` column is then base + the SFT adapter, the model DPO started from."]
    return lines


def _evaluation_section(facts: RunFacts) -> list[str]:
    eval_results = facts.eval_results
    if not eval_results or not eval_results.get("eval_sets"):
        return ["## Evaluation", "", *_evaluation_command(facts)]
    return ["## Evaluation", "", *evaluation_lines(eval_results)]


def _usage_section(facts: RunFacts, repo_id: str) -> list[str]:
    system_prompt = facts.recipe.get("system_prompt")
    system = (
        f'    {{"role": "system", "content": [{{"type": "text", "text": {json.dumps(system_prompt)}}}]}},\n'
        if system_prompt
        else ""
    )
    if facts.is_adapter:
        sft_merge = (
            "# This adapter applies on top of base + the SFT adapter DPO started from (sft_adapter/): merge that first.\n"
            f'base = PeftModel.from_pretrained(base, "{repo_id}", subfolder="{SFT_ADAPTER_COPY}").merge_and_unload()\n'
            if facts.sft_adapter
            else ""
        )
        load = (
            "from peft import PeftModel\n"
            "from transformers import AutoModelForImageTextToText, AutoProcessor\n\n"
            f'base = AutoModelForImageTextToText.from_pretrained("{facts.base_model}", dtype="bfloat16", '
            'device_map="auto")\n' + sft_merge + f'model = PeftModel.from_pretrained(base, "{repo_id}")\n'
            f'processor = AutoProcessor.from_pretrained("{repo_id}")\n'
        )
    else:
        load = (
            "from transformers import AutoModelForImageTextToText, AutoProcessor\n\n"
            f'model = AutoModelForImageTextToText.from_pretrained("{repo_id}", dtype="bfloat16", device_map="auto")\n'
            f'processor = AutoProcessor.from_pretrained("{repo_id}")\n'
        )
    snippet = (
        load + "\nfrom PIL import Image\n\n"
        "messages = [\n"
        + system
        + '    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is the highest value?"}]},\n'
        "]\n"
        "prompt = processor.apply_chat_template(messages, add_generation_prompt=True)\n"
        'inputs = processor(text=[prompt], images=[Image.open("chart.png")], return_tensors="pt").to(model.device)\n'
        "output = model.generate(**inputs, max_new_tokens=32, do_sample=False)\n"
        'print(processor.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))\n'
    )
    return (
        ["## Usage", "", "```python", snippet.rstrip(), "```", "", "Or, with vlm-recipes installed:", "", "```bash"]
        + (
            [
                f"python -m vlm_recipes.chat --adapter {repo_id} --image chart.png --question 'What is the highest value?'"
            ]
            if facts.is_adapter
            else [
                f"python -m vlm_recipes.chat --model {repo_id} --image chart.png --question 'What is the highest value?'"
            ]
        )
        + ["```"]
    )


def model_card(facts: RunFacts, repo_id: str, license_name: str | None) -> str:
    """The README.md of the pushed repository: metadata, training, evaluation, usage and the recipe as run."""
    metadata: dict[str, Any] = {}
    if facts.base_model and not is_local_path(facts.base_model):
        metadata["base_model"] = facts.base_model
    metadata["library_name"] = "peft" if facts.is_adapter else "transformers"
    if license_name:
        metadata["license"] = license_name
    dataset = facts.recipe.get("dataset_name")
    if dataset and not is_local_path(dataset):
        metadata["datasets"] = [dataset]
    metadata["pipeline_tag"] = "image-text-to-text"
    metadata["tags"] = ["vlm-recipes", "trl", "dpo" if facts.entry_point == "vlm_recipes.dpo" else "sft"] + (
        ["qlora" if facts.quantized else "lora"] if facts.is_adapter else []
    )
    index = model_index(
        repo_id.split("/")[-1], facts.eval_results, facts.log_history, facts.eval_sets, facts.is_adapter
    )
    if index:
        metadata["model-index"] = index  # the Hub shows these results on the model page
    base = facts.base_model or "an unknown base model"
    base_link = f"[{base}](https://huggingface.co/{base})" if "base_model" in metadata else f"`{base}`"
    kind = "A LoRA adapter for" if facts.is_adapter else "A fine-tune of"
    if facts.sft_adapter:
        kind = f"A LoRA adapter, on top of the SFT adapter in `{SFT_ADAPTER_COPY}/` merged into the base, for"
    license_line = (
        f"License: `{license_name}`, the base model's license."
        if license_name
        else "License: not found; the base model's license applies."
    )
    lines = [
        "---",
        yaml.safe_dump(metadata, sort_keys=False).rstrip(),
        "---",
        CARD_MARKER,
        "",
        f"# {repo_id.split('/')[-1]}",
        "",
        f"{kind} {base_link}, fine-tuned with vlm-recipes (recipes over Hugging Face TRL).",
        "",
        license_line,
        "",
        *_training_section(facts),
        "",
        *_evaluation_section(facts),
        "",
        *_usage_section(facts, repo_id),
    ]
    if facts.recipe_text:
        lines += ["", "## Recipe", "", f"The recipe as run (`{RECIPE_FILE}` in this repository):", "", "```yaml"]
        lines += [facts.recipe_text.rstrip(), "```"]
    return "\n".join(lines) + "\n"


def write_model_card(output_dir: str | Path, text: str) -> bool:
    """Write README.md unless the folder holds a card someone wrote by hand (kept, and pushed as it is)."""
    path = Path(output_dir) / CARD_FILE
    if path.is_file():
        existing = path.read_text(encoding="utf-8")
        if not any(marker in existing for marker in GENERATED_CARD_MARKERS):
            return False
    path.write_text(text, encoding="utf-8")
    return True


# ---------------------------------------------------------------------------------------------------------------------
# The push


def _is_network_error(error: Exception) -> bool:
    # huggingface_hub's HTTP client (httpx2 in 2.x, httpx or requests before) raises its own connection errors.
    return isinstance(error, OSError) or type(error).__module__.split(".")[0] in NETWORK_ERROR_MODULES


def push_output_dir(output_dir: str | Path, target: HubTarget, commit_message: str | None = None) -> str:
    """Write the model card, then create the repository (if needed) and upload the allow-listed files in one commit.
    Returns the repository URL."""
    from huggingface_hub import CommitOperationAdd, HfApi
    from huggingface_hub.errors import HfHubHTTPError

    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        raise RecipeError(f"{output_dir} is not a folder: pass the `output_dir` of a finished training run.")
    facts = RunFacts.read(output_dir)
    if not any(output_dir.glob("*.safetensors")):
        raise RecipeError(f"{output_dir} holds no weights (*.safetensors): is it the output folder of a finished run?")
    card = model_card(facts, target.repo_id, base_model_license(facts.base_model, target.token))
    if not write_model_card(output_dir, card):
        print_main(f"{output_dir / CARD_FILE} was written by hand: it is pushed as the model card, unchanged.")
    pushed, left_out = files_to_push(output_dir)

    api = HfApi(token=target.token)
    try:
        repo = api.create_repo(target.repo_id, private=target.private, exist_ok=True, repo_type="model")
        api.create_commit(
            repo_id=repo.repo_id,
            repo_type="model",
            operations=[
                CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(output_dir / name)) for name in pushed
            ],
            commit_message=commit_message or f"Upload {output_dir.name} (vlm-recipes)",
        )
    except HfHubHTTPError as error:
        status = getattr(getattr(error, "response", None), "status_code", None)
        hint = " The token was refused or lacks write access to that namespace." if status in (401, 403) else ""
        raise RecipeError(
            f"Pushing {output_dir} to {target.repo_id} failed: {str(error).splitlines()[0]}.{hint} The outputs are "
            f"safe in {output_dir}; push them again with `python -m vlm_recipes.push {output_dir} --hub_model_id "
            f"{target.repo_id}`."
        ) from None
    except Exception as error:
        if not _is_network_error(error):
            raise
        raise RecipeError(
            f"Could not reach the Hub to push {output_dir} to {target.repo_id} ({type(error).__name__}). The outputs "
            f"are safe in {output_dir}; push them later with `python -m vlm_recipes.push {output_dir} --hub_model_id "
            f"{target.repo_id}`."
        ) from None
    url = f"https://huggingface.co/{repo.repo_id}"
    print_main(f"Pushed {len(pushed)} files to {url}: {', '.join(pushed)}")
    if left_out:
        print_main(f"Kept local (not pushed): {', '.join(left_out)}")
    return url
