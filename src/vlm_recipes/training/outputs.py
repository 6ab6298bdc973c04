"""What a finished run leaves behind in its output folder: the names, saving the outputs, reading a saved run.
(What may be written into the folder, and replaced: `training.output_folder`.)"""

import json
from pathlib import Path
from typing import Any

from vlm_recipes.data.report import REPORT_FILE
from vlm_recipes.errors import RecipeError
from vlm_recipes.modeling.loading import ADAPTER_CONFIG, SFT_ADAPTER_COPY
from vlm_recipes.recipe import Recipe, save_recipe
from vlm_recipes.training.distributed import save_frozen_adapters_under_zero3


TRAINING_LOG = "training_log.json"
RECIPE_FILE = "recipe.yaml"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# What a run writes into output_dir before training starts: the data report (`data.report.publish`) and, for DPO with
# `reference: sft_merged`, its copy of the SFT adapter (`dpo.save_sft_adapter_copy`). A folder holding nothing else is
# a run that stopped before training (too many bad rows, a recipe error), not a previous run's work.
PRE_TRAINING_FILES = frozenset({REPORT_FILE})
PRE_TRAINING_FOLDERS = {SFT_ADAPTER_COPY: frozenset({ADAPTER_CONFIG, ADAPTER_WEIGHTS})}


def resume_requested(value: Any) -> bool | str | None:
    """`resume_from_checkpoint` as the Trainer takes it: True for the last checkpoint, a path, or None."""
    if isinstance(value, str) and value.lower() in {"true", "yes", "1", "last"}:
        return True
    if isinstance(value, str) and value.lower() in {"false", "no", "0", "none", ""}:
        return None
    return value or None


def losses(log_history: list[dict[str, Any]]) -> list[tuple[int, float]]:
    return [(entry["step"], entry["loss"]) for entry in log_history if "loss" in entry]


def save_outputs(trainer: Any, recipe: Recipe, output_dir: str | Path) -> None:
    """Adapter (or model) and processor via the trainer, the saved adapters read back, the training log and the
    recipe as run."""
    trainer.save_model(str(output_dir))
    save_frozen_adapters_under_zero3(trainer, str(output_dir))
    if trainer.is_world_process_zero():
        check_saved_adapters(trainer.model, output_dir)
        output_dir = Path(output_dir)
        # The Trainer pickles its arguments next to the weights; recipe.yaml says the same in plain text, and the final
        # folder (what gets shared) holds no pickle. Checkpoints keep theirs for resuming.
        (output_dir / "training_args.bin").unlink(missing_ok=True)
        (output_dir / TRAINING_LOG).write_text(json.dumps(trainer.state.log_history, indent=1), encoding="utf-8")
        save_recipe(recipe, output_dir / RECIPE_FILE)


def check_saved_adapters(model: Any, output_dir: str | Path) -> None:
    """Read back every adapter a peft model saved (peft puts the "default" adapter in `output_dir`, others in a
    subfolder named after them) and fail when a tensor is missing or empty.

    Under DeepSpeed ZeRO-3 each process holds only a shard of every weight; a save that does not gather the shards
    writes tensors with no elements, or leaves frozen adapters (such as DPO's reference copy) out, and the folder still
    looks complete. Nothing downstream would notice until the adapter is used."""
    if not hasattr(model, "peft_config"):
        return
    from peft import get_peft_model_state_dict
    from safetensors import safe_open

    problems = []
    for name in model.peft_config:
        path = (Path(output_dir) if name == "default" else Path(output_dir) / name) / ADAPTER_WEIGHTS
        if not path.is_file():
            problems.append(f"{path} is missing")
            continue
        with safe_open(str(path), framework="pt") as weights:
            shapes = {key: weights.get_slice(key).get_shape() for key in weights.keys()}
        expected = set(get_peft_model_state_dict(model, adapter_name=name))
        empty = sorted(key for key, shape in shapes.items() if 0 in shape)
        missing = sorted(expected - set(shapes))
        if empty:
            problems.append(f"{path}: {len(empty)} of {len(shapes)} tensors are empty (e.g. {empty[0]})")
        if missing:
            problems.append(f"{path}: {len(missing)} of {len(expected)} tensors are missing (e.g. {missing[0]})")
    if problems:
        raise RecipeError(
            "The saved adapter is incomplete, so it would not reproduce the trained model: "
            + "; ".join(problems)
            + ". Under DeepSpeed ZeRO-3 the shards must be gathered when saving: check that the accelerate config "
            "sets `zero3_save_16bit_model: true` (DeepSpeed's `stage3_gather_16bit_weights_on_model_save`)."
        )


def read_saved_recipe(folder: str | Path) -> dict[str, Any]:
    """The fields of the `recipe.yaml` saved with a run's outputs ({} when the folder has none)."""
    import yaml

    path = Path(folder) / RECIPE_FILE
    if not path.is_file():
        return {}
    try:
        content = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as error:
        raise RecipeError(f"{path} is not valid YAML: {error}") from None
    return content if isinstance(content, dict) else {}


def summary_lines(log_history: list[dict[str, Any]], output_dir: str | Path, keys: tuple[str, ...] = ()) -> list[str]:
    """What a user wants at the end: where the outputs are and how the metrics moved from first to last log."""
    lines = [f"Outputs in {Path(output_dir).resolve()}"]
    loss_points = losses(log_history)
    if loss_points:
        (first_step, first), (last_step, last) = loss_points[0], loss_points[-1]
        lines.append(f"loss: {first:.4f} at step {first_step} -> {last:.4f} at step {last_step}")
    for key in keys:
        points = [(entry["step"], entry[key]) for entry in log_history if key in entry]
        if points:
            lines.append(
                f"{key}: {points[0][1]:.4f} at step {points[0][0]} -> {points[-1][1]:.4f} at step {points[-1][0]}"
            )
    return lines
