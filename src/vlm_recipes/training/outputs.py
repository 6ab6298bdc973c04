"""What a finished run leaves behind in its output folder: saving the outputs (names from `run_folder`), the summary.
(What may be written into the folder, and replaced: `training.output_folder`.)"""

import json
import os
import platform
from importlib import metadata
from pathlib import Path
from typing import Any

from vlm_recipes.errors import RecipeError
from vlm_recipes.hub.card import write_card_at_save
from vlm_recipes.modeling.strategies import loads_in_4bit
from vlm_recipes.recipe import TrainingRecipe, save_recipe
from vlm_recipes.run_folder import (
    ADAPTER_WEIGHTS,
    CARD_FILE,
    RECIPE_FILE,
    RUN_INFO_FILE,
    TRAINING_ARGS_PICKLE,
    TRAINING_LOG,
    loss_points,
    metric_points,
)
from vlm_recipes.training.distributed import save_frozen_adapters_under_zero3


# The libraries whose versions a result depends on (in the model card's framework versions).
FRAMEWORKS = ("vlm-recipes", "trl", "transformers", "peft", "torch", "datasets", "accelerate", "bitsandbytes")


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
        info = run_info(trainer.args, trainer.state, recipe)
        (output_dir / RUN_INFO_FILE).write_text(json.dumps(info, indent=1), encoding="utf-8")
        write_card_at_save(output_dir, trainer.args.hub_model_id)  # PEFT's boilerplate card replaced by ours


def framework_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in FRAMEWORKS:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def hardware() -> str:
    """The devices the run used, in words: `2 x NVIDIA H100 80GB HBM3`, or `CPU (x86_64)`."""
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    return f"CPU ({platform.machine()})"


def precision(args: Any, recipe: TrainingRecipe) -> str:
    compute = "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32"
    dtype = getattr(recipe.model, "dtype", None)
    four_bit = loads_in_4bit(
        {"tuning_strategy": recipe.tuning.tuning_strategy, "load_in_4bit": recipe.model.load_in_4bit}
    )
    weights = "4-bit NF4 base" if four_bit else f"{dtype or 'auto'} weights"
    return f"{compute} mixed precision, {weights}" if compute != "fp32" else f"fp32 compute, {weights}"


def run_info(args: Any, state: Any, recipe: TrainingRecipe) -> dict[str, Any]:
    """How the run trained, as resolved (defaults included, which recipe.yaml leaves out): for the model card."""
    runtime = next((entry["train_runtime"] for entry in reversed(state.log_history) if "train_runtime" in entry), None)
    return {
        "processes": args.world_size,
        "per_device_train_batch_size": args.per_device_train_batch_size,
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "global_batch": args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size,
        "learning_rate": args.learning_rate,
        "lr_scheduler_type": str(getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type)),
        "warmup_steps": args.warmup_steps,  # a number below 1 is a fraction of the steps (transformers 5)
        "precision": precision(args, recipe),
        "steps": state.global_step,
        "epochs": round(float(state.epoch or 0), 4),
        "train_runtime_seconds": round(float(runtime), 1) if runtime is not None else None,
        "hardware": hardware(),
        "framework_versions": framework_versions(),
    }


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


def next_commands(recipe: TrainingRecipe, output_dir: str | Path, pushed: bool = False) -> list[str]:
    """What a user runs after a training run: evaluate it (SFT: with its own recipe; the evaluate command takes a task
    recipe, which a DPO recipe is not), ask it a question, see what a push would upload."""
    folder = str(output_dir)
    commands = []
    if recipe.entry_point == "vlm_recipes.sft" and recipe.source:
        commands.append(f"vlm-recipes evaluate {recipe.source} --adapter {folder}")
    elif recipe.entry_point == "vlm_recipes.dpo":
        commands.append(f"vlm-recipes evaluate TASK_RECIPE.yaml --adapter {folder}   # e.g. recipes/chartqa.yaml")
    commands.append(f"vlm-recipes chat --adapter {folder} --image IMAGE --question QUESTION")
    if not pushed:
        commands.append(f"vlm-recipes push {folder} --dry_run   # then without --dry_run, with --hub_model_id")
    loggers = recipe.training.report_to or []
    if "trackio" in loggers:
        commands.append(f"trackio show --project {recipe.training.project}   # the run's dashboard, offline")
    if "tensorboard" in loggers:
        # transformers' TensorBoard callback writes under <output_dir>/runs/ unless TENSORBOARD_LOGGING_DIR says where
        commands.append(f"tensorboard --logdir {os.environ.get('TENSORBOARD_LOGGING_DIR') or Path(folder) / 'runs'}")
    return commands


def summary_lines(log_history: list[dict[str, Any]], output_dir: str | Path, keys: tuple[str, ...] = ()) -> list[str]:
    """What a user wants at the end: where the outputs are and how the metrics moved from first to last log."""
    lines = [f"Outputs in {Path(output_dir).resolve()} (card: {CARD_FILE})"]
    points = loss_points(log_history)
    if points:
        (first_step, first), (last_step, last) = points[0], points[-1]
        lines.append(f"loss: {first:.4f} at step {first_step} -> {last:.4f} at step {last_step}")
    for key in keys:
        points = metric_points(log_history, key)
        if points:
            lines.append(
                f"{key}: {points[0][1]:.4f} at step {points[0][0]} -> {points[-1][1]:.4f} at step {points[-1][0]}"
            )
    return lines
