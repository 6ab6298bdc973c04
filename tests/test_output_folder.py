"""The output folder: a stopped run's folder is reused, an earlier run is moved aside (never deleted) and only when it is
recognisably one, a folder holding anything else is refused naming it, and folders the run reads are never used."""

import os

import pytest

from vlm_recipes.errors import RecipeError
from vlm_recipes.training.output_folder import plan_output_dir, prepare_output_dir


def stopped_run(folder, *, dpo_sft_copy=False):
    """What a run writes before training: the data report; DPO with `reference: sft_merged`, its SFT adapter copy."""
    folder.mkdir()
    (folder / "data_report.json").write_text("{}")
    if dpo_sft_copy:
        (folder / "sft_adapter").mkdir()
        for name in ("adapter_config.json", "adapter_model.safetensors"):
            (folder / "sft_adapter" / name).write_text("x")
    return folder


def earlier_run(folder):
    """A finished run's folder, with a checkpoint."""
    folder.mkdir(parents=True)
    for name in ("adapter_model.safetensors", "adapter_config.json", "recipe.yaml", "training_log.json",
                 "data_report.json", "training_plot.png", "tokenizer.json", "README.md"):  # fmt: skip
        (folder / name).write_text(name)
    (folder / "checkpoint-30").mkdir()
    (folder / "checkpoint-30" / "checkpoint_complete.json").write_text("{}")
    (folder / "checkpoint-30" / "optimizer.pt").write_text("o")
    return folder


def snapshot(folder):
    return {str(path.relative_to(folder)): path.read_bytes() for path in folder.rglob("*") if path.is_file()}


@pytest.mark.parametrize("dpo_sft_copy", [False, True])
def test_a_folder_with_only_pre_training_files_is_reused_and_cleared(tmp_path, capsys, dpo_sft_copy):
    folder = stopped_run(tmp_path / "run", dpo_sft_copy=dpo_sft_copy)
    plan = plan_output_dir(str(folder), overwrite=False, resume=None)
    assert plan.action == "reuse" and any(folder.iterdir())  # deciding changes nothing (every process decides)
    assert plan.apply(is_main_process=False) == folder and any(folder.iterdir())
    assert plan.apply() == folder
    assert list(folder.iterdir()) == []  # the report (and SFT copy) are written again by the rerun, never stale
    assert "holds only what a run writes before training" in capsys.readouterr().out


@pytest.mark.parametrize(
    "extra", ["checkpoint-1/trainer_state.json", "training_log.json", "runs/events", "sft_adapter/optimizer.pt"]
)
def test_anything_else_is_refused_without_overwrite(tmp_path, extra):
    folder = stopped_run(tmp_path / "run", dpo_sft_copy=True)
    (folder / extra).parent.mkdir(exist_ok=True)
    (folder / extra).write_text("x")
    with pytest.raises(RecipeError, match="already holds files"):
        plan_output_dir(str(folder), overwrite=False, resume=None)
    assert (folder / "data_report.json").is_file() and (folder / extra).is_file()  # nothing changed


def test_overwrite_moves_an_earlier_run_aside_once_the_checks_pass(tmp_path, capsys):
    folder = earlier_run(tmp_path / "run")
    before = snapshot(folder)
    plan = plan_output_dir(str(folder), overwrite=True, resume=None)
    assert plan.holds_earlier_run and snapshot(folder) == before  # nothing moves until apply
    assert plan.apply() == folder
    assert list(folder.iterdir()) == [] and not plan.holds_earlier_run
    (previous,) = tmp_path.glob("run.previous-*")
    assert previous == plan.moved_to and snapshot(previous) == before  # every file, checkpoints included
    assert f"was moved to {previous} (nothing was deleted" in capsys.readouterr().out
    # Replaced again within the same second: a second name, never a merge into the first.
    folder.rmdir()
    earlier_run(folder)
    plan_output_dir(str(folder), overwrite=True, resume=None).apply()
    assert len(list(tmp_path.glob("run.previous-*"))) == 2


def test_overwrite_refuses_a_run_folder_holding_other_files_naming_them(tmp_path):
    folder = earlier_run(tmp_path / "run")
    (folder / "my_notes.txt").write_text("keep me")
    (folder / "eval_set").mkdir()
    before = snapshot(folder)
    with pytest.raises(RecipeError) as info:
        plan_output_dir(str(folder), overwrite=True, resume=None)
    assert "also eval_set/, my_notes.txt, which no run writes and which would be lost" in str(info.value)
    assert snapshot(folder) == before


def test_overwrite_refuses_a_folder_that_is_not_a_run(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    for index in range(12):
        (folder / f"img{index:02}.png").write_text("x")
    with pytest.raises(RecipeError) as info:
        plan_output_dir(str(folder), overwrite=True, resume=None)
    message = str(info.value)
    assert "is not a folder of an earlier vlm-recipes run" in message
    assert "It holds img00.png, img01.png" in message and "and 4 more, which would be lost" in message
    assert len(list(folder.iterdir())) == 12


@pytest.mark.parametrize("which", ["dataset", "dataset parent", "recipe", "cwd", "home", "root"])
def test_folders_the_run_reads_are_never_output_folders(tmp_path, monkeypatch, which):
    data = earlier_run(tmp_path / "project" / "data")  # even when it looks like a run
    recipe_folder = tmp_path / "project" / "recipes"
    recipe_folder.mkdir()
    (recipe_folder / "notes.md").write_text("x")
    monkeypatch.chdir(tmp_path / "project")
    monkeypatch.setenv("HOME", str(tmp_path / "project"))
    output = {
        "dataset": data, "dataset parent": tmp_path / "project", "recipe": recipe_folder, "cwd": ".",
        "home": "~", "root": "/",
    }[which]  # fmt: skip
    protected = {"the dataset's folder": data, "the recipe's folder": recipe_folder}
    with pytest.raises(RecipeError, match=r"is (a filesystem root|the|your)|contains"):
        plan_output_dir(str(output), overwrite=True, resume=None, protected=protected)
    assert (data / "recipe.yaml").is_file()


def test_a_symlinked_output_dir_is_followed(tmp_path):
    target = earlier_run(tmp_path / "disk" / "run")
    link = tmp_path / "run-link"
    link.symlink_to(target, target_is_directory=True)
    plan = plan_output_dir(str(link), overwrite=True, resume=None)
    assert plan.apply() == target and target.is_dir() and list(target.iterdir()) == []
    assert link.is_symlink() and link.resolve() == target  # the link stays, and points to the new run's folder
    (previous,) = (tmp_path / "disk").glob("run.previous-*")
    assert (previous / "checkpoint-30" / "optimizer.pt").is_file()

    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "disk" / "new-run", target_is_directory=True)
    assert prepare_output_dir(str(dangling), overwrite=False, resume=None) == tmp_path / "disk" / "new-run"
    assert (tmp_path / "disk" / "new-run").is_dir() and os.path.islink(dangling)


def test_a_file_is_not_an_output_folder(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(RecipeError, match="exists and is not a folder"):
        plan_output_dir(str(tmp_path / "f"), overwrite=True, resume=None)


def test_every_name_a_run_writes_is_recognised_and_the_checkpoint_prefix_is_transformers_own():
    from fnmatch import fnmatch

    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    from vlm_recipes import run_folder
    from vlm_recipes.compat import TRL_REFERENCE_ADAPTER
    from vlm_recipes.training.output_folder import run_file_patterns

    assert run_folder.CHECKPOINT_PREFIX == PREFIX_CHECKPOINT_DIR  # what the Trainer names its checkpoints
    written = [
        run_folder.ADAPTER_WEIGHTS, run_folder.ADAPTER_CONFIG, run_folder.RECIPE_FILE, run_folder.TRAINING_LOG,
        run_folder.DATA_REPORT_FILE, run_folder.PLOT_FILE, run_folder.EVAL_RESULTS_FILE, run_folder.CARD_FILE,
        run_folder.SFT_ADAPTER_COPY, run_folder.TRAINING_ARGS_PICKLE, run_folder.TENSORBOARD_DIR,
        run_folder.predictions_file("chartqa", "adapter"), TRL_REFERENCE_ADAPTER, "checkpoint-12",
        "incomplete-checkpoint-12",
    ]  # fmt: skip
    assert [name for name in written if not any(fnmatch(name, pattern) for pattern in run_file_patterns())] == []
    assert not any(fnmatch("notes.txt", pattern) for pattern in run_file_patterns())
