"""The output folder through the real entry point: `overwrite_output_dir` never loses a user's data (issue: it deleted
whatever the folder held, before the data even loaded)."""

import json
import shutil

import pytest
from bad_inputs import MAX_LENGTH, write_bad_input_dataset
from conftest import REPO_ROOT, logged_losses
from test_output_folder import earlier_run, snapshot

from vlm_recipes import sft


pytestmark = pytest.mark.e2e

RECIPE = REPO_ROOT / "recipes" / "demo" / "sft_lora.yaml"


def args(model, data, output_dir, *extra, recipe=RECIPE):
    return [str(a) for a in [recipe, "--model_name_or_path", model, "--dataset_name", data, "--output_dir", output_dir,
                             "--overwrite_output_dir", "true", "--formatter", "conversations", "--dataset_test_split",
                             "none", "--max_length", MAX_LENGTH, "--max_steps", "1", *extra]]  # fmt: skip


def stops(capsys, argv):
    with pytest.raises(SystemExit) as info:
        sft.main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err[err.rfind("error:") :]


@pytest.mark.parametrize("where", ["dataset", "dataset's parent", "recipe", "current directory"])
def test_overwrite_never_touches_the_folders_a_run_reads(tiny_qwen, tmp_path, capsys, monkeypatch, where):
    data = write_bad_input_dataset(tmp_path / "project" / "data")
    recipe = tmp_path / "project" / "recipes" / "mine.yaml"
    recipe.parent.mkdir()
    shutil.copy(RECIPE, recipe)
    monkeypatch.chdir(tmp_path)
    output_dir = {"dataset": data.parent, "dataset's parent": tmp_path / "project", "recipe": recipe.parent,
                  "current directory": "."}[where]  # fmt: skip
    before = snapshot(tmp_path)
    message = stops(capsys, args(tiny_qwen, data, output_dir, recipe=recipe))
    expected = {"dataset": "is the dataset's folder", "dataset's parent": "contains the dataset's folder",
                "recipe": "is the recipe's folder", "current directory": "is the current directory"}[where]  # fmt: skip
    assert f"output_dir {output_dir} {expected}" in message
    assert snapshot(tmp_path) == before


def test_rerunning_with_overwrite_moves_the_earlier_run_aside_only_when_the_new_one_can_start(
    tiny_qwen, tmp_path, capsys
):
    data = write_bad_input_dataset(tmp_path / "data")
    # A killed run's folder (a checkpoint, no final outputs), reached through a symbolic link as on a cluster's disk.
    killed = earlier_run(tmp_path / "disk" / "run")
    for name in ("adapter_model.safetensors", "adapter_config.json", "training_plot.png"):
        (killed / name).unlink()
    link = tmp_path / "run"
    link.symlink_to(killed, target_is_directory=True)
    before = snapshot(killed)

    # The new run's data checks fail (most rows are bad at the default max_bad_fraction): the earlier run stays as it
    # was, and the report is not written over its own.
    message = stops(capsys, args(tiny_qwen, data, link))
    assert "max_bad_fraction 5%" in message
    assert snapshot(killed) == before and not list((tmp_path / "disk").glob("run.previous-*"))

    # The checks pass: the earlier run is moved aside whole, the new run trains in the folder the link points to.
    sft.main(args(tiny_qwen, data, link, "--max_bad_fraction", "0.7"))
    out = capsys.readouterr().out
    (previous,) = (tmp_path / "disk").glob("run.previous-*")
    assert snapshot(previous) == before  # every checkpoint kept
    assert f"the earlier run in {link} was moved to {previous} (nothing was deleted" in out
    assert link.is_symlink() and len(logged_losses(link)) == 1
    assert json.loads((killed / "data_report.json").read_text())["train"]["kept"] > 0  # the new run's report
