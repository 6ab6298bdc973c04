"""What a finished run leaves behind in its output folder: saving the outputs (names from `run_folder`), the summary.
(What may be written into the folder, and replaced: `training.output_folder`.)"""

import json
from pathlib import Path
from typing import Any

from vlm_recipes.errors import RecipeError
from vlm_recipes.recipe import TrainingRecipe, save_recipe
from vlm_recipes.run_folder import (
    ADAPTER_WEIGHTS,
    RECIPE_FILE,
    TRAINING_ARGS_PICKLE,
    TRAINING_LOG,
    loss_points,
)
from vlm_recipes.training.distributed import save_frozen_adapters_under_zero3


def resume_requested(value: Any) -> bool | str | None:
    """`resume_from_checkpoint` as the Trainer takes it: True for the last checkpoint, a path, or None."""
    if isinstance(value, str) and value.lower() in {"true", "yes", "1", "last"}:
        return True
    if isinstance(value, str) and value.lower() in {"false", "no", "0", "none", ""}:
        return None
    return value or None


def save_outputs(trainer: Any, recipe: TrainingRecipe, output_dir: str | Path) -> None:
    """Adapter (or model) and processor via the trainer, the saved adapters read back, the training log and the
    recipe as run."""
    trainer.save_model(str(output_dir))
    save_frozen_adapters_under_zero3(trainer, str(output_dir))
    if trainer.is_world_process_zero():
        check_saved_adapters(trainer.model, output_dir)
        output_dir = Path(output_dir)
        # The Trainer pickles its arguments next to the weights; recipe.yaml says the same in plain text, and the final
        # folder (what gets shared) holds no pickle. Checkpoints keep theirs for resuming.
        (output_dir / TRAINING_ARGS_PICKLE).unlink(missing_ok=True)
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


def summary_lines(log_history: list[dict[str, Any]], output_dir: str | Path, keys: tuple[str, ...] = ()) -> list[str]:
    """What a user wants at the end: where the outputs are and how the metrics moved from first to last log."""
    lines = [f"Outputs in {Path(output_dir).resolve()}"]
    points = loss_points(log_history)
    if points:
        (first_step, first), (last_step, last) = points[0], points[-1]
        lines.append(f"loss: {first:.4f} at step {first_step} -> {last:.4f} at step {last_step}")
    for key in keys:
        points = [(entry["step"], entry[key]) for entry in log_history if key in entry]
        if points:
            lines.append(
                f"{key}: {points[0][1]:.4f} at step {points[0][0]} -> {points[-1][1]:.4f} at step {points[-1][0]}"
            )
    return lines
