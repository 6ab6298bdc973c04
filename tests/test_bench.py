"""`make bench`'s GPU path, run on a CPU for its wiring: a real-size-shaped Qwen2.5-VL built from a published-style
config (here the small "test" shape), plain TRL against the package with its features, bf16 LoRA. No figures are
asserted (tests never assert times); what is checked is that every run trains and reports what the table needs."""

import json
import subprocess
import sys

from conftest import REPO_ROOT


def test_gpu_benchmark_path_runs_end_to_end_on_a_cpu(tmp_path):
    options = (
        "--gpu --model_size test --rows 24 --unique_rows 6 --steps 2 --precisions bf16 --no_collator "
        # small images and batches: plain TRL scores every position against the 151,936-entry vocabulary on a CPU
        "--image_max_pixels 200704 --batch_size 4"
    ).split()
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "benchmarks" / "speed.py"), *options, "--runs", "plain TRL,all features"]
        + ["--workdir", str(tmp_path), "--results", str(tmp_path / "results")],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    reports = list((tmp_path / "results").glob("gpu_*_test.json"))
    assert len(reports) == 1 and reports[0].with_suffix(".md").exists()
    report = json.loads(reports[0].read_text())
    runs = report["runs"]["bf16"]
    for name in ("plain TRL", "all features"):
        assert "error" not in runs[name], runs[name].get("log")
        assert runs[name]["steps"] == 2 and runs[name]["real_tokens"] > 0 and runs[name]["final_loss"] > 0
        assert "mfu" in runs[name]  # computed (zero without a known accelerator peak)
    assert runs["plain TRL"]["positions"] > runs["plain TRL"]["real_tokens"]  # random batches carry padding
    assert 0 <= runs["all features"]["padding_share"] < runs["plain TRL"]["padding_share"]
    # The model really has the published layout, not the tiny one: its config says so.
    config = json.loads((tmp_path / "qwen2_5_vl_test_random" / "config.json").read_text())
    assert config["text_config"]["vocab_size"] == 151936 and config["vision_config"]["out_hidden_size"] == 128
    assert any(line.startswith("| bf16 plain TRL") for line in report["table"])
