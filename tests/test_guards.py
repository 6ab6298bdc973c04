"""Fault guards: checkpoints are complete or visibly not, resume takes the last complete one, NaN stops the run."""

import json
import logging
from types import SimpleNamespace

import pytest
import torch

from vlm_recipes.errors import RecipeError
from vlm_recipes.training.guards import (
    COMPLETE_MARKER,
    CompleteCheckpoints,
    DeadRunWarning,
    FaultGuards,
    NonFiniteGuard,
    ReachedMaxSteps,
    ResumeCheck,
    TrainingDiverged,
    data_order_settings,
    incomplete_reason,
    last_complete_checkpoint,
    mark_complete,
    resume_checkpoint,
)


def write_checkpoint(output_dir, step, complete=True):
    """A checkpoint folder as the Trainer writes it; without the marker when the save was interrupted."""
    folder = output_dir / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    (folder / "adapter_model.safetensors").write_bytes(b"w" * 1000)
    (folder / "optimizer.pt").write_bytes(b"o" * 2000)
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    if complete:
        mark_complete(folder, step)
    return folder


def test_a_checkpoint_is_complete_only_when_its_marker_matches_the_files(tmp_path):
    folder = write_checkpoint(tmp_path, 10)
    assert incomplete_reason(folder) is None
    marker = json.loads((folder / COMPLETE_MARKER).read_text())
    assert marker == {
        "global_step": 10,
        "files": {"adapter_model.safetensors": 1000, "optimizer.pt": 2000, "trainer_state.json": 19},
    }
    (folder / "optimizer.pt").write_bytes(b"o" * 10)  # truncated after the fact
    assert "optimizer.pt has 10 bytes, not the 2000 written" in incomplete_reason(folder)
    (folder / "optimizer.pt").unlink()
    assert incomplete_reason(folder) == "optimizer.pt is missing"
    half_written = write_checkpoint(tmp_path, 20, complete=False)
    assert "no completion marker" in incomplete_reason(half_written)


def test_resume_takes_the_last_complete_checkpoint_and_moves_incomplete_ones_aside(tmp_path, capsys):
    write_checkpoint(tmp_path, 2)
    write_checkpoint(tmp_path, 4)
    half_written = write_checkpoint(tmp_path, 6, complete=False)
    (half_written / "adapter_model.safetensors").write_bytes(b"w" * 10)

    assert resume_checkpoint(tmp_path, True) == str(tmp_path / "checkpoint-4")
    out = capsys.readouterr().out
    assert "checkpoint-6 is incomplete (it has no completion marker" in out and "nothing was deleted" in out
    assert "Resuming from the last complete checkpoint" in out
    moved = tmp_path / "incomplete-checkpoint-6"
    assert moved.is_dir() and (moved / "adapter_model.safetensors").read_bytes() == b"w" * 10  # kept as it was
    assert not (tmp_path / "checkpoint-6").exists()
    # The Trainer's own choice would now be checkpoint-4 too: incomplete folders no longer look like checkpoints.
    from transformers.trainer_utils import get_last_checkpoint

    assert get_last_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-4")


def test_resume_without_a_complete_checkpoint_starts_over(tmp_path, capsys):
    write_checkpoint(tmp_path, 3, complete=False)
    assert resume_checkpoint(tmp_path, True) is None
    assert "no complete checkpoint" in capsys.readouterr().out
    assert resume_checkpoint(tmp_path / "nothing-here", True) is None
    assert resume_checkpoint(tmp_path, None) is None


def test_resume_from_an_explicit_path(tmp_path):
    complete = write_checkpoint(tmp_path, 5)
    assert resume_checkpoint(tmp_path, str(complete)) == str(complete)
    broken = tmp_path / "checkpoint-9"
    broken.mkdir()
    (broken / "adapter_model.safetensors").write_bytes(b"w")
    with pytest.raises(RecipeError, match="checkpoint-9 is not a complete checkpoint: it has no completion marker"):
        resume_checkpoint(tmp_path, str(broken))


def test_old_checkpoints_are_rotated_only_after_the_new_one_is_marked(tmp_path):
    write_checkpoint(tmp_path, 2)
    write_checkpoint(tmp_path, 4, complete=False)  # just written by the Trainer, not yet marked
    callback = CompleteCheckpoints(save_total_limit=1)
    args = SimpleNamespace(output_dir=str(tmp_path), should_save=True)
    callback.on_save(args, SimpleNamespace(global_step=4, best_model_checkpoint=None), None)
    assert incomplete_reason(tmp_path / "checkpoint-4") is None
    assert not (tmp_path / "checkpoint-2").exists()
    assert last_complete_checkpoint(tmp_path) == tmp_path / "checkpoint-4"


def run_step(guard, losses, model, micro_batches=1):
    for _ in range(micro_batches):
        guard.record(next(losses))  # what the trainers' training_step does with each micro-batch's loss
    state = SimpleNamespace(global_step=6, is_world_process_zero=True, log_history=[{"loss": 1.0, "step": 6}])
    return guard.on_pre_optimizer_step(None, state, None, model=model)


def test_a_nan_loss_stops_before_the_optimizer_step(tmp_path):
    write_checkpoint(tmp_path, 5)
    model = torch.nn.Linear(2, 2)
    model.weight.grad = torch.ones(2, 2)
    losses = iter([torch.tensor(0.5), torch.tensor(float("nan")), torch.tensor(0.7)])
    guard = NonFiniteGuard(tmp_path)
    assert run_step(guard, losses, model) is None  # a finite step passes (control unchanged)
    with pytest.raises(TrainingDiverged) as info:
        run_step(guard, losses, model, micro_batches=2)  # gradient accumulation: one bad micro-batch is enough
    message = str(info.value)
    assert "Training stopped at step 7: the loss was nan" in message
    assert f"Last complete checkpoint: {tmp_path / 'checkpoint-5'} (step 5)" in message
    assert json.loads((tmp_path / "training_log.json").read_text()) == [{"loss": 1.0, "step": 6}]


def test_infinite_gradients_stop_the_run_even_with_a_finite_loss(tmp_path):
    model = torch.nn.Linear(2, 2)
    model.weight.grad = torch.tensor([[1.0, float("inf")], [0.0, 0.0]])
    with pytest.raises(TrainingDiverged, match="a gradient was NaN or infinite .*No complete checkpoint with finite"):
        run_step(NonFiniteGuard(tmp_path), iter([torch.tensor(0.5)]), model)


def test_a_nonfinite_logged_value_stops_the_run(tmp_path):
    guard = NonFiniteGuard(tmp_path)
    state = SimpleNamespace(global_step=30, is_world_process_zero=True, log_history=[])
    guard.on_log(None, state, None, logs={"loss": 1.0, "grad_norm": 2.0})
    with pytest.raises(TrainingDiverged, match="step 30: the logged grad_norm was inf"):
        guard.on_log(None, state, None, logs={"loss": 1.0, "grad_norm": float("inf")})


def test_a_checkpoint_with_nonfinite_trained_weights_is_not_marked_complete_and_stops_the_run(tmp_path):
    write_checkpoint(tmp_path, 2)
    folder = write_checkpoint(tmp_path, 4, complete=False)  # just written by the Trainer
    model = torch.nn.Linear(2, 2)
    model.bias.requires_grad_(False)
    with torch.no_grad():
        model.weight[0, 0] = float("nan")
    args = SimpleNamespace(output_dir=str(tmp_path), should_save=True, learning_rate=1.0)
    state = SimpleNamespace(global_step=4, best_model_checkpoint=None)
    with pytest.raises(TrainingDiverged) as info:
        CompleteCheckpoints(save_total_limit=1).on_save(args, state, None, model=model)
    message = str(info.value)
    assert (
        "Training stopped after step 4: the trained weights became NaN or infinite (1 tensor(s), e.g. weight)"
        in message
    )
    assert f"Last complete checkpoint: {tmp_path / 'checkpoint-2'} (step 2)" in message
    assert "NaN or infinite" in incomplete_reason(folder)
    assert (tmp_path / "checkpoint-2").is_dir()  # not rotated out: it is still the last good one
    assert resume_checkpoint(tmp_path, True) == str(tmp_path / "checkpoint-2")
    assert (tmp_path / "incomplete-checkpoint-4").is_dir()


def test_the_checkpoint_whose_weights_gave_the_nan_is_not_recommended(tmp_path):
    write_checkpoint(tmp_path, 5)
    write_checkpoint(tmp_path, 6)  # saved at step 6: its weights are the ones step 7 computes its loss with
    model = torch.nn.Linear(2, 2)
    model.weight.grad = torch.ones(2, 2)
    with pytest.raises(TrainingDiverged) as info:
        run_step(NonFiniteGuard(tmp_path), iter([torch.tensor(float("nan"))]), model)
    message = str(info.value)
    assert "Training stopped at step 7: the loss was nan" in message
    assert "checkpoint-6 holds the weights that gave it" in message
    assert f"Last complete checkpoint: {tmp_path / 'checkpoint-5'} (step 5)" in message
    assert last_complete_checkpoint(tmp_path) == tmp_path / "checkpoint-5"


def resumed(tmp_path, learning_rate, *, loaded_rate, scheduled_rate, step=2, max_steps=10, batch_sizes=(4, 4)):
    """A ResumeCheck at the start of a resumed run: the optimizer and scheduler as transformers leaves them after
    loading a checkpoint saved with `loaded_rate`, and the recipe now asking for `scheduled_rate`; `batch_sizes`: the
    checkpoint's per_device_train_batch_size and the recipe's now."""
    checkpoint = write_checkpoint(tmp_path, step, complete=False)
    saved_order = data_order_settings(SimpleNamespace(seed=42, per_device_train_batch_size=batch_sizes[0]))
    mark_complete(checkpoint, step, {"learning_rate": loaded_rate, "lr_scheduler_type": "linear"}, saved_order)
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([parameter], lr=loaded_rate)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda current: 1 - current / max_steps)
    for _ in range(step):
        optimizer.step()
        scheduler.step()
    guards = FaultGuards(ResumeCheck(), None)
    guards.scheduler_created(SimpleNamespace(base_lrs=[scheduled_rate]))  # the scheduler the recipe asks for
    guards.training_starts(str(checkpoint))
    args = SimpleNamespace(learning_rate=learning_rate, lr_scheduler_type="linear", lr_scheduler_kwargs=None,
                           warmup_steps=0, warmup_ratio=None, output_dir=str(tmp_path),
                           seed=42, per_device_train_batch_size=batch_sizes[1])  # fmt: skip
    state = SimpleNamespace(global_step=step, max_steps=max_steps)
    return guards.resume, args, state, optimizer, scheduler


def test_resume_applies_a_changed_learning_rate_and_says_so(tmp_path, capsys):
    check, args, state, optimizer, scheduler = resumed(tmp_path, 1e-4, loaded_rate=1e6, scheduled_rate=1e-4)
    assert scheduler.get_last_lr() == [pytest.approx(1e6 * 0.8)]  # what the checkpoint's state would train with
    check.on_train_begin(args, state, None, optimizer=optimizer, lr_scheduler=scheduler)
    assert scheduler.base_lrs == [1e-4] and scheduler.get_last_lr() == [pytest.approx(1e-4 * 0.8)]
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-4 * 0.8)
    scheduler.step()
    assert scheduler.get_last_lr() == [pytest.approx(1e-4 * 0.7)]  # the schedule goes on from there
    out = capsys.readouterr().out
    assert "with the recipe's schedule, which differs from the checkpoint's: learning_rate 1000000.0 -> 0.0001" in out
    assert "Applied from step 3" in out


def test_resume_with_the_same_schedule_changes_nothing(tmp_path, capsys):
    check, args, state, optimizer, scheduler = resumed(tmp_path, 1e-4, loaded_rate=1e-4, scheduled_rate=1e-4)
    check.on_train_begin(args, state, None, optimizer=optimizer, lr_scheduler=scheduler)
    assert scheduler.get_last_lr() == [pytest.approx(1e-4 * 0.8)] and capsys.readouterr().out == ""


def test_resume_with_another_batch_size_warns_that_rows_change(tmp_path, caplog):
    check, args, state, optimizer, scheduler = resumed(
        tmp_path, 1e-4, loaded_rate=1e-4, scheduled_rate=1e-4, batch_sizes=(4, 8)
    )
    with caplog.at_level(logging.WARNING, logger="vlm_recipes.training.guards"):
        check.on_train_begin(args, state, None, optimizer=optimizer, lr_scheduler=scheduler)
    warnings = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "Resuming from checkpoint-2 with settings that change which rows each step draws" in warnings[0]
    assert "(per_device_train_batch_size 4 -> 8)" in warnings[0] and "the 2 steps already trained" in warnings[0]


def test_resume_with_the_same_data_order_warns_of_nothing(tmp_path, caplog):
    check, args, state, optimizer, scheduler = resumed(tmp_path, 1e-4, loaded_rate=1e-4, scheduled_rate=1e-4)
    with caplog.at_level(logging.WARNING, logger="vlm_recipes.training.guards"):
        check.on_train_begin(args, state, None, optimizer=optimizer, lr_scheduler=scheduler)
    assert not [record for record in caplog.records if record.levelno >= logging.WARNING]


def test_resume_from_a_checkpoint_at_max_steps_trains_nothing(tmp_path):
    check, args, state, optimizer, scheduler = resumed(
        tmp_path, 1e-4, loaded_rate=1e-4, scheduled_rate=1e-4, step=30, max_steps=30
    )
    with pytest.raises(ReachedMaxSteps, match="checkpoint-30 is at step 30, the run's max_steps"):
        check.on_train_begin(args, state, None, optimizer=optimizer, lr_scheduler=scheduler)


def test_a_resume_the_trainer_was_asked_for_directly_is_checked_too(tmp_path, capsys):
    # train(resume_from_checkpoint=True) called without the entry point: the state says which checkpoint loaded.
    check, args, state, optimizer, scheduler = resumed(tmp_path, 1e-4, loaded_rate=1e6, scheduled_rate=1e-4)
    check.checkpoint = None
    check.on_train_begin(args, state, None, optimizer=optimizer, lr_scheduler=scheduler)
    assert scheduler.base_lrs == [1e-4]
    assert "Resuming from checkpoint-2 with the recipe's schedule" in capsys.readouterr().out


def log_steps(callback, entries, learning_rate=1e6):
    args, state = SimpleNamespace(learning_rate=learning_rate), SimpleNamespace(is_world_process_zero=True)
    for step, (loss, grad_norm) in enumerate(entries, start=1):
        state.global_step = step
        callback.on_log(args, state, None, logs={"loss": loss, "grad_norm": grad_norm})


def test_a_dead_run_gets_a_warning_naming_the_likely_cause(caplog):
    log_steps(DeadRunWarning(), [(7.2, 4.2), (6.41, 0.0), (6.41, 0.0), (6.41, 0.0), (6.41, 0.0)])
    warnings = [record.getMessage() for record in caplog.records]
    assert len(warnings) == 1  # once
    assert "The run is not learning: the gradient norm has been 0 and the loss flat at 6.4100" in warnings[0]
    assert "up to step 4" in warnings[0] and "learning_rate 1e+06 is far above usual fine-tuning rates" in warnings[0]

    caplog.clear()
    log_steps(DeadRunWarning(), [(6.4, 0.0)] * 3, learning_rate=1e-4)
    assert "no gradient reaches the trained parameters" in caplog.records[0].getMessage()


def test_a_learning_run_gets_no_warning(caplog):
    log_steps(DeadRunWarning(), [(7.2, 4.2), (6.4, 3.0), (6.41, 0.0), (5.9, 2.0), (5.0, 0.0), (4.8, 1.0)])
    assert caplog.records == []
