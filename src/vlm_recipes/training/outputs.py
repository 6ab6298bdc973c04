"""The run's output folder: refuse to overwrite silently, and save what a finished run leaves behind."""

import json
import shutil
from pathlib import Path
from typing import Any

from vlm_recipes.errors import RecipeError
from vlm_recipes.recipe import TrainingRecipe, save_recipe
from vlm_recipes.run_folder import (
    ADAPTER_WEIGHTS,
    PRE_TRAINING_FILES,
    PRE_TRAINING_FOLDERS,
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


def holds_only_pre_training_files(path: Path) -> bool:
    """Whether a non-empty folder holds only what a run writes before training starts (`PRE_TRAINING_FILES`,
    `PRE_TRAINING_FOLDERS`). Entries that vanish while it looks (the main process clearing them) count as such."""
    for entry in path.iterdir():
        if entry.is_file() and not entry.is_symlink() and entry.name in PRE_TRAINING_FILES:
            continue
        allowed = PRE_TRAINING_FOLDERS.get(entry.name)
        try:
            if (
                allowed is not None
                and entry.is_dir()
                and not entry.is_symlink()
                and all(item.is_file() and item.name in allowed for item in entry.iterdir())
            ):
                continue
        except FileNotFoundError:
            continue
        if not entry.exists() and not entry.is_symlink():
            continue
        return False
    return True


def prepare_output_dir(output_dir: str | None, *, overwrite: bool, resume: Any, is_main_process: bool = True) -> Path:
    """Create `output_dir`; refuse a non-empty one unless the run resumes from it or the recipe says to overwrite.
    A folder that holds only what a run writes before training starts (the data report; DPO's SFT adapter copy) is
    the trace of a run that stopped before training: it is reused, those files removed and written again."""
    if not output_dir:
        raise RecipeError("The recipe sets no `output_dir`.")
    path = Path(output_dir)
    if path.exists() and not path.is_dir():
        raise RecipeError(f"output_dir {path} exists and is a file.")
    non_empty = path.is_dir() and any(path.iterdir())
    if non_empty and not resume and not overwrite and holds_only_pre_training_files(path):
        if is_main_process:
            found = ", ".join(sorted(entry.name + ("/" if entry.is_dir() else "") for entry in path.iterdir()))
            print(
                f"output_dir {path} holds only what a run writes before training ({found}), left by a run that "
                "stopped before training: reusing it (these files are replaced)."
            )
            for entry in path.iterdir():
                if entry.is_dir():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()
        non_empty = False
    if non_empty and not resume:
        if not overwrite:
            raise RecipeError(
                f"output_dir {path} already holds files. Nothing was changed. To continue that run set "
                "`resume_from_checkpoint: true`; to replace it set `overwrite_output_dir: true`; or choose another "
                "`output_dir`."
            )
        if is_main_process:
            print(f"overwrite_output_dir: deleting the previous contents of {path}")
            shutil.rmtree(path)
    if is_main_process:
        path.mkdir(parents=True, exist_ok=True)
    return path


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
