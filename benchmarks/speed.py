"""The tiny-model PLUMBING CHECK of `make bench`, and the GPU check of `make bench-gpu`.

    make bench                                   # CPU: the real-width headline (real_width.py), then this table
    python benchmarks/speed.py                   # CPU: this table alone (tiny Qwen2.5-VL, vocabulary 151,936)
    make bench-gpu                               # GPU: Qwen2.5-VL-7B from its published config, bf16 LoRA and QLoRA
    python benchmarks/speed.py --gpu --model_size test   # the GPU path's wiring, on a CPU (tests/test_bench.py)

The same short SFT job runs as plain TRL runs it, then with the package's speed features. Plain TRL is `SFTTrainer`
with TRL's own vision collator, random batching and its default loss, on the same model, rows, batch size, LoRA
settings (r=16 on every language-model projection) and seed; it is built here with TRL alone. The other runs go through
`vlm_recipes.sft.build_trainer`, the entry point's own path, with the features switched by their recipe fields. The
data: generated ChartQA-like charts whose sizes spread like the real dataset's (300-1600 x 200-1200 px), so
image-token counts vary realistically under the real Qwen2.5-VL resize rule.

On a CPU the model is the tiny Qwen2.5-VL with a real-size vocabulary: its LM head is nearly all of its compute, so its
ratios say that each feature works end to end, not how fast a real model trains (benchmarks/real_width.py measures
that). On a GPU the model is Qwen2.5-VL-3B or -7B built from the published config (benchmarks/qwen_shapes.py) with
random weights (speed and memory do not depend on the weights' values) and the tiny tokenizer (text is a few dozen
tokens of a row; the image tokens, which dominate, follow the real processor rule).

Columns: padding share (padded positions / all positions fed to the model), tokens/s (non-padding tokens per second
of training, data loading and optimizer included), step time ratio (this run's mean step time / plain TRL's: the
runs train on different rows when batching differs, so compare tokens/s first), peak memory (CPU: the process's peak
RSS and its rise over the state before the first step; GPU: `torch.cuda.max_memory_allocated`), final loss (mean of
the last logged losses: similar values mean the features do not change what is learned) and, on a GPU, model FLOPs
utilisation. Each run is its own process, so its peak memory is its own.
"""

import argparse
import importlib.util
import json
import os
import resource
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "benchmarks"))

from qwen_shapes import SIZES  # noqa: E402


# Each run: (name, trainer kind, feature switches). "trl" is plain TRL; "vlm" is this package with these fields.
FEATURES_OFF = {
    "train_sampling_strategy": "random",
    "loss_on_labels_only": "false",
    "fast_collator": "false",
    "padding_free": "false",
}
RUNS = {
    "plain TRL": ("trl", {}),
    "+ length grouping": ("vlm", {**FEATURES_OFF, "train_sampling_strategy": "group_by_length"}),
    "+ loss on labels only": ("vlm", {**FEATURES_OFF, "loss_on_labels_only": "true"}),
    "+ padding-free": ("vlm", {**FEATURES_OFF, "padding_free": "true"}),
    "+ fast collator": ("vlm", {**FEATURES_OFF, "fast_collator": "true"}),
    "all features": ("vlm", {}),  # the package's defaults, plus padding-free
    # rows packed first-fit-decreasing to a token budget (`token_budget`: a batch's tokens on average), no padding
    "token-budget packing": ("vlm", {"max_tokens_per_batch": "{max_tokens_per_batch}"}),
}
GPU_RUNS = "plain TRL,all features,token-budget packing"
ALL_WITH_PADDING_FREE = {"padding_free": "true"}

PIXEL_SETTINGS = {"max_pixels 12,845,056 (the checkpoint's)": 12845056, "max_pixels 1,003,520": 1003520}
TINY_VOCAB = 151936  # the real Qwen2.5-VL-3B vocabulary: the tiny model's output layer is as wide as a real one
# Dense bf16 FLOP/s, the vendors' figures (SXM parts), for model FLOPs utilisation.
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12}
GPU_TIME_BUDGET_MINUTES = 7.0  # make bench-gpu: no run starts that would end past this (the check has 8 minutes)


@dataclass
class Settings:
    gpu: bool
    rows: int
    unique_rows: int
    steps: int
    warmup_steps: int
    batch_size: int
    padding_batch_size: int
    image_max_pixels: int
    model_size: str
    workdir: Path
    results: Path
    collator: bool = True
    runs: list[str] = field(default_factory=list)
    precisions: list[str] = field(default_factory=list)
    time_budget_minutes: float | None = None


# ---------------------------------------------------------------------------------------------------------------------
# Data and models


def chartqa_like_dataset(workdir: Path, rows: int, unique_rows: int) -> Path:
    """`rows` ChartQA-schema rows of charts with realistic sizes (`unique_rows` drawn, repeated), as parquet."""
    from datasets import concatenate_datasets, load_dataset

    from vlm_recipes.data.synthetic import REALISTIC_SIZES, chartqa_features, make_chartqa_rows, save_splits

    folder = workdir / f"chartqa_{rows}"
    if (folder / "data" / "train-00000-of-00001.parquet").exists():
        return folder
    unique = save_splits(
        workdir / f"unique_{unique_rows}",
        {"train": make_chartqa_rows(unique_rows, seed=0, sizes=REALISTIC_SIZES)},
        chartqa_features(),
    )
    base = load_dataset(str(unique), split="train")
    repeated = concatenate_datasets([base] * -(-rows // len(base))).select(range(rows)).shuffle(seed=0)
    (folder / "data").mkdir(parents=True, exist_ok=True)
    repeated.to_parquet(str(folder / "data" / "train-00000-of-00001.parquet"))
    return folder


def tiny_model(workdir: Path) -> Path:
    """The package's tiny Qwen2.5-VL with a real-size vocabulary: the output layer is as wide as the real model's."""
    from vlm_recipes.testing.tiny_models import build_tiny_model

    return build_tiny_model("qwen2_5_vl", workdir / "tiny_qwen2_5_vl_151936", vocab_size=TINY_VOCAB)


def real_size_model(workdir: Path, size: str) -> Path:
    """Qwen2.5-VL of the published `size` with random weights (bf16, built on the GPU when there is one), saved once
    as an ordinary model folder with the tiny model's tokenizer and processor."""
    import torch
    from qwen_shapes import save_real_width_model

    device = "cuda" if torch.cuda.is_available() else "cpu"
    return save_real_width_model(tiny_model(workdir), workdir / f"qwen2_5_vl_{size}_random", size, device=device)


def formatted_rows(data: Path) -> Any:
    """The dataset's rows as the package formats them (messages and images), the same for every run."""
    from vlm_recipes.configs import DataArguments
    from vlm_recipes.data.loading import load_datasets

    data_args = DataArguments(dataset_name=str(data), formatter="chartqa", dataset_test_split=None)
    return load_datasets(data_args, seed=0, need_eval=False, task="sft")[0]


def pixel_settings(run_max_pixels: int) -> dict[str, int]:
    """The image-size settings the padding figures are counted for: the checkpoint's, 1M, and the runs' own."""
    settings = dict(PIXEL_SETTINGS)
    if run_max_pixels not in settings.values():
        settings[f"max_pixels {run_max_pixels:,} (the runs')"] = run_max_pixels
    return settings


def row_token_counts(rows: Any, processor: Any) -> list[Any]:
    """Each formatted row's `TokenCount` (text and image tokens, as TRL's collator feeds them), from image headers."""
    from vlm_recipes.data.images import image_column, with_image_decoding
    from vlm_recipes.data.lengths import TokenCounter

    undecoded = with_image_decoding(rows, image_column(rows), decode=False)
    counter = TokenCounter(processor)
    return [counter.count_row(row) for row in undecoded]


def padding_shares(data: Path, model: Path, batch_size: int, pixel_settings: dict[str, int]) -> dict[str, Any]:
    """Padding at `batch_size` under random batching and under the package's grouping, per image-size setting."""
    from transformers import AutoProcessor

    from vlm_recipes.data.lengths import padding_share, random_batching_padding_share
    from vlm_recipes.training.sampling import LengthGroupedSampler

    rows = formatted_rows(data)
    shares = {}
    for label, max_pixels in pixel_settings.items():
        counts = row_token_counts(rows, AutoProcessor.from_pretrained(model, max_pixels=max_pixels))
        lengths = [count.total for count in counts]
        shares[label] = {
            "max_pixels": max_pixels,
            "rows": len(lengths),
            "random": random_batching_padding_share(lengths, batch_size),
            "grouped": padding_share(lengths, batch_size, LengthGroupedSampler(lengths, batch_size, seed=0).order()),
            "mean_tokens": sum(lengths) / len(lengths),
            "max_tokens": max(lengths),
            "mean_image_tokens": sum(count.image for count in counts) / len(counts),
        }
    return shares


def token_budget(mean_tokens: float, longest: int, batch_size: int, multiple: int = 64) -> int:
    """The packing budget that gives a step as many real tokens as a batch of `batch_size` rows on average (rounded
    up to `multiple`), and at least the longest row."""
    return int(max(longest, -(-int(batch_size * mean_tokens) // multiple) * multiple))  # a whole token count


# ---------------------------------------------------------------------------------------------------------------------
# One run (in its own process)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def package_trainer(spec: dict[str, Any]) -> Any:
    import torch

    from vlm_recipes.recipe import parse_recipe
    from vlm_recipes.sft import SFTRecipe, build_trainer

    argv = [
        "--model_name_or_path", spec["model"], "--dataset_name", spec["data"], "--formatter", "chartqa",
        "--dataset_test_split", "none", "--eval_strategy", "no", "--output_dir", spec["output_dir"],
        "--overwrite_output_dir", "true", "--tuning_strategy", spec["strategy"], "--lora_r", "16",
        "--lora_alpha", "32", "--lora_dropout", "0", "--per_device_train_batch_size", str(spec["batch_size"]),
        "--max_steps", str(spec["steps"]), "--learning_rate", "1e-4", "--lr_scheduler_type", "constant",
        "--logging_steps", "1", "--save_strategy", "no", "--report_to", "none", "--seed", "0",
        "--check_data", "false", "--image_max_pixels", str(spec["image_max_pixels"]), "--dtype", spec["dtype"],
        "--bf16", str(torch.cuda.is_available()).lower(), "--gradient_checkpointing", "true",
    ]  # fmt: skip
    for name, value in spec["features"].items():
        argv += [f"--{name}", value]
    return build_trainer(parse_recipe(SFTRecipe, argv))


def plain_trl_trainer(spec: dict[str, Any]) -> Any:
    """What a user of TRL alone writes: SFTTrainer, SFTConfig (TRL's defaults), a peft LoraConfig."""
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForImageTextToText, AutoProcessor
    from trl import SFTConfig, SFTTrainer

    from vlm_recipes.configs import ModelArguments
    from vlm_recipes.modeling.base_model import quantization_config
    from vlm_recipes.modeling.families import FAMILIES

    family = FAMILIES["qwen2_5_vl"]
    train = formatted_rows(Path(spec["data"]))
    processor = AutoProcessor.from_pretrained(spec["model"], max_pixels=spec["image_max_pixels"])
    four_bit = spec["strategy"] == "qlora"
    cuda = torch.cuda.is_available()  # False when the GPU path's wiring is checked on a CPU
    model_args = ModelArguments(model_name_or_path=spec["model"], load_in_4bit=four_bit, dtype=spec["dtype"])
    model = AutoModelForImageTextToText.from_pretrained(
        spec["model"],
        dtype=getattr(torch, spec["dtype"]),
        quantization_config=quantization_config(model_args, family),  # the same 4-bit settings as the package's
        device_map=({"": 0} if cuda else "cpu") if four_bit else None,
    )
    args = SFTConfig(
        output_dir=spec["output_dir"],
        per_device_train_batch_size=spec["batch_size"],
        max_steps=spec["steps"],
        learning_rate=1e-4,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        seed=0,
        assistant_only_loss=True,
        max_length=None,  # TRL's 1024 would cut image tokens
        bf16=cuda,
        use_cpu=not cuda,
        gradient_checkpointing=True,
    )
    peft_config = LoraConfig(
        r=16, lora_alpha=32, lora_dropout=0.0, target_modules=family.lora_target_regex(), task_type="CAUSAL_LM"
    )
    return SFTTrainer(model=model, args=args, train_dataset=train, processing_class=processor, peft_config=peft_config)


def batch_counts(inputs: dict[str, Any], packs_rows: bool) -> dict[str, int]:
    """What a training batch costs the model: its rows, the positions fed (padded, or packed into one sequence), the
    real tokens, the attention score elements (rows x longest^2 padded; packed, the sum of each row's length^2: the
    trainers attend one packed row at a time, `modeling.segment_attention`, or with flash-attention's varlen kernels),
    the positions the LM head can score (the next-token labels that are not -100) and the vision patches."""
    mask = inputs["attention_mask"]
    lengths = mask.sum(dim=1)
    real = int(lengths.sum())
    rows, longest = mask.shape
    labels = inputs.get("labels")
    return {
        "rows": int(rows),
        "longest": int(longest),
        "real": real,
        "positions": real if packs_rows else int(rows * longest),
        "score_elements": int((lengths**2).sum()) if packs_rows else int(rows * longest * longest),
        "labelled": int((labels[:, 1:] != -100).sum()) if labels is not None else 0,
        "patches": int(inputs["pixel_values"].shape[0]) if inputs.get("pixel_values") is not None else 0,
    }


def measure(trainer: Any, warmup_steps: int, clock: Any = time.perf_counter) -> dict[str, Any]:
    """Train and time it: per step, the time since the previous step ended (data loading, forward, backward and
    optimizer), the real tokens and the positions fed to the model. `per_step` splits each step into data (until the
    loss is computed), forward + backward (`training_step`) and the rest (clipping, optimizer, scheduler, logging).
    `clock` is wall time by default; `time.process_time` gives the process's CPU seconds, which other work on a shared
    machine does not inflate (benchmarks/real_width.py's check)."""
    import torch
    from transformers import TrainerCallback

    from vlm_recipes.modeling.segment_attention import language_config

    gpu = torch.cuda.is_available()
    fed: list[dict[str, int]] = []
    marks: dict[str, Any] = {"ends": [], "loss_starts": [], "training_step_ends": []}
    original_compute_loss = trainer.compute_loss
    original_training_step = trainer.training_step

    def counting_compute_loss(model, inputs, *args, **kwargs):
        if model.training:
            if gpu:
                torch.cuda.synchronize()
            marks["loss_starts"].append(clock())
            fed.append(batch_counts(inputs, getattr(trainer, "packs_rows", False)))
        return original_compute_loss(model, inputs, *args, **kwargs)

    def timed_training_step(*args, **kwargs):
        loss = original_training_step(*args, **kwargs)
        if gpu:
            torch.cuda.synchronize()
        marks["training_step_ends"].append(clock())
        return loss

    trainer.compute_loss = counting_compute_loss
    trainer.training_step = timed_training_step

    class Clock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            if gpu:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            marks["rss_start"] = _rss_bytes()
            marks["begin"] = clock()

        def on_step_end(self, args, state, control, **kwargs):
            if gpu:
                torch.cuda.synchronize()
            marks["ends"].append(clock())

    trainer.add_callback(Clock())
    trainer.train()
    ends = [marks["begin"], *marks["ends"]]
    step_seconds = [later - earlier for earlier, later in zip(ends, ends[1:])]
    per_step = []
    if trainer.args.gradient_accumulation_steps == 1 and len(marks["loss_starts"]) == len(step_seconds):
        for index, counts in enumerate(fed):
            loss_start, step_end = marks["loss_starts"][index], marks["training_step_ends"][index]
            per_step.append(
                {
                    **counts,
                    "seconds": step_seconds[index],
                    "data_seconds": loss_start - ends[index],
                    "forward_backward_seconds": step_end - loss_start,
                    "optimizer_seconds": ends[index + 1] - step_end,
                }
            )
    timed = slice(warmup_steps, len(step_seconds))
    real = sum(counts["real"] for counts in fed[timed])
    positions = sum(counts["positions"] for counts in fed[timed])
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    result = {
        "steps": len(step_seconds),
        "timed_steps": len(step_seconds[timed]),
        "mean_step_seconds": sum(step_seconds[timed]) / max(1, len(step_seconds[timed])),
        "tokens_per_second": real / max(1e-9, sum(step_seconds[timed])),
        "real_tokens": real,
        "positions": positions,
        "padding_share": 1 - real / positions if positions else 0.0,
        "final_loss": sum(losses[-3:]) / max(1, len(losses[-3:])),
        "first_loss": losses[0] if losses else None,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "rss_start_bytes": marks["rss_start"],
        "per_step": per_step,
        "attention": language_config(trainer.model)._attn_implementation,  # the language model's, as trained
    }
    if gpu:
        result["peak_gpu_bytes"] = torch.cuda.max_memory_allocated()
        result["gpu"] = torch.cuda.get_device_name()
    return result


def model_flops_per_token(model_folder: str, tokens_per_row: float, image_tokens_per_row: float) -> float:
    """Training FLOPs per (text + image) token: the language model by TRL's count (forward + backward = 3 forwards,
    attention included) and the frozen vision tower's forward on the 4 patches behind every image token."""
    from transformers import AutoConfig
    from trl.trainer.utils import compute_flops_per_token

    config = AutoConfig.from_pretrained(model_folder)
    vision = config.vision_config
    vision_params = vision.depth * (4 * vision.hidden_size**2 + 3 * vision.hidden_size * vision.intermediate_size)
    llm = compute_flops_per_token(config.text_config, int(tokens_per_row))
    patches_per_token = vision.spatial_merge_size**2
    return llm + 2 * vision_params * patches_per_token * image_tokens_per_row / max(1.0, tokens_per_row)


def run_child(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    from vlm_recipes.console import setup_console

    setup_console()
    import torch

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    trainer = plain_trl_trainer(spec) if spec["kind"] == "trl" else package_trainer(spec)
    clock = time.process_time if spec.get("clock") == "cpu" else time.perf_counter
    result = measure(trainer, spec["warmup_steps"], clock)
    Path(spec["result"]).write_text(json.dumps(result, indent=2))


# ---------------------------------------------------------------------------------------------------------------------
# The table


def _gib(value: float) -> str:
    return f"{value / 2**30:.2f} GiB"


def table(results: dict[str, dict[str, Any]], gpu: bool) -> list[str]:
    header = ["run", "padding share", "tokens/s", "vs plain", "step time ratio", "peak memory"]
    header += ["MFU"] if gpu else ["training rise"]
    header += ["final loss"]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for precision, runs in results.items():
        base = runs.get("plain TRL")
        for name, result in runs.items():
            if "error" in result:
                lines.append(f"| {precision} {name} | failed: {result['error'][:80]} |")
                continue
            speed = result["tokens_per_second"] / base["tokens_per_second"] if base and "error" not in base else None
            ratio = result["mean_step_seconds"] / base["mean_step_seconds"] if base and "error" not in base else None
            memory_key = "peak_gpu_bytes" if "peak_gpu_bytes" in result else "peak_rss_bytes"
            memory = result[memory_key]
            cells = [
                f"{precision} {name}".strip(),
                f"{result['padding_share']:.1%}",
                f"{result['tokens_per_second']:,.0f}",
                f"{speed:.2f}x" if speed else "",
                f"{ratio:.2f}" if ratio else "",
                _gib(memory) + (f" ({memory / base[memory_key]:.2f}x)" if base and "error" not in base else ""),
            ]  # fmt: skip
            if gpu:
                cells.append(f"{result.get('mfu', 0):.1%}")
            else:
                rise = result["peak_rss_bytes"] - result["rss_start_bytes"]
                base_rise = base["peak_rss_bytes"] - base["rss_start_bytes"] if base and "error" not in base else None
                cells.append(_gib(rise) + (f" ({rise / base_rise:.2f}x)" if base_rise else ""))
            cells.append(f"{result['final_loss']:.4f}")
            lines.append("| " + " | ".join(cells) + " |")
    return lines


def gpu_targets(results: dict[str, dict[str, Any]]) -> list[str]:
    """issue 18's GPU target, per precision: all features at least 1.5x plain TRL's tokens/s at no more than its peak
    memory. Printed, never asserted."""
    lines = []
    for precision, runs in results.items():
        base, ours = runs.get("plain TRL", {}), runs.get("all features", {})
        if not base or not ours or "error" in base or "error" in ours:
            continue
        speed = ours["tokens_per_second"] / base["tokens_per_second"]
        memory = ours.get("peak_gpu_bytes", ours["peak_rss_bytes"]) / base.get(
            "peak_gpu_bytes", base["peak_rss_bytes"]
        )
        met = speed >= 1.5 and memory <= 1.0
        lines.append(
            f"- target, {precision}: all features {speed:.2f}x plain TRL's tokens/s (>= 1.5x) at {memory:.2f}x its "
            f"peak memory (<= 1.00x): {'MET' if met else 'NOT MET'}"
        )
    return lines


# ---------------------------------------------------------------------------------------------------------------------
# The whole benchmark


def run_all(settings: Settings) -> dict[str, Any]:
    import torch

    started = time.perf_counter()
    settings.workdir.mkdir(parents=True, exist_ok=True)
    data = chartqa_like_dataset(settings.workdir, settings.rows, settings.unique_rows)
    model = real_size_model(settings.workdir, settings.model_size) if settings.gpu else tiny_model(settings.workdir)
    print(f"data and model ready ({time.perf_counter() - started:.0f} s)", flush=True)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    flash_attention = importlib.util.find_spec("flash_attn") is not None
    report: dict[str, Any] = {
        "device": device,
        "flash_attention": flash_attention,
        "gpu_mode": settings.gpu,
        "model": f"Qwen2.5-VL-{settings.model_size} (published config), random weights" if settings.gpu else "tiny Qwen2.5-VL, vocabulary 151,936",
        "settings": {key: str(value) for key, value in vars(settings).items()},
        "padding": padding_shares(data, model, settings.padding_batch_size, pixel_settings(settings.image_max_pixels)),
    }  # fmt: skip
    if settings.collator:
        try:
            from collator_speed import measure_collators_on_tiny_model

            report["collator"] = {
                f"{turns} answer turn(s)": measure_collators_on_tiny_model(settings.workdir, turns=turns)
                for turns in (1, 3)
            }
        except Exception as error:  # a benchmark reports what it could measure
            report["collator"] = {"error": f"{type(error).__name__}: {error}"}

    print(f"padding and collator figures ready ({time.perf_counter() - started:.0f} s)", flush=True)
    runs_lengths = next(v for v in report["padding"].values() if v["max_pixels"] == settings.image_max_pixels)
    budget = token_budget(runs_lengths["mean_tokens"], runs_lengths["max_tokens"], settings.batch_size)
    report["max_tokens_per_batch"] = budget
    results: dict[str, dict[str, Any]] = {}
    longest_run = 0.0
    for precision in settings.precisions:
        strategy, dtype = {"bf16": ("lora", "bfloat16"), "qlora": ("qlora", "bfloat16"), "fp32": ("lora", "float32")}[
            precision
        ]
        results[precision] = {}
        for name in settings.runs:
            kind, features = RUNS[name]
            features = {key: value.format(max_tokens_per_batch=budget) for key, value in features.items()}
            if name == "all features":
                # Packed rows attend apart with either kernel: flash-attention's variable-length path where flash-attn
                # is installed on a GPU (the package's default there), else sdpa one row at a time (each run's
                # "attention" says which).
                features = {**features, **ALL_WITH_PADDING_FREE}
            elapsed = time.perf_counter() - started
            minutes = settings.time_budget_minutes  # not `budget`: that is the token budget the next runs format
            if minutes is not None and elapsed + longest_run > minutes * 60:
                results[precision][name] = {"error": f"skipped: would end past the {minutes:g}-minute budget"}
                print(f"  {precision} {name}: skipped (time budget)", flush=True)
                continue
            spec = {
                "kind": kind, "features": features, "model": str(model), "data": str(data), "strategy": strategy,
                "dtype": dtype, "gpu": settings.gpu, "batch_size": settings.batch_size, "steps": settings.steps,
                "warmup_steps": settings.warmup_steps, "image_max_pixels": settings.image_max_pixels,
                "output_dir": str(settings.workdir / "runs" / f"{precision}_{name}".replace(" ", "_").replace("+", "")),
            }  # fmt: skip
            spec["result"] = spec["output_dir"] + ".json"
            run_started = time.perf_counter()
            results[precision][name] = run_in_child(spec)
            longest_run = max(longest_run, time.perf_counter() - run_started)
            if settings.gpu and "error" not in results[precision][name]:
                result = results[precision][name]
                lengths = next(v for v in report["padding"].values() if v["max_pixels"] == settings.image_max_pixels)
                flops = model_flops_per_token(str(model), lengths["mean_tokens"], lengths["mean_image_tokens"])
                peak = next((value for key, value in PEAK_BF16_FLOPS.items() if key in device), None)
                result["mfu"] = flops * result["tokens_per_second"] / peak if peak else 0.0
            print(f"  {precision} {name}: {json.dumps(results[precision][name])[:300]}", flush=True)
    report["runs"] = results
    report["table"] = table(results, settings.gpu)
    report["targets"] = gpu_targets(results) if settings.gpu else []
    report["seconds"] = time.perf_counter() - started
    return report


def run_in_child(spec: dict[str, Any]) -> dict[str, Any]:
    Path(spec["output_dir"]).parent.mkdir(parents=True, exist_ok=True)
    spec_file = Path(spec["output_dir"] + ".spec.json")
    spec_file.write_text(json.dumps(spec))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    completed = subprocess.run(
        [sys.executable, __file__, "--child", str(spec_file)], capture_output=True, text=True, env=env
    )
    if completed.returncode or not Path(spec["result"]).exists():
        return {"error": (completed.stderr.strip().splitlines() or ["no output"])[-1], "log": completed.stderr[-3000:]}
    return json.loads(Path(spec["result"]).read_text())


def write_results(report: dict[str, Any], folder: Path, name: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.json").write_text(json.dumps(report, indent=2))
    if not report.get("gpu_mode"):
        lines = [
            f"# PLUMBING CHECK, not a speed figure: {report['model']}, CPU",
            "",
            "Each feature trains end to end through the package and plain TRL, on a tiny model whose 151,936-wide LM "
            "head is nearly all its compute: its ratios do not predict a real model's. The real-width figures are in "
            "cpu_real_width.md.",
            "",
        ]
    else:
        attention = (
            "flash-attention installed"
            if report.get("flash_attention")
            else "no flash-attn: sdpa, packed rows one at a time"
        )
        lines = [f"# GPU speed: {report['device']}, {report['model']} ({attention})", ""]
    lines += [
        f"Padding share at batch {report['settings']['padding_batch_size']} on {next(iter(report['padding'].values()))['rows']:,} rows:"
    ]
    for label, share in report["padding"].items():
        lines.append(
            f"- {label}: random batching {share['random']:.1%}, grouped by true length {share['grouped']:.1%}"
        )
    collator = report.get("collator", {})
    if "error" in collator:
        lines.append(f"- collator comparison failed: {collator['error']}")
    for figures in collator.values() if "error" not in collator else ():
        lines.append(f"- collator, {figures['summary']}")
    lines += ["", *report["table"], "", *report.get("targets", [])]
    lines += ["", f"({report['seconds']:.0f} s; settings {report['settings']})"]
    (folder / f"{name}.md").write_text("\n".join(lines) + "\n")
    return folder / f"{name}.md"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--gpu", action="store_true", help="Real-size Qwen2.5-VL, bf16 LoRA and QLoRA, on a GPU.")
    parser.add_argument("--model_size", default="7B", choices=SIZES, help="GPU: the published shape built.")
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--unique_rows", type=int, default=200, help="Charts drawn; repeated up to --rows.")
    parser.add_argument("--steps", type=int, default=None, help="Steps per run (default 3 on CPU, 12 on GPU).")
    parser.add_argument(
        "--warmup_steps", type=int, default=None, help="Untimed first steps (default 1 on CPU, 2 on GPU)."
    )
    parser.add_argument(
        "--batch_size", type=int, default=None, help="Per-device batch of the runs (default 4 on CPU, 8 on GPU)."
    )
    parser.add_argument("--padding_batch_size", type=int, default=8, help="Batch size of the padding-share figures.")
    parser.add_argument(
        "--image_max_pixels", type=int, default=None, help="Default 1,003,520 on CPU, 12,845,056 on GPU."
    )
    parser.add_argument(
        "--runs",
        default=None,
        help=f"Comma-separated, of: {', '.join(RUNS)} (default: all on CPU; {GPU_RUNS} on GPU).",
    )
    parser.add_argument("--precisions", default=None, help="bf16,qlora on GPU (default); fp32 on CPU.")
    parser.add_argument("--no_collator", action="store_true", help="Skip the collator comparison (CPU only).")
    parser.add_argument(
        "--time_budget_minutes",
        type=float,
        default=None,
        help=f"Start no run that would end past this (default {GPU_TIME_BUDGET_MINUTES:g} on GPU, none on CPU).",
    )
    parser.add_argument("--name", default=None, help="Results file name (default: gpu, or cpu).")
    parser.add_argument("--workdir", default=str(REPO / ".cache" / "bench" / "speed"))
    parser.add_argument("--results", default=str(REPO / "benchmarks" / "results"))
    args = parser.parse_args(argv)
    if args.child:
        return run_child(args.child)
    settings = Settings(
        gpu=args.gpu,
        rows=args.rows,
        unique_rows=args.unique_rows,
        steps=args.steps or (12 if args.gpu else 3),
        warmup_steps=args.warmup_steps if args.warmup_steps is not None else (2 if args.gpu else 1),
        batch_size=args.batch_size or (8 if args.gpu else 4),
        padding_batch_size=args.padding_batch_size,
        image_max_pixels=args.image_max_pixels or (12845056 if args.gpu else 1003520),
        model_size=args.model_size if args.gpu else "tiny",
        workdir=Path(args.workdir),
        results=Path(args.results),
        collator=not args.no_collator and not args.gpu,
        runs=[name.strip() for name in (args.runs or (GPU_RUNS if args.gpu else ",".join(RUNS))).split(",")],
        precisions=(args.precisions or ("bf16,qlora" if args.gpu else "fp32")).split(","),
        time_budget_minutes=args.time_budget_minutes or (GPU_TIME_BUDGET_MINUTES if args.gpu else None),
    )
    unknown = [name for name in settings.runs if name not in RUNS]
    if unknown:
        parser.error(f"unknown run(s) {unknown}; choose from {list(RUNS)}")
    report = run_all(settings)
    name = args.name or ("gpu" if settings.gpu else "cpu")
    markdown = write_results(report, settings.results, name)
    print("\n".join(markdown.read_text().splitlines()))
    print(f"\nwritten: {markdown} and {markdown.with_suffix('.json')}")


if __name__ == "__main__":
    main()
