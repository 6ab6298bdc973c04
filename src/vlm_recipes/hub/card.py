"""The model card (README.md) of a run, written from what its output folder says (`run_folder.SavedRun`): metadata,
training (with `run_info.json`'s details), evaluation, framework versions, intended use and limitations, usage and the
recipe as run. Written at every save (end of training, merge, evaluate into a run's folder) and again by a push, with
the repository's id. A card someone wrote by hand is kept as it is."""

import json
from pathlib import Path
from typing import Any

import yaml

from vlm_recipes.evaluation.card import (
    dataset_label,
    evaluation_lines,
    is_local_path,
    last_training_evaluation,
    model_index,
)
from vlm_recipes.evaluation.sets import EvalSet, saved_eval_sets
from vlm_recipes.hub.license import base_model_license
from vlm_recipes.hub.upload import without_local_paths
from vlm_recipes.modeling.strategies import loads_in_4bit
from vlm_recipes.run_folder import (
    CARD_FILE,
    PLOT_FILE,
    RECIPE_FILE,
    SFT_ADAPTER_COPY,
    SavedRun,
    logged_metric_keys,
    loss_points,
    metric_points,
)


PLACEHOLDER_OWNER = "your-name"  # the card's repository id before a push names the real one


CARD_MARKER = "<!-- model card written by vlm-recipes -->"
# Cards the libraries write on their own (PEFT's template on save, TRL's on checkpoint): ours replaces them.
GENERATED_CARD_MARKERS = (
    CARD_MARKER,
    "<!-- Provide a quick summary of what the model is/does. -->",
    "It has been trained using [TRL](https://github.com/huggingface/trl).",
)


# Each entry point's method as the card names it, and the logged metrics (fnmatch patterns) that show its learning,
# first and last value, beside the training loss.
TRAINING_METHODS: dict[str, tuple[str, tuple[str, ...]]] = {
    "vlm_recipes.sft": ("supervised fine-tuning with TRL's `SFTTrainer`", ()),
    "vlm_recipes.dpo": (
        "direct preference optimization with TRL's `DPOTrainer`",
        ("rewards/margins", "rewards/accuracies"),
    ),
    "vlm_recipes.grpo": (
        "group relative policy optimization with TRL's `GRPOTrainer`, rewarded by the task's metrics",
        ("reward", "rewards/*/mean", "reward_std", "completions/mean_length", "kl"),
    ),
    "vlm_recipes.kto": (
        "Kahneman-Tversky optimization with TRL's `KTOTrainer` on answers marked desirable or undesirable",
        ("rewards/chosen", "rewards/rejected", "rewards/margins", "kl"),
    ),
}


def _eval_sets(run: SavedRun) -> list[EvalSet]:
    """What the run evaluated on during training (an SFT recipe's evaluation sets)."""
    return saved_eval_sets(run.recipe) if run.entry_point == "vlm_recipes.sft" else []


def _format_number(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _training_section(run: SavedRun) -> list[str]:
    recipe = run.recipe
    method = "QLoRA (4-bit base)" if loads_in_4bit(run.recipe) else "LoRA" if run.is_adapter else "full fine-tuning"
    if recipe.get("tuning_strategy"):
        method += f", tuning strategy `{recipe['tuning_strategy']}`"
    lines = ["## Training", ""]
    training, _ = TRAINING_METHODS.get(run.entry_point, TRAINING_METHODS["vlm_recipes.sft"])
    lines.append(f"- method: {training}, {method}")
    if recipe.get("dataset_name"):
        split = recipe.get("dataset_train_split", "train")
        lines.append(
            f"- data: `{dataset_label(recipe['dataset_name'])}` (split `{split}`, formatter `{recipe.get('formatter', '?')}`)"
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
    lines += _run_details(run.run_info or {})
    points = loss_points(run.log_history)
    if points:
        (first_step, first), (last_step, last) = points[0], points[-1]
        lines.append(f"- training loss: {first:.4f} at step {first_step} -> {last:.4f} at step {last_step}")
    _, metric_patterns = TRAINING_METHODS.get(run.entry_point, TRAINING_METHODS["vlm_recipes.sft"])
    for key in logged_metric_keys(run.log_history, metric_patterns):
        (first_step, first), (last_step, last) = (
            metric_points(run.log_history, key)[0],
            metric_points(run.log_history, key)[-1],
        )
        lines.append(f"- {key}: {first:.4f} at step {first_step} -> {last:.4f} at step {last_step}")
    last = last_training_evaluation(run.log_history, _eval_sets(run))
    if last:
        shown = [(key if key == "eval_loss" else key.removeprefix("eval_"), value) for key, (value, _) in last.items()]
        lines.append(
            "- last evaluation during training: " + ", ".join(f"{key} {_format_number(value)}" for key, value in shown)
        )
    if run.has_plot:
        lines += ["", f"![training curves]({PLOT_FILE})"]
    return lines


def _run_details(info: dict[str, Any]) -> list[str]:
    """The training details only the trainer knew (defaults included), from run_info.json."""
    if not info:
        return []
    lines = [
        f"- global batch: {info['global_batch']} = {info['per_device_train_batch_size']} per device x "
        f"{info['gradient_accumulation_steps']} accumulation steps x {info['processes']} process(es)",
        f"- schedule: `{info['lr_scheduler_type']}` from learning rate {info['learning_rate']}, warmup "
        f"{info['warmup_steps']}" + (" (a fraction of the steps)" if 0 < info["warmup_steps"] < 1 else " steps"),
        f"- precision: {info['precision']}",
        f"- steps: {info['steps']} ({info['epochs']} epochs)",
    ]
    if info.get("train_runtime_seconds") is not None:
        seconds = info["train_runtime_seconds"]
        lines.append(f"- wall time: {seconds / 60:.1f} min ({seconds:.0f} s) on {info['hardware']}")
    else:
        lines.append(f"- hardware: {info['hardware']}")
    return lines


def _versions_section(run: SavedRun) -> list[str]:
    versions = (run.run_info or {}).get("framework_versions")
    if not versions:
        return []
    return ["## Framework versions", "", *(f"- {name}: {version}" for name, version in versions.items())]


def _intended_use_section(run: SavedRun) -> list[str]:
    data = run.recipe.get("dataset_name")
    data_text = f"`{dataset_label(data)}`" if data else "its training data"
    method = "preference pairs (DPO)" if run.entry_point == "vlm_recipes.dpo" else "supervised examples (SFT)"
    return [
        "## Intended use and limitations",
        "",
        f"Answering questions about images of the kind in {data_text}, in the prompt format it was trained with "
        f"(the system prompt and chat template saved with it). It was fine-tuned on {method} and evaluated only as "
        "the evaluation section says: check it on your own images before relying on it. It inherits the base model's "
        "limitations, biases and license, can state wrong values with confidence, and was not trained for safety "
        "beyond the base model.",
    ]


def _evaluation_command(run: SavedRun) -> list[str]:
    """How to evaluate the run. The evaluate command takes a task recipe (SFT fields: its data and metrics), so a DPO
    run names one with the run's base model and precision, not the DPO recipe (whose fields evaluate refuses)."""
    if run.entry_point != "vlm_recipes.dpo":
        option = "--adapter DIR" if run.is_adapter else "--model_name_or_path DIR"
        return [f"Not evaluated yet: `vlm-recipes evaluate RECIPE.yaml {option}`."]
    if not run.is_adapter:
        command = "vlm-recipes evaluate recipes/chartqa.yaml --model_name_or_path DIR"
        folder = "the model's folder"
    else:
        strategy = "qlora" if loads_in_4bit(run.recipe) else "lora"
        command = (
            f"vlm-recipes evaluate recipes/chartqa.yaml --model_name_or_path {dataset_label(run.base_model or 'BASE')} "
            f"--tuning_strategy {strategy} --adapter DIR"
        )
        folder = "the adapter's folder" + (" (with its `sft_adapter/`)" if run.sft_adapter else "")
    lines = [
        "Not evaluated yet. The evaluation command takes a task recipe, one that names evaluation data such as "
        f"`recipes/chartqa.yaml` (an SFT recipe), not this DPO recipe, with DIR {folder}:",
        "",
        "```bash",
        command,
        "```",
    ]
    if run.sft_adapter:
        lines += ["", "Its `base` column is then base + the SFT adapter, the model DPO started from."]
    return lines


def _evaluation_section(run: SavedRun) -> list[str]:
    eval_results = run.eval_results
    if not eval_results or not eval_results.get("eval_sets"):
        return ["## Evaluation", "", *_evaluation_command(run)]
    return ["## Evaluation", "", *evaluation_lines(eval_results)]


def _usage_section(run: SavedRun, repo_id: str) -> list[str]:
    system_prompt = run.recipe.get("system_prompt")
    system = (
        f'    {{"role": "system", "content": [{{"type": "text", "text": {json.dumps(system_prompt)}}}]}},\n'
        if system_prompt
        else ""
    )
    if run.is_adapter:
        sft_merge = (
            "# This adapter applies on top of base + the SFT adapter DPO started from (sft_adapter/): merge that first.\n"
            f'base = PeftModel.from_pretrained(base, "{repo_id}", subfolder="{SFT_ADAPTER_COPY}").merge_and_unload()\n'
            if run.sft_adapter
            else ""
        )
        load = (
            "from peft import PeftModel\n"
            "from transformers import AutoModelForImageTextToText, AutoProcessor\n\n"
            f'base = AutoModelForImageTextToText.from_pretrained("{run.base_model}", dtype="bfloat16", '
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
            [f"vlm-recipes chat --adapter {repo_id} --image chart.png --question 'What is the highest value?'"]
            if run.is_adapter
            else [f"vlm-recipes chat --model {repo_id} --image chart.png --question 'What is the highest value?'"]
        )
        + ["```"]
    )


def model_card(run: SavedRun, repo_id: str, license_name: str | None) -> str:
    """The README.md of the pushed repository: metadata, training, evaluation, usage and the recipe as run."""
    metadata: dict[str, Any] = {}
    if run.base_model and not is_local_path(run.base_model):
        metadata["base_model"] = run.base_model
    metadata["library_name"] = "peft" if run.is_adapter else "transformers"
    if license_name:
        metadata["license"] = license_name
    dataset = run.recipe.get("dataset_name")
    if dataset and not is_local_path(dataset):
        metadata["datasets"] = [dataset]
    metadata["pipeline_tag"] = "image-text-to-text"
    metadata["tags"] = ["vlm-recipes", "trl", "dpo" if run.entry_point == "vlm_recipes.dpo" else "sft"] + (
        ["qlora" if loads_in_4bit(run.recipe) else "lora"] if run.is_adapter else []
    )
    index = model_index(repo_id.split("/")[-1], run.eval_results, run.log_history, _eval_sets(run), run.is_adapter)
    if index:
        metadata["model-index"] = index  # the Hub shows these results on the model page
    base = dataset_label(run.base_model) if run.base_model else "an unknown base model"
    base_link = f"[{base}](https://huggingface.co/{base})" if "base_model" in metadata else f"`{base}`"
    kind = "A LoRA adapter for" if run.is_adapter else "A fine-tune of"
    if run.sft_adapter:
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
        *_training_section(run),
        "",
        *_evaluation_section(run),
        "",
        *_usage_section(run, repo_id),
        "",
        *_intended_use_section(run),
    ]
    if versions := _versions_section(run):
        lines += ["", *versions]
    if run.recipe_text:
        lines += ["", "## Recipe", "", f"The recipe as run (`{RECIPE_FILE}` in this repository):", "", "```yaml"]
        lines += [run.recipe_text.rstrip(), "```"]
    # Local folders (a local base model or dataset, the output folder) by their last part only, as a push uploads the
    # run's files: the card is the same in the folder and on the Hub.
    return without_local_paths("\n".join(lines) + "\n")[0]


def card_repo_id(output_dir: str | Path, hub_model_id: str | None) -> str:
    """The repository the card names: the recipe's `hub_model_id`, else a placeholder owner and the folder's name."""
    return hub_model_id or f"{PLACEHOLDER_OWNER}/{Path(output_dir).resolve().name}"


def write_card_at_save(output_dir: str | Path, hub_model_id: str | None = None) -> bool:
    """Write the package's card into a run's folder after a save (training, merge, evaluate). The license comes from
    the base model's local card, or its Hub card data when the Hub can be reached (None otherwise: a push fills it)."""
    run = SavedRun.read(output_dir)
    repo_id = card_repo_id(output_dir, hub_model_id or run.recipe.get("hub_model_id"))
    return write_model_card(output_dir, model_card(run, repo_id, base_model_license(run.base_model)))


def write_model_card(output_dir: str | Path, text: str) -> bool:
    """Write README.md unless the folder holds a card someone wrote by hand (kept, and pushed as it is)."""
    path = Path(output_dir) / CARD_FILE
    if path.is_file():
        existing = path.read_text(encoding="utf-8")
        if not any(marker in existing for marker in GENERATED_CARD_MARKERS):
            return False
    path.write_text(text, encoding="utf-8")
    return True
