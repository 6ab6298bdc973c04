"""Faults during training: checkpoints that are complete or visibly not, resuming from the last complete one, and a stop
at the first NaN or infinite loss.

What transformers 5.24 does on its own: `Trainer._save_checkpoint` writes straight into `checkpoint-N` (weights, then
optimizer, scheduler and RNG state, `trainer_state.json` last), then deletes checkpoints beyond `save_total_limit`;
`get_last_checkpoint` (what `resume_from_checkpoint: true` uses) takes the highest-numbered `checkpoint-N` folder,
whatever it holds. A kill during a save therefore leaves a folder that looks like the newest checkpoint, which resume
picks and then fails on (no `trainer_state.json`) or loads half-written weights from.

What this module adds, for the package's trainers (`install_fault_guards(trainer, args)`, from their `__init__`):
- after the Trainer has written a checkpoint, every file in it is flushed to disk (fsync) and a completion marker,
  `checkpoint_complete.json`, listing each file and its size, is written atomically (temporary file, then rename);
  only then are old checkpoints rotated out (`save_total_limit` is taken over from the Trainer so that the previous
  complete checkpoint is never deleted before the new one is marked);
- `resume_checkpoint` (for `resume_from_checkpoint: true`) picks the newest checkpoint whose marker matches the files on
  disk and moves incomplete ones aside as `incomplete-checkpoint-N` (kept, never deleted, and out of the Trainer's way);
- the loss of every training step and the gradients before every optimizer step are checked: the first NaN or
  infinite value stops the run, before the optimizer applies it, with a message naming the step and the last complete
  checkpoint. Gradient norms are logged by the Trainer with every loss (`grad_norm`).
"""

import json
import math
import os
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

from vlm_recipes.compat import take_over_checkpoint_rotation
from vlm_recipes.console import print_main
from vlm_recipes.errors import RecipeError
from vlm_recipes.processes import is_main_process, wait_for_everyone
from vlm_recipes.run_folder import COMPLETE_MARKER, INCOMPLETE_PREFIX, TRAINER_STATE, TRAINING_LOG


class TrainingDiverged(RecipeError):
    """The loss or the gradients became NaN or infinite; printed as one message, like other errors the user can fix."""


# ---------------------------------------------------------------------------------------------------------------------
# Complete checkpoints


def _fsync(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _checkpoint_step(folder: Path) -> int | None:
    name = folder.name
    prefix = f"{PREFIX_CHECKPOINT_DIR}-"
    return int(name[len(prefix) :]) if name.startswith(prefix) and name[len(prefix) :].isdigit() else None


def mark_complete(folder: str | Path, step: int) -> Path:
    """Flush every file of a written checkpoint to disk, then write its marker atomically."""
    folder = Path(folder)
    files = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.name != COMPLETE_MARKER:
            _fsync(path)
            files[str(path.relative_to(folder))] = path.stat().st_size
    marker = folder / COMPLETE_MARKER
    temporary = folder / f".{COMPLETE_MARKER}.tmp"
    temporary.write_text(json.dumps({"global_step": step, "files": files}, indent=1), encoding="utf-8")
    _fsync(temporary)
    os.replace(temporary, marker)  # atomic: the marker is either absent or whole
    _fsync(folder)
    return marker


def incomplete_reason(folder: str | Path) -> str | None:
    """Why a checkpoint folder is not complete, or None when its marker matches what is on disk."""
    folder = Path(folder)
    marker = folder / COMPLETE_MARKER
    if not marker.is_file():
        return "it has no completion marker (interrupted during its save)"
    try:
        content = json.loads(marker.read_text(encoding="utf-8"))
        files, step = content["files"], content["global_step"]
    except (OSError, ValueError, KeyError, TypeError):
        return "its completion marker is unreadable"
    if _checkpoint_step(folder) not in (None, step):
        return f"its marker is for step {step}"
    for name, size in files.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, not the {size} written"
    return None


def checkpoints(output_dir: str | Path) -> list[Path]:
    """`checkpoint-N` folders of `output_dir`, oldest step first."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = [path for path in output_dir.iterdir() if path.is_dir() and _checkpoint_step(path) is not None]
    return sorted(found, key=_checkpoint_step)


def last_complete_checkpoint(output_dir: str | Path) -> Path | None:
    complete = [folder for folder in checkpoints(output_dir) if incomplete_reason(folder) is None]
    return complete[-1] if complete else None


def _move_aside(folder: Path) -> Path:
    target = folder.with_name(INCOMPLETE_PREFIX + folder.name)
    number = 2
    while target.exists():
        target = folder.with_name(f"{INCOMPLETE_PREFIX}{folder.name}-{number}")
        number += 1
    folder.rename(target)
    return target


def resume_checkpoint(output_dir: str | Path, requested: bool | str | None) -> str | None:
    """The checkpoint `Trainer.train(resume_from_checkpoint=...)` should load, or None to start from step 0.

    `requested` is `resume_requested(recipe value)`: True means the newest complete checkpoint of `output_dir`
    (incomplete ones are moved aside and named); a path is used as given if it is complete.
    """
    if not requested:
        return None
    if requested is not True:
        folder = Path(requested)
        if not folder.is_dir():
            raise RecipeError(f"resume_from_checkpoint: {folder} is not a folder.")
        reason = incomplete_reason(folder)
        if reason is not None and not (folder / TRAINER_STATE).is_file():
            raise RecipeError(f"resume_from_checkpoint: {folder} is not a complete checkpoint: {reason}.")
        if reason is not None:
            print_main(f"Resuming from {folder} as asked, although {reason}.")
        return str(folder)

    found = checkpoints(output_dir)
    incomplete = {folder: incomplete_reason(folder) for folder in found}
    incomplete = {folder: reason for folder, reason in incomplete.items() if reason is not None}
    complete = [folder for folder in found if folder not in incomplete]
    lines = []
    if is_main_process():
        for folder, reason in incomplete.items():
            moved = _move_aside(folder)
            lines.append(f"{folder.name} is incomplete ({reason}): moved aside to {moved.name}; nothing was deleted.")
    wait_for_everyone()
    if not complete:
        print_main(
            *lines, f"resume_from_checkpoint: no complete checkpoint in {output_dir}; training starts at step 0."
        )
        return None
    print_main(*lines, f"Resuming from the last complete checkpoint: {complete[-1]}")
    return str(complete[-1])


class CompleteCheckpoints(TrainerCallback):
    """Marks each checkpoint complete once the Trainer has written all of it, then rotates old ones out."""

    def __init__(self, save_total_limit: int | None):
        self.save_total_limit = save_total_limit

    def on_save(self, args, state, control, **kwargs):
        folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        wait_for_everyone()  # every process has written its part (sharded optimizer states, ...)
        if args.should_save and folder.is_dir():
            mark_complete(folder, state.global_step)
            rotate_checkpoints(args.output_dir, self.save_total_limit, state.best_model_checkpoint)
        wait_for_everyone()
        return control


# ---------------------------------------------------------------------------------------------------------------------
# NaN and infinite losses


def _nonfinite_gradients(model: Any) -> torch.Tensor | None:
    """A 0-d bool tensor: does any gradient hold NaN or inf? None when the gradients are sharded (DeepSpeed, FSDP)."""
    grads = [
        parameter.grad
        for parameter in model.parameters()
        if parameter.grad is not None and type(parameter.grad) is torch.Tensor
    ]
    if not grads:
        return None
    return ~torch.isfinite(torch.nn.utils.get_total_norm(grads, foreach=True))


class NonFiniteGuard(TrainerCallback):
    """Stops training at the first NaN or infinite loss or gradient, before the optimizer step that would apply it.

    The losses of a step's micro-batches are recorded on their device (no synchronisation); one check per optimizer
    step reads them together with the gradient norm. Under several processes the verdict is shared, so all stop.
    """

    def __init__(self, output_dir: str | Path):
        self.output_dir = Path(output_dir)
        self.losses: list[torch.Tensor] = []

    def record(self, loss: torch.Tensor) -> None:
        """One micro-batch's loss, from the trainer's `training_step` (kept on its device: no synchronisation)."""
        self.losses.append(loss.detach())

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        losses, self.losses = self.losses, []
        flags = [~torch.isfinite(loss).all() for loss in losses]
        gradients = _nonfinite_gradients(model) if model is not None else None
        if gradients is not None:
            flags.append(gradients.to(flags[0].device) if flags else gradients)
        if not flags:
            return control
        bad = torch.stack([flag.float() for flag in flags]).max()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX)
        if bad.item():
            values = [loss.float().mean().item() for loss in losses]
            what = next((f"the loss was {value}" for value in values if not math.isfinite(value)), None)
            self._stop(state, what or "a gradient was NaN or infinite (the loss was finite)")
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        # Sharded gradients are not visible above: the logged loss and grad_norm (global) catch those runs.
        for key in ("loss", "grad_norm"):
            value = (logs or {}).get(key)
            if isinstance(value, float) and not math.isfinite(value):
                self._stop(state, f"the logged {key} was {value}", logged=True)
        return control

    def _stop(self, state: Any, what: str, logged: bool = False) -> None:
        step = state.global_step if logged else state.global_step + 1
        checkpoint = last_complete_checkpoint(self.output_dir)
        log_file = self._write_log(state)
        resume = (
            f"Last complete checkpoint: {checkpoint} (step {_checkpoint_step(checkpoint)}); continue from it with "
            "`resume_from_checkpoint: true`"
            if checkpoint
            else "No checkpoint was saved before it (`save_steps`); start again"
        )
        applied = "" if logged else " The optimizer did not apply it: no weights were changed by this step."
        raise TrainingDiverged(
            f"Training stopped at step {step}: {what}.{applied} {resume} after lowering `learning_rate` (or "
            f"`max_grad_norm`), or after checking the rows of that step. Training log so far: {log_file}."
        )

    def _write_log(self, state: Any) -> Path:
        path = self.output_dir / TRAINING_LOG
        if state.is_world_process_zero:
            path.write_text(json.dumps(state.log_history, indent=1), encoding="utf-8")
        return path


def install_fault_guards(trainer: Any, args: Any) -> NonFiniteGuard | None:
    """Add the checkpoint markers and (unless `args.stop_on_nonfinite_loss` is off) the NaN guard to a trainer, whose
    `training_step` then records each loss in the returned guard (`training.trainers`).

    `args` is the recipe's `ReliabilityArguments`. Called once, by the trainer's `__init__`.
    """
    # rotation happens after the marker (CompleteCheckpoints.on_save)
    trainer.add_callback(CompleteCheckpoints(take_over_checkpoint_rotation(trainer.args)))
    if not args.stop_on_nonfinite_loss:
        return None
    guard = NonFiniteGuard(trainer.args.output_dir)
    trainer.add_callback(guard)
    return guard
