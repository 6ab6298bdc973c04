"""Loggers (`report_to`): the trackio project named after the recipe, the next command that opens each dashboard, and
the optional loggers (tensorboard, wandb) writing offline through transformers' own callbacks."""

import pytest
from conftest import REPO_ROOT

from vlm_recipes.errors import RecipeError
from vlm_recipes.recipe import parse_recipe
from vlm_recipes.sft import SFTRecipe
from vlm_recipes.training.outputs import next_commands
from vlm_recipes.training.run import check_loggers, name_tracking_project


RECIPE = str(REPO_ROOT / "recipes" / "chartqa.yaml")


def test_trackio_project_is_the_recipes_name_unless_set(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    recipe_file = tmp_path / "charts_v2.yaml"
    recipe_file.write_text((REPO_ROOT / "recipes" / "chartqa.yaml").read_text() + "\nreport_to: [trackio, wandb]\n")
    recipe = parse_recipe(SFTRecipe, [str(recipe_file)])
    name_tracking_project(recipe)
    assert recipe.training.project == "charts_v2"
    import os

    assert os.environ["WANDB_PROJECT"] == "charts_v2"  # wandb reads its project from the environment
    shown = next_commands(recipe, "outputs/run")
    assert "trackio show --project charts_v2   # the run's dashboard, offline" in shown

    chosen = parse_recipe(SFTRecipe, [RECIPE, "--project", "mine", "--report_to", "tensorboard"])
    name_tracking_project(chosen)
    assert chosen.training.project == "mine"
    assert not any(line.startswith("trackio") for line in next_commands(chosen, "outputs/run"))
    assert "tensorboard --logdir outputs/run/runs" in next_commands(chosen, "outputs/run")


def test_a_missing_logger_names_the_extra(monkeypatch):
    import transformers.integrations as integrations

    monkeypatch.setattr(integrations, "is_tensorboard_available", lambda: False)
    recipe = parse_recipe(SFTRecipe, [RECIPE, "--report_to", "tensorboard"])
    with pytest.raises(RecipeError, match=r"pip install 'vlm-recipes\[tensorboard\]'"):
        check_loggers(recipe.training)


def logger_run(callback_class, tmp_path):
    """One logged step through a transformers logger callback, as the Trainer drives it."""
    from transformers import TrainerControl, TrainerState, TrainingArguments

    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, run_name="tiny", project="chartqa")
    state, control = TrainerState(), TrainerControl()
    state.global_step = 1
    callback = callback_class()
    callback.on_train_begin(args, state, control)
    callback.on_log(args, state, control, logs={"loss": 1.25, "learning_rate": 1e-4})
    callback.on_train_end(args, state, control)
    return callback


def test_tensorboard_writes_an_event_file(tmp_path):
    pytest.importorskip("tensorboard", reason="the `tensorboard` extra is not installed")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from transformers.integrations import TensorBoardCallback

    logger_run(TensorBoardCallback, tmp_path)
    (event_file,) = (tmp_path / "runs").rglob("events.out.tfevents.*")
    events = EventAccumulator(str(event_file.parent))
    events.Reload()
    assert [scalar.value for scalar in events.Scalars("train/loss")] == [1.25]


def test_wandb_offline_writes_its_run_folder(tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="the `wandb` extra is not installed")
    from transformers.integrations import WandbCallback

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    logger_run(WandbCallback, tmp_path)
    (run_dir,) = (tmp_path / "wandb").glob("offline-run-*")
    assert list(run_dir.glob("run-*.wandb"))  # the run's log, for `wandb sync` later
