"""Fault guards: checkpoints are complete or visibly not, resume takes the last complete one, NaN stops the run."""

import json
from types import SimpleNamespace

import pytest
import torch

from vlm_recipes.errors import RecipeError
from vlm_recipes.training.guards import (
    COMPLETE_MARKER,
    CompleteCheckpoints,
    NonFiniteGuard,
    TrainingDiverged,
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
    with pytest.raises(TrainingDiverged, match="a gradient was NaN or infinite .*No checkpoint was saved before it"):
        run_step(NonFiniteGuard(tmp_path), iter([torch.tensor(0.5)]), model)


def test_a_nonfinite_logged_value_stops_the_run(tmp_path):
    guard = NonFiniteGuard(tmp_path)
    state = SimpleNamespace(global_step=30, is_world_process_zero=True, log_history=[])
    guard.on_log(None, state, None, logs={"loss": 1.0, "grad_norm": 2.0})
    with pytest.raises(TrainingDiverged, match="step 30: the logged grad_norm was inf"):
        guard.on_log(None, state, None, logs={"loss": 1.0, "grad_norm": float("inf")})
