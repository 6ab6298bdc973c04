"""`make bench-gpu` (benchmarks/bench_gpu.sh -> benchmarks/speed.py --gpu), run on a CPU for its wiring: a Qwen2.5-VL
built from a published-style config (here the small "test" shape), plain TRL against the package with its features,
LoRA. No figures are asserted (tests never assert times); what is checked is that the one command the GPU
machine runs installs nothing when no wheels are carried, trains every run and writes what the results file needs."""

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO_ROOT


@pytest.mark.extended  # about 3 minutes: make test-extended runs it
def test_gpu_check_command_runs_end_to_end_on_a_cpu(tmp_path):
    options = (
        "--model_size test --rows 24 --unique_rows 6 --steps 2 --warmup_steps 1 --time_budget_minutes 60 "
        # fp32: this path's bf16 is the GPU's (a CPU without bf16 units runs it many times slower); small images and
        # batches: plain TRL scores every position against the 151,936-entry vocabulary on a CPU
        "--precisions fp32 --image_max_pixels 50176 --batch_size 2"
    ).split()
    result = subprocess.run(
        ["bash", str(REPO_ROOT / "benchmarks" / "bench_gpu.sh"), *options]
        + ["--workdir", str(tmp_path), "--results", str(tmp_path / "results")],
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "PYTHON": sys.executable, "WHEELS": str(tmp_path / "no_wheels")},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-4000:]
    assert "No wheels in" in result.stdout  # nothing installed, nothing fetched
    report = json.loads((tmp_path / "results" / "gpu.json").read_text())
    runs = report["runs"]["fp32"]
    assert list(runs) == ["plain TRL", "all features", "token-budget packing"]  # the GPU check's default comparison
    for name in runs:
        assert "error" not in runs[name], runs[name].get("log")
        assert runs[name]["steps"] == 2 and runs[name]["real_tokens"] > 0 and runs[name]["final_loss"] > 0
        assert "mfu" in runs[name]  # computed (zero without a known accelerator peak)
        assert len(runs[name]["per_step"]) == 2 and runs[name]["per_step"][0]["patches"] > 0
    assert runs["plain TRL"]["positions"] > runs["plain TRL"]["real_tokens"]  # random batches carry padding
    assert 0 <= runs["all features"]["padding_share"] < runs["plain TRL"]["padding_share"]
    packed = runs["token-budget packing"]
    assert (
        packed["padding_share"] == 0
        and max(step["real"] for step in packed["per_step"]) <= report["max_tokens_per_batch"]
    )
    # The model really has the published layout, not the tiny one: its config says so.
    config = json.loads((tmp_path / "qwen2_5_vl_test_random" / "config.json").read_text())
    assert config["text_config"]["vocab_size"] == 151936 and config["vision_config"]["out_hidden_size"] == 128
    assert config["text_config"]["rms_norm_eps"] == 1e-6
    markdown = (tmp_path / "results" / "gpu.md").read_text()
    assert markdown.startswith("# GPU speed:") and "| fp32 plain TRL" in markdown
    assert "target, fp32: all features" in markdown
