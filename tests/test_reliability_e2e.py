"""Reliability through the real entry points, on the tiny model: a killed run resumes from its last complete checkpoint,
bad inputs are skipped and reported while the valid rows train, a NaN loss stops the run, preflight reports."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml
from bad_inputs import FIXED, MAX_LENGTH, REJECTED, ROWS, write_bad_input_dataset
from conftest import REPO_ROOT, assert_ok, run_in_process, run_module

from vlm_recipes import preflight, sft


pytestmark = pytest.mark.e2e

RECIPE = str(REPO_ROOT / "recipes" / "demo" / "sft_lora.yaml")


def recipe_args(model, data, output_dir, *extra):
    return [
        RECIPE, "--model_name_or_path", model, "--dataset_name", data, "--output_dir", output_dir,
        "--overwrite_output_dir", "false", "--per_device_train_batch_size", "2", "--logging_steps", "1",
        "--eval_strategy", "no", *extra,
    ]  # fmt: skip


def logged_steps(output_dir):
    log = json.loads((output_dir / "training_log.json").read_text())
    return [entry["step"] for entry in log if "loss" in entry]


def test_killed_run_resumes_from_the_last_complete_checkpoint(tiny_qwen, chartqa_dir, tmp_path):
    output_dir = tmp_path / "run"
    # One epoch of 16 rows at batch 2: an uninterrupted run ends at step 8.
    args = recipe_args(tiny_qwen, chartqa_dir, output_dir, "--max_train_samples", "16", "--max_steps", "-1",
                       "--num_train_epochs", "1", "--save_strategy", "steps", "--save_steps", "2")  # fmt: skip
    command = [sys.executable, "-m", "vlm_recipes.sft", *map(str, args)]
    process = subprocess.Popen(command, cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    marker = output_dir / "checkpoint-4" / "checkpoint_complete.json"
    deadline = time.monotonic() + 300
    while not marker.exists():
        assert process.poll() is None, f"the run ended before checkpoint-4:\n{process.stderr.read()[-4000:]}"
        assert time.monotonic() < deadline
        time.sleep(0.02)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert not (output_dir / "adapter_model.safetensors").exists()  # killed mid-run: no final outputs

    # A kill during a save leaves a checkpoint folder with part of its files and no marker: make one past the others.
    complete = sorted(int(p.name.split("-")[1]) for p in output_dir.glob("checkpoint-*") if (p / marker.name).exists())
    half_written = output_dir / f"checkpoint-{complete[-1] + 1}"
    half_written.mkdir(exist_ok=True)
    (half_written / "adapter_model.safetensors").write_bytes(b"\0" * 100)
    assert complete[-1] < 8

    result = run_module("vlm_recipes.sft", *args, "--resume_from_checkpoint", "true")
    assert_ok(result)
    assert f"Resuming from the last complete checkpoint: {output_dir / f'checkpoint-{complete[-1]}'}" in result.stdout
    assert f"{half_written.name} is incomplete" in result.stdout
    assert (output_dir / f"incomplete-{half_written.name}" / "adapter_model.safetensors").stat().st_size == 100
    state = json.loads((output_dir / "checkpoint-8" / "trainer_state.json").read_text())
    assert state["global_step"] == 8  # the same final step as an uninterrupted run
    assert logged_steps(output_dir) == list(range(1, 9))  # every step once: resumed, not restarted or repeated
    assert (output_dir / "checkpoint-8" / "checkpoint_complete.json").exists()
    assert (output_dir / "adapter_model.safetensors").exists()


def test_bad_inputs_are_skipped_and_reported_while_valid_rows_train(tiny_qwen, tmp_path, capsys):
    data = write_bad_input_dataset(tmp_path / "data")
    output_dir = tmp_path / "run"
    args = recipe_args(tiny_qwen, data, output_dir, "--formatter", "conversations", "--dataset_test_split", "none",
                       "--max_length", MAX_LENGTH, "--max_steps", "3")  # fmt: skip
    # First with the default max_bad_fraction (5%): the run stops on the bad rows before training, leaving its report.
    with pytest.raises(SystemExit) as info:
        sft.main([str(arg) for arg in args])
    assert info.value.code == 2 and "max_bad_fraction 5%" in capsys.readouterr().err
    assert [path.name for path in output_dir.iterdir()] == ["data_report.json"]

    # The same command with the limit raised: the stopped run's folder is reused, not refused as a previous run's.
    result = run_in_process("vlm_recipes.sft", *args, "--max_bad_fraction", "0.7", capsys=capsys)
    assert_ok(result)
    assert "Traceback" not in result.stderr
    assert f"output_dir {output_dir} holds only what a run writes before training (data_report.json)" in result.stdout
    assert f"train: {ROWS - len(REJECTED)} of {ROWS} rows kept, {len(REJECTED)} rejected ({data})" in result.stdout
    report_text = (output_dir / "data_report.json").read_text()
    # Shared when the run is pushed: no path of this machine, only paths relative to the data folder, and a count
    # of the rows that read images from outside it.
    assert str(tmp_path) not in report_text and "/tmp" not in report_text
    assert "1  read images from outside the data folder (e.g. line 26)" in result.stdout
    report = json.loads(report_text)["train"]
    assert report["source"] == "bad_inputs.jsonl"
    assert report["rows_with_images_outside_the_data_folder"] == {"count": 1, "examples": ["line 26"]}
    assert report["rejected_by_reason"]["image file not found"]["first_message"].startswith(
        "bad_inputs.jsonl, line 9, column 'images': image 0 was not found at missing.png"
    )
    reported = {e: reason for reason, d in report["rejected_by_reason"].items() for e in d["examples"]}
    assert reported == {f"line {line}": reason for line, reason in REJECTED.items()}
    assert {kind for kind in report["fixed_by_kind"]} == set(FIXED.values())
    logged = [e for e in json.loads((output_dir / "training_log.json").read_text()) if "loss" in e]
    assert len(logged) == 3 and all(0 < e["loss"] < 100 for e in logged)  # trained, finite
    assert all(0 < e["grad_norm"] < float("inf") for e in logged)  # gradient norms are logged with every loss


def test_nan_loss_stops_the_run_naming_the_step_and_last_checkpoint(tiny_qwen, chartqa_dir, tmp_path, capsys):
    output_dir = tmp_path / "run"
    # A learning rate of 1e30 turns the weights to inf after the first step: the second loss is NaN.
    args = recipe_args(tiny_qwen, chartqa_dir, output_dir, "--max_train_samples", "8", "--max_steps", "4",
                       "--learning_rate", "1e30", "--save_strategy", "steps", "--save_steps", "1")  # fmt: skip
    with pytest.raises(SystemExit) as info:
        sft.main([str(arg) for arg in args])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "error: Training stopped at step 2: the loss was nan" in err
    # checkpoint-1's weights (about 1e30 after one step: finite, but they overflow) gave that NaN: resuming from it
    # would fail again at step 2, so it is not named as the place to continue from, and resume moves it aside.
    assert "checkpoint-1 holds the weights that gave it" in err
    assert "No complete checkpoint with finite weights was saved before it" in err
    assert (output_dir / "checkpoint-1" / "checkpoint_nonfinite.json").is_file()
    assert not (output_dir / "checkpoint-2").exists() and not (output_dir / "adapter_model.safetensors").exists()
    assert logged_steps(output_dir) == [1]


def test_resume_at_max_steps_saves_without_training_and_a_changed_learning_rate_applies(
    tiny_qwen, chartqa_dir, tmp_path, capsys
):
    output_dir = tmp_path / "run"
    args = recipe_args(tiny_qwen, chartqa_dir, output_dir, "--max_train_samples", "8", "--max_steps", "2",
                       "--learning_rate", "1e-3", "--save_strategy", "steps", "--save_steps", "1")  # fmt: skip
    sft.main([str(arg) for arg in args])
    # Killed after its last checkpoint (at max_steps), before the final save: only the checkpoints and the report.
    for path in output_dir.iterdir():
        if not path.name.startswith("checkpoint-") and path.name != "data_report.json":
            path.unlink()
    capsys.readouterr()

    sft.main([str(arg) for arg in [*args, "--resume_from_checkpoint", "true"]])
    out = capsys.readouterr().out
    assert "checkpoint-2 is at step 2, the run's max_steps: saving the final outputs from it" in out
    assert logged_steps(output_dir) == [1, 2]  # no step 3
    assert not (output_dir / "checkpoint-3").exists()
    from safetensors.torch import load_file

    final = load_file(output_dir / "adapter_model.safetensors")
    saved = load_file(output_dir / "checkpoint-2" / "adapter_model.safetensors")
    assert final.keys() == saved.keys() and all(torch.equal(final[k], saved[k]) for k in final)
    assert (output_dir / "recipe.yaml").is_file() and (output_dir / "training_plot.png").is_file()

    # Continued for one more step with a lower learning rate: the recipe's rate trains, the log and recipe.yaml agree.
    sft.main(
        [str(a) for a in [*args, "--max_steps", "3", "--learning_rate", "2e-4", "--resume_from_checkpoint", "true"]]
    )
    out = capsys.readouterr().out
    assert "which differs from the checkpoint's: learning_rate 0.001 -> 0.0002. Applied from step 3" in out
    log = json.loads((output_dir / "training_log.json").read_text())
    assert [(e["step"], e["learning_rate"]) for e in log if "loss" in e] == [(1, 1e-3), (2, 1e-3), (3, 2e-4)]
    assert yaml.safe_load((output_dir / "recipe.yaml").read_text())["learning_rate"] == 2e-4


def test_a_run_that_does_not_learn_is_told_why(tiny_qwen, chartqa_dir, tmp_path, caplog):
    args = recipe_args(tiny_qwen, chartqa_dir, tmp_path / "run", "--max_train_samples", "8", "--max_steps", "4",
                       "--learning_rate", "1e6")  # fmt: skip
    sft.main([str(arg) for arg in args])
    warnings = [record.getMessage() for record in caplog.records if "not learning" in record.getMessage()]
    assert len(warnings) == 1 and "learning_rate 1e+06 is far above usual fine-tuning rates" in warnings[0]
    log = json.loads((tmp_path / "run" / "training_log.json").read_text())
    assert [e["grad_norm"] for e in log if "loss" in e][1:] == [0.0, 0.0, 0.0]


def test_preflight_reports_lengths_padding_and_memory(tiny_qwen, chartqa_dir, tmp_path, capsys):
    report_file = tmp_path / "preflight.json"
    output_dir = tmp_path / "never-written"
    preflight.main(
        [str(a) for a in recipe_args(tiny_qwen, chartqa_dir, output_dir, "--preflight_report", report_file)]
    )
    out = capsys.readouterr().out
    assert "Tokens per row" in out and "p50" in out and "p95" in out
    assert "under random batching" in out and "Token counts checked against TRL's collator on 8 rows: 8 exact" in out
    assert "an ESTIMATE from the model config (no weights loaded)" in out and "Preflight passed" in out
    result = json.loads(report_file.read_text())
    train = result["lengths"]["train"]
    assert (train["rows"], result["lengths"]["eval"]["rows"]) == (48, 16)
    assert 0 < train["tokens"]["p50"] <= train["tokens"]["p95"] <= train["tokens"]["max"]
    assert 0 <= train["padding_share"]["grouped_by_length"] < train["padding_share"]["random_batching"] < 1
    memory = result["memory_estimate_bytes"]
    assert memory["is_estimate"] and memory["peak_with_checkpointing"] < memory["peak_without_checkpointing"]
    assert not output_dir.exists()  # preflight writes nothing into the run's output_dir


def test_preflight_says_when_training_would_stop(tiny_qwen, tmp_path, capsys):
    data = write_bad_input_dataset(tmp_path / "data")
    args = recipe_args(tiny_qwen, data, tmp_path / "out", "--formatter", "conversations", "--dataset_test_split",
                       "none", "--max_length", MAX_LENGTH)  # fmt: skip
    with pytest.raises(SystemExit) as info:
        preflight.main([str(a) for a in args])
    assert info.value.code == 2
    captured = capsys.readouterr()
    assert f"train: {ROWS - len(REJECTED)} of {ROWS} rows kept, {len(REJECTED)} rejected" in captured.out
    assert "error: training would stop here" in captured.err and "max_bad_fraction 5%" in captured.err
