"""The output folder of a run that stopped before training (too many bad rows, a recipe error) is reused by the rerun;
anything a run writes once training has started still makes the folder refused."""

import pytest

from vlm_recipes.errors import RecipeError
from vlm_recipes.training.outputs import prepare_output_dir


def stopped_run(folder, *, dpo_sft_copy=False):
    """What a run writes before training: the data report; DPO with `reference: sft_merged`, its SFT adapter copy."""
    folder.mkdir()
    (folder / "data_report.json").write_text("{}")
    if dpo_sft_copy:
        (folder / "sft_adapter").mkdir()
        for name in ("adapter_config.json", "adapter_model.safetensors"):
            (folder / "sft_adapter" / name).write_text("x")
    return folder


@pytest.mark.parametrize("dpo_sft_copy", [False, True])
def test_a_folder_with_only_pre_training_files_is_reused_and_cleared(tmp_path, capsys, dpo_sft_copy):
    folder = stopped_run(tmp_path / "run", dpo_sft_copy=dpo_sft_copy)
    # Every process checks before the main process clears it (training.run): none refuses it.
    assert prepare_output_dir(str(folder), overwrite=False, resume=None, is_main_process=False) == folder
    assert any(folder.iterdir()) and capsys.readouterr().out == ""
    assert prepare_output_dir(str(folder), overwrite=False, resume=None) == folder
    assert list(folder.iterdir()) == []  # the report (and SFT copy) are written again by the rerun, never stale
    assert "holds only what a run writes before training" in capsys.readouterr().out


@pytest.mark.parametrize(
    "extra", ["checkpoint-1/trainer_state.json", "training_log.json", "runs/events", "sft_adapter/optimizer.pt"]
)
def test_anything_else_is_still_refused(tmp_path, extra):
    folder = stopped_run(tmp_path / "run", dpo_sft_copy=True)
    (folder / extra).parent.mkdir(exist_ok=True)
    (folder / extra).write_text("x")
    with pytest.raises(RecipeError, match="already holds files"):
        prepare_output_dir(str(folder), overwrite=False, resume=None)
    assert (folder / "data_report.json").is_file() and (folder / extra).is_file()  # nothing changed
