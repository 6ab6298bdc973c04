"""Faults during training: checkpoints that are complete or visibly not, resuming from the last complete one, and a stop
at the first NaN or infinite loss.

What transformers 5.24 does on its own: `Trainer._save_checkpoint` writes straight into `checkpoint-N` (weights, then
optimizer, scheduler and RNG state, `trainer_state.json` last), then deletes checkpoints beyond `save_total_limit`;
`get_last_checkpoint` (what `resume_from_checkpoint: true` uses) takes the highest-numbered `checkpoint-N` folder,
whatever it holds. A kill during a save therefore leaves a folder that looks like the newest checkpoint, which resume
picks and then fails on (no `trainer_state.json`) or loads half-written weights from.

What this module adds, for the package's trainers (`install_fault_guards(trainer, args)`, from their `__init__`; the
trainers' overrides feed the returned `FaultGuards`):
- after the Trainer has written a checkpoint, every file in it is flushed to disk (fsync) and a completion marker,
  `checkpoint_complete.json`, listing each file and its size, is written atomically (temporary file, then rename);
  only then are old checkpoints rotated out (`save_total_limit` is taken over from the Trainer so that the previous
  complete checkpoint is never deleted before the new one is marked);
- `resume_checkpoint` (for `resume_from_checkpoint: true`) picks the newest checkpoint whose marker matches the files on
  disk and moves incomplete ones aside as `incomplete-checkpoint-N` (kept, never deleted, and out of the Trainer's way);
- the loss of every training step and the gradients before every optimizer step are checked: the first NaN or
  infinite value stops the run, before the optimizer applies it, with a message naming the step and the last complete
  checkpoint (the trainers' `training_step` records each loss). Gradient norms are logged by the Trainer with every
  loss (`grad_norm`);
- a checkpoint is marked complete only when the trained weights it holds are all finite: one saved after weights
  became NaN or infinite gets `checkpoint_nonfinite.json` instead, the run stops there, and resume moves it aside;
- on resume (`ResumeCheck`), the recipe's learning rates apply: the checkpoint's scheduler state would keep the
  rates it was saved with (transformers loads it over the new ones), so a changed rate is put back and logged, with any
  other schedule change; a run resumed from a checkpoint already at `max_steps` saves its final outputs from that
  checkpoint without training another step (`ReachedMaxSteps`);
- a run that does not learn at all (gradient norm 0 and a flat loss from the first logged steps) gets a warning naming
  the likely cause (`DeadRunWarning`).
"""

import json
import logging
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
from vlm_recipes.run_folder import COMPLETE_MARKER, INCOMPLETE_PREFIX, NONFINITE_MARKER, TRAINER_STATE, TRAINING_LOG


logger = logging.getLogger(__name__)


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


def _write_atomically(path: Path, content: dict[str, Any]) -> Path:
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(json.dumps(content, indent=1), encoding="utf-8")
    _fsync(temporary)
    os.replace(temporary, path)  # atomic: the marker is either absent or whole
    _fsync(path.parent)
    return path


def mark_complete(
    folder: str | Path, step: int, schedule: dict[str, Any] | None = None, data_order: dict[str, Any] | None = None
) -> Path:
    """Flush every file of a written checkpoint to disk, then write its marker atomically. `schedule`: the learning-rate
    settings the checkpoint was trained with (`schedule_settings`); `data_order`: the settings that decide which rows
    each step draws (`data_order_settings`); both compared on resume."""
    folder = Path(folder)
    files = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.name != COMPLETE_MARKER:
            _fsync(path)
            files[str(path.relative_to(folder))] = path.stat().st_size
    content = {"global_step": step, "files": files}
    if schedule is not None:
        content["schedule"] = schedule
    if data_order is not None:
        content["data_order"] = data_order
    return _write_atomically(folder / COMPLETE_MARKER, content)


def nonfinite_weights(model: Any) -> list[str]:
    """Names of the trainable parameters holding a NaN or infinite value ([] when all are finite, or without a model).
    Parameters sharded away from this process (DeepSpeed ZeRO-3, FSDP) are not seen: there the logged loss and
    gradient norm are checked instead (`NonFiniteGuard.on_log`)."""
    if model is None:
        return []
    return [
        name
        for name, parameter in model.named_parameters()
        if parameter.requires_grad
        and type(parameter.data) is torch.Tensor
        and parameter.numel()
        and not torch.isfinite(parameter.detach()).all()
    ]


def incomplete_reason(folder: str | Path) -> str | None:
    """Why a checkpoint folder is not complete, or None when its marker matches what is on disk."""
    folder = Path(folder)
    marker = folder / COMPLETE_MARKER
    if (folder / NONFINITE_MARKER).is_file():
        return "its trained weights are NaN or infinite, or gave a NaN or infinite loss at the next step"
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


SCHEDULE_FIELDS = ("learning_rate", "lr_scheduler_type", "lr_scheduler_kwargs", "warmup_steps", "warmup_ratio")


def schedule_settings(args: Any, optimizer: Any = None) -> dict[str, Any]:
    """The learning-rate settings of a run, as plain values: the recipe's fields and each optimizer group's rate."""
    settings = {name: _plain(getattr(args, name, None)) for name in SCHEDULE_FIELDS}
    if optimizer is not None:
        settings["group_learning_rates"] = [group.get("initial_lr", group["lr"]) for group in optimizer.param_groups]
    return settings


# What decides which rows each step draws. A resumed run skips as many batches as the checkpoint's steps consumed,
# counted in the new run's batches: with any of these changed, the skip lands elsewhere in a differently ordered (or
# differently cut, or differently sharded) data stream, so some rows train twice in this epoch and others not at all.
DATA_ORDER_FIELDS = ("seed", "data_seed", "per_device_train_batch_size", "gradient_accumulation_steps", "world_size")


def data_order_settings(args: Any) -> dict[str, Any]:
    """The settings of a run that decide which rows each step draws (`DATA_ORDER_FIELDS`), as plain values."""
    return {name: _plain(getattr(args, name, None)) for name in DATA_ORDER_FIELDS}


def _plain(value: Any) -> Any:
    value = getattr(value, "value", value)  # enums (lr_scheduler_type)
    return value if isinstance(value, str | int | float | bool | type(None) | dict | list) else str(value)


def _resume_advice(output_dir: Path) -> str:
    checkpoint = last_complete_checkpoint(output_dir)
    if checkpoint is None:
        return "No complete checkpoint with finite weights was saved before it (`save_steps`); start again"
    return (
        f"Last complete checkpoint: {checkpoint} (step {_checkpoint_step(checkpoint)}); continue from it with "
        "`resume_from_checkpoint: true`"
    )


class CompleteCheckpoints(TrainerCallback):
    """Marks each checkpoint complete once the Trainer has written all of it, if its trained weights are all finite,
    then rotates old ones out. A checkpoint whose weights hold NaN or inf is marked so and stops the run."""

    def __init__(self, save_total_limit: int | None):
        self.save_total_limit = save_total_limit

    def on_save(self, args, state, control, model=None, optimizer=None, **kwargs):
        folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        wait_for_everyone()  # every process has written its part (sharded optimizer states, ...)
        nonfinite = nonfinite_weights(model)  # the same on every process: the weights are replicated where seen
        if args.should_save and folder.is_dir():
            if nonfinite:
                marker = {"global_step": state.global_step, "nonfinite_tensors": len(nonfinite), "e.g.": nonfinite[:5]}
                _write_atomically(folder / NONFINITE_MARKER, marker)
            else:
                mark_complete(folder, state.global_step, schedule_settings(args, optimizer), data_order_settings(args))
                rotate_checkpoints(args.output_dir, self.save_total_limit, state.best_model_checkpoint)
        wait_for_everyone()
        if nonfinite:
            raise TrainingDiverged(
                f"Training stopped after step {state.global_step}: the trained weights became NaN or infinite "
                f"({len(nonfinite)} tensor(s), e.g. {nonfinite[0]}), so {folder.name} is not marked complete (resume "
                f"moves it aside). {_resume_advice(Path(args.output_dir))} after lowering `learning_rate` (or "
                "`max_grad_norm`)."
            )
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
        log_file = self._write_log(state)
        diverged = self._mark_diverged_checkpoint(state, step)
        resume = _resume_advice(self.output_dir)
        if diverged is not None:
            resume = f"{diverged.name} holds the weights that gave it (resume moves it aside). {resume}"
        applied = "" if logged else " The optimizer did not apply it: no weights were changed by this step."
        raise TrainingDiverged(
            f"Training stopped at step {step}: {what}.{applied} {resume} after lowering `learning_rate` (or "
            f"`max_grad_norm`), or after checking the rows of that step. Training log so far: {log_file}."
        )

    def _mark_diverged_checkpoint(self, state: Any, step: int) -> Path | None:
        """The checkpoint saved just before the step that diverged holds the very weights that gave the NaN: resuming
        from it repeats that step (same weights, same rows). It is marked (`NONFINITE_MARKER`, which outranks its
        completion marker) so that resume and the message skip it; returns it, or None when there is none."""
        folder = self.output_dir / f"{PREFIX_CHECKPOINT_DIR}-{step - 1}"
        found = folder.is_dir() and incomplete_reason(folder) is None
        wait_for_everyone()  # every process has looked before the main process marks it
        if found and state.is_world_process_zero:
            _write_atomically(folder / NONFINITE_MARKER, {"global_step": step - 1, "diverged_at_step": step})
        wait_for_everyone()
        return folder if found else None

    def _write_log(self, state: Any) -> Path:
        path = self.output_dir / TRAINING_LOG
        if state.is_world_process_zero:
            path.write_text(json.dumps(state.log_history, indent=1), encoding="utf-8")
        return path


def check_final_weights(model: Any, step: int, output_dir: str | Path) -> None:
    """Before the final save: trained weights that became NaN or infinite in the last steps (no later loss showed it)
    are not saved as the run's result."""
    nonfinite = nonfinite_weights(model)
    if nonfinite:
        raise TrainingDiverged(
            f"Training ended at step {step} with trained weights that are NaN or infinite ({len(nonfinite)} "
            f"tensor(s), e.g. {nonfinite[0]}): they were not saved as the result. {_resume_advice(Path(output_dir))} "
            "after lowering `learning_rate` (or `max_grad_norm`)."
        )


# ---------------------------------------------------------------------------------------------------------------------
# Resuming


class ReachedMaxSteps(Exception):
    """Raised at the start of `train()` when the checkpoint resumed from is already at `max_steps`: the Trainer has
    loaded its weights and state, and would otherwise train one step past `max_steps`. Caught by the caller
    (`training.run.train_and_save`), which saves the final outputs."""

    def __init__(self, checkpoint: str, step: int):
        super().__init__(f"{checkpoint} is at step {step}, the run's max_steps")
        self.checkpoint, self.step = checkpoint, step


def _checkpoint_settings(checkpoint: str | Path, part: str) -> dict[str, Any]:
    """One part ("schedule", "data_order") of the settings a complete checkpoint's marker records; {} when absent."""
    try:
        return json.loads((Path(checkpoint) / COMPLETE_MARKER).read_text(encoding="utf-8")).get(part) or {}
    except (OSError, ValueError, AttributeError):
        return {}


def _changes(saved: dict[str, Any], current: dict[str, Any], fields: tuple[str, ...]) -> list[str]:
    return [
        f"{name} {saved[name]} -> {current[name]}" for name in fields if name in saved and saved[name] != current[name]
    ]


class ResumeCheck(TrainerCallback):
    """What resuming from `checkpoint` must not do silently: keep the checkpoint's learning rates when the recipe now
    sets others, or train past `max_steps`.

    transformers builds the optimizer and scheduler from the recipe, then loads the checkpoint's states over them: the
    schedule's shape (type, warmup, length) comes from the recipe, but the rates come from the checkpoint. Here the
    recipe's rates (`scheduled_learning_rates`, recorded when the scheduler was created, before the load:
    `FaultGuards.scheduler_created`) are put back into the loaded scheduler and optimizer, and every change is printed;
    a scheduler whose rates cannot be set that way makes a changed rate an error instead.

    `checkpoint`: the one `train()` loads (`FaultGuards.training_starts`); None starts from step 0, unless the state
    says the Trainer resumed (`resume_from_checkpoint: true` given to `train()` itself): then its `checkpoint-N`."""

    def __init__(self, checkpoint: str | None = None, scheduled_learning_rates: list[float] | None = None):
        self.checkpoint, self.scheduled_learning_rates = checkpoint, scheduled_learning_rates

    def on_train_begin(self, args, state, control, optimizer=None, lr_scheduler=None, **kwargs):
        checkpoint = self.checkpoint
        if checkpoint is None and state.global_step > 0:
            checkpoint = str(Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        if checkpoint is None:
            return control
        if state.max_steps > 0 and state.global_step >= state.max_steps:
            raise ReachedMaxSteps(checkpoint, state.global_step)
        self._warn_of_data_order_changes(checkpoint, args, state.global_step)
        changes = self._schedule_changes(checkpoint, args)
        wanted = self.scheduled_learning_rates
        loaded = list(getattr(lr_scheduler, "base_lrs", []) or [])
        if wanted is not None and len(wanted) == len(loaded):
            if any(not math.isclose(new, old, rel_tol=1e-9) for new, old in zip(wanted, loaded)):
                _set_base_learning_rates(lr_scheduler, optimizer, wanted)
                if not any(change.startswith("learning_rate ") for change in changes):
                    changes.append(f"learning rates {_rates(loaded)} -> {_rates(wanted)}")
        elif any(change.startswith("learning_rate ") for change in changes):
            raise RecipeError(
                f"resume_from_checkpoint: the recipe's learning_rate differs from {Path(checkpoint).name}'s, and "
                f"this scheduler ({type(lr_scheduler).__name__}) keeps the checkpoint's rates. Resume with the "
                "checkpoint's learning_rate, or start a new run."
            )
        if changes:
            print_main(
                f"Resuming from {Path(checkpoint).name} with the recipe's schedule, which differs from the "
                f"checkpoint's: {'; '.join(changes)}. Applied from step {state.global_step + 1}."
            )
        return control

    @staticmethod
    def _schedule_changes(checkpoint: str, args: Any) -> list[str]:
        return _changes(_checkpoint_settings(checkpoint, "schedule"), schedule_settings(args), SCHEDULE_FIELDS)

    @staticmethod
    def _warn_of_data_order_changes(checkpoint: str, args: Any, step: int) -> None:
        changes = _changes(
            _checkpoint_settings(checkpoint, "data_order"), data_order_settings(args), DATA_ORDER_FIELDS
        )
        if changes:
            logger.warning(
                "Resuming from %s with settings that change which rows each step draws (%s): the %d steps already "
                "trained are skipped in the new order, so this epoch trains some rows twice and others not at all. "
                "Resume with the checkpoint's settings to go on with the same rows.",
                Path(checkpoint).name,
                "; ".join(changes),
                step,
            )


def _rates(values: list[float]) -> str:
    distinct = sorted(set(values))
    return f"{distinct[0]:g}" if len(distinct) == 1 else "[" + ", ".join(f"{value:g}" for value in values) + "]"


def _set_base_learning_rates(scheduler: Any, optimizer: Any, rates: list[float]) -> None:
    """Make a loaded LambdaLR-style scheduler (and its optimizer) run at `rates` from its current step, through the
    scheduler's public state dict (its last rates included, which the Trainer logs)."""
    if not hasattr(scheduler, "lr_lambdas"):
        raise RecipeError(
            f"resume_from_checkpoint: the recipe changes the learning rates, and a {type(scheduler).__name__} "
            "scheduler keeps the checkpoint's. Resume with the checkpoint's learning_rate, or start a new run."
        )
    current = [rate * factor(scheduler.last_epoch) for rate, factor in zip(rates, scheduler.lr_lambdas)]
    for group, rate, lr in zip(optimizer.param_groups, rates, current):
        group["initial_lr"], group["lr"] = rate, lr
    state = scheduler.state_dict()
    state.update(base_lrs=list(rates), _last_lr=current)
    scheduler.load_state_dict(state)


# ---------------------------------------------------------------------------------------------------------------------
# A run that does not learn


class DeadRunWarning(TrainerCallback):
    """Warns once when, among the first `window` logged training steps, `steps` in a row have a zero gradient norm and
    the same loss: the run is not learning, and will not start to (with a learning rate of 1e6 the first update
    saturates the weights and every later gradient is exactly 0)."""

    def __init__(self, steps: int = 3, window: int = 10):
        self.steps, self.window = steps, window
        self.seen: list[tuple[float, float]] | None = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.seen is None or not logs or "loss" not in logs or "grad_norm" not in logs:
            return control
        self.seen.append((float(logs["loss"]), float(logs["grad_norm"])))
        recent = self.seen[-self.steps :]
        losses = [loss for loss, _ in recent]
        dead = (
            len(recent) == self.steps
            and all(norm == 0.0 for _, norm in recent)
            and max(losses) - min(losses) <= 1e-6 * max(1.0, abs(losses[0]))
        )
        if dead and state.is_world_process_zero:
            logger.warning(dead_run_message(args, state.global_step, losses[-1]))
        if dead or len(self.seen) >= self.window:
            self.seen = None  # decided once, on the first logged steps
        return control


def dead_run_message(args: Any, step: int, loss: float) -> str:
    rate = args.learning_rate
    if rate > 1e-2:
        cause = (
            f"learning_rate {rate:g} is far above usual fine-tuning rates (1e-6 to 1e-3): the first updates saturated "
            "the weights, so no gradient flows any more. Start again with a lower learning_rate"
        )
    else:
        cause = (
            "no gradient reaches the trained parameters: check that rows have assistant turns to learn from (labels "
            "not all masked) and that the tuning strategy trains something (the table of trainable parameters above)"
        )
    return (
        f"The run is not learning: the gradient norm has been 0 and the loss flat at {loss:.4f} for the last logged "
        f"steps, up to step {step}. "
        f"Likely cause: {cause}."
    )


class FaultGuards:
    """The guards of one trainer, fed by its overrides (`training.trainers`): the scheduler as created (the recipe's
    rates, before a checkpoint's state replaces them), the checkpoint `train()` loads, and each micro-batch's loss."""

    def __init__(self, resume: ResumeCheck, nonfinite: NonFiniteGuard | None):
        self.resume, self.nonfinite = resume, nonfinite

    def scheduler_created(self, scheduler: Any) -> None:
        self.resume.scheduled_learning_rates = list(getattr(scheduler, "base_lrs", []) or []) or None

    def training_starts(self, resume_from_checkpoint: Any) -> None:
        self.resume.checkpoint = (
            str(resume_from_checkpoint) if isinstance(resume_from_checkpoint, str | Path) else None
        )

    def loss_computed(self, loss: torch.Tensor) -> None:
        if self.nonfinite is not None:
            self.nonfinite.record(loss)


def install_fault_guards(trainer: Any, args: Any) -> FaultGuards:
    """Add the checkpoint markers, the resume checks, the dead-run warning and (unless `args.stop_on_nonfinite_loss` is
    off) the NaN guard to a trainer, whose overrides then feed the returned `FaultGuards`.

    `args` is the recipe's `ReliabilityArguments`. Called once, by the trainer's `__init__`.
    """
    # rotation happens after the marker (CompleteCheckpoints.on_save)
    trainer.add_callback(CompleteCheckpoints(take_over_checkpoint_rotation(trainer.args)))
    resume = ResumeCheck()
    trainer.add_callback(resume)
    trainer.add_callback(DeadRunWarning())
    nonfinite = NonFiniteGuard(trainer.args.output_dir) if args.stop_on_nonfinite_loss else None
    if nonfinite is not None:
        trainer.add_callback(nonfinite)
    return FaultGuards(resume, nonfinite)
