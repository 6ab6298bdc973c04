"""`make bench`'s headline: plain TRL against the package at the real width of Qwen2.5-VL-3B and -7B, on a CPU.

    make bench                                        # both sizes, then the tiny-model plumbing table
    python benchmarks/real_width.py --sizes 7B        # one size
    python benchmarks/real_width.py --check_sizes 3B,7B --check_plain   # the shallow-model check for more

A step of a real-width model at batch 4 takes minutes on two CPU cores, so whole steps are not timed at full depth.
Each part of a training step is measured at the real width instead, with random weights, and the full-depth step is
composed from the parts:

- data loading and collation: MEASURED per step, from each trainer's own dataloader (its sampler and collator);
  padding-free and token-budget packing add the packing of each batch, measured;
- vision tower: MEASURED per patch on a 2-block tower (one window-attention block, one full-attention block, patch
  embedding and merger) as each trainer runs it (plain TRL: forward, recomputation and backward through the frozen
  tower, which transformers' input hook makes require gradients; the package: forward only, `modeling.frozen_vision`);
  COMPOSED to 32 blocks (28 window, 4 full);
- decoder layers: one decoder layer (with its LoRA adapters and gradient checkpointing) MEASURED on a 512-position row,
  its attention kernel MEASURED at each setup's own batch shape and kernel (a padded batch under sdpa; a packed
  sequence attended one row at a time, `modeling.segment_attention`); COMPOSED per
  step as layers x (per-position time x positions fed + per-score-element time x attention score elements);
- LM head and loss: TRL's fused LM head kernel MEASURED at two position counts (the labelled positions of a batch, and
  128), COMPOSED linearly to the positions each setup scores (on a CPU TRL scores every position; the package only the
  labelled ones);
- optimizer step: MEASURED at full size (gradient clipping and AdamW over every LoRA parameter of the full-depth model).

The per-step counts (positions, score elements, scored positions, patches) are exact, over a whole epoch of each
trainer's own batching (2,000 generated ChartQA-like rows, batch 4; token-budget packing: rows packed
first-fit-decreasing into sequences of up to `--max_tokens_per_batch`, by default the budget that gives its steps as
many tokens as a batch of 4 on average). Packing's per-row loss is checked against the padded batch's on the unit
model (one real-width layer). Units are measured in rounds until one more round
moves every ratio by less than `--tolerance`; the spread over rounds is printed. A shallow real-width model trained
through the real trainers (2 and 4 decoder layers) checks the composition: its per-layer slope and its step time
against the same parts composed for the batches it trained on.

Output: benchmarks/results/cpu_real_width.md and .json (the figures; every per-step figure in the work folder).
"""

import argparse
import contextlib
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "benchmarks"))


@dataclass(frozen=True)
class Setup:
    """One way of training: which trainer builds it, with which recipe fields, how a batch's rows reach the model
    (`padded`: one sequence per row, padded to the longest; `packed`: one sequence, no padding) and which positions
    the LM head scores (`all` on a CPU under TRL; `labelled`: the package's compact head)."""

    name: str
    trainer: str
    features: dict[str, str] = field(default_factory=dict)
    layout: str = "padded"
    head: str = "labelled"


# "{max_tokens_per_batch}" is filled from the run's settings (`_unit_spec`).
PACKING = "token-budget packing"
SETUPS = (
    Setup("plain TRL", "trl", {}, "padded", "all"),
    Setup("package defaults", "vlm", {}, "padded", "labelled"),  # length grouping, labels-only head, fast collator
    Setup("all features", "vlm", {"padding_free": "true"}, "packed", "labelled"),
    Setup(PACKING, "vlm", {"max_tokens_per_batch": "{max_tokens_per_batch}"}, "packed", "labelled"),
)
BASELINE = "plain TRL"
# Recipe fields that change only how a collated batch reaches the model, not the dataloader.
LAYOUT_FIELDS = {"padding_free"}
PARTS = ("data loading and collation", "vision tower", "decoder layers", "LM head and loss", "optimizer step")
HOW = {
    "data loading and collation": "measured per step (each trainer's own dataloader; + packing, measured)",
    "vision tower": "measured per patch on 2 blocks + embedding/merger, composed to the published depth",
    "decoder layers": "one layer measured per position + attention kernel per score element, composed x layers",
    "LM head and loss": "TRL's kernel measured at 2 position counts, composed to the positions scored",
    "optimizer step": "measured at full size (all LoRA parameters of the full-depth model)",
}
UNIT_POSITIONS = 512  # the decoder-layer unit's row: ChartQA rows are ~700 tokens
HEAD_POSITIONS = 128
TARGET_RATIO = 1.5
TARGET_SPREAD = 0.10
TARGET_PACKED_LOSS = 1e-5
# One thread: its CPU time is the work done. With two threads under other load, one thread waits (spinning, so counted)
# for the other to be scheduled, and a part's time moved 2.5x between rounds of the first run.
MEASURE_THREADS = 1


# ---------------------------------------------------------------------------------------------------------------------
# Counting an epoch (exact; no model)


def sequence_counts(lengths: list[int], layout: str) -> dict[str, int]:
    """Positions fed and attention score elements of one batch of rows with these true lengths."""
    real = sum(lengths)
    if layout == "packed":  # each packed row attends to itself alone (`modeling.segment_attention` on a CPU)
        return {"positions": real, "score_elements": sum(length * length for length in lengths)}
    longest = max(lengths)
    return {"positions": len(lengths) * longest, "score_elements": len(lengths) * longest * longest}


def fixed_batches(order: list[int], batch_size: int) -> list[list[int]]:
    """An order of rows cut into batches as a fixed-size dataloader cuts it (the last one may be short)."""
    return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]


def median_batch(batches: list[list[int]], lengths: list[int], layout: str) -> list[int]:
    """The row lengths of the batch with the median positions fed, among `batches`."""
    rows = sorted(
        ([lengths[index] for index in batch] for batch in batches),
        key=lambda batch_lengths: sequence_counts(batch_lengths, layout)["positions"],
    )
    return rows[len(rows) // 2]


def epoch_steps(
    batches: list[list[int]],
    lengths: list[int],
    image_tokens: list[int],
    setup: Setup,
    labelled_per_row: float,
    patches_per_image_token: int = 4,
) -> list[dict[str, float]]:
    """Per step of one epoch of `batches` (row indices): rows, real tokens, positions fed, score elements, positions
    the LM head scores, vision patches."""
    steps = []
    for rows in batches:
        row_lengths = [lengths[index] for index in rows]
        counts = sequence_counts(row_lengths, setup.layout)
        if setup.head == "all":  # TRL on a CPU: every position but the last of each padded row
            scored = len(rows) * (max(row_lengths) - 1)
        else:
            scored = len(rows) * labelled_per_row
        steps.append(
            {
                "rows": len(rows),
                "real": sum(row_lengths),
                **counts,
                "scored": scored,
                "patches": patches_per_image_token * sum(image_tokens[index] for index in rows),
            }
        )
    return steps


# ---------------------------------------------------------------------------------------------------------------------
# Composing a step from measured parts (pure functions of the units and the counts)


def head_line(points: list[list[float]]) -> tuple[float, float]:
    """(fixed seconds, seconds per position) through two measured (positions, seconds) points; proportional when
    noise makes the line fall."""
    (n1, t1), (n2, t2) = sorted(points)
    slope = (t2 - t1) / (n2 - n1) if n2 != n1 else 0.0
    if slope <= 0 or t1 - slope * n1 < 0:
        return 0.0, t2 / n2
    return t1 - slope * n1, slope


def unit_rates(units: dict[str, Any]) -> dict[str, Any]:
    """The per-count rates one set of unit measurements gives."""
    layer = units["layer"]
    head_fixed, head_slope = head_line(units["head"]["points"])
    vision = units["vision"]
    return {
        "data": dict(units["data"]),
        "layer_per_position": max(0.0, layer["seconds"] - layer["core_seconds"]) / layer["positions"],
        "attention_per_element": {
            name: value["seconds"] / value["elements"] for name, value in units["attention"].items()
        },
        "head_fixed": head_fixed,
        "head_per_position": head_slope,
        "vision_per_patch": vision["full_depth_seconds"] / vision["patches"],
        "vision_per_patch_trl": units["vision_trl"]["full_depth_seconds"] / units["vision_trl"]["patches"],
        "optimizer": units["optimizer"]["seconds"],
    }


def median_rates(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Each rate's median over the rounds (robust to a round disturbed by other work on the machine)."""
    rates = [unit_rates(units) for units in rounds]

    def median_of(values: list[Any]) -> Any:
        if isinstance(values[0], dict):
            return {key: median_of([value[key] for value in values]) for key in values[0]}
        return statistics.median(values)

    return median_of(rates)


def compose_step(rates: dict[str, Any], setup: Setup, step: dict[str, float], layers: int) -> dict[str, float]:
    """Seconds of each part of one training step of the full-depth model."""
    attention = rates["attention_per_element"][setup.name]
    return {
        "data loading and collation": rates["data"][setup.name],
        "vision tower": rates["vision_per_patch_trl" if setup.trainer == "trl" else "vision_per_patch"]
        * step["patches"],
        "decoder layers": layers
        * (rates["layer_per_position"] * step["positions"] + attention * step["score_elements"]),
        "LM head and loss": rates["head_fixed"] + rates["head_per_position"] * step["scored"],
        "optimizer step": rates["optimizer"],
    }


def compose_epoch(rates: dict[str, Any], setup: Setup, steps: list[dict[str, float]], layers: int) -> dict[str, Any]:
    """Mean seconds per step of each part over the epoch, tokens/s (real tokens over composed time), padding share."""
    parts = {part: 0.0 for part in PARTS}
    for step in steps:
        for part, seconds in compose_step(rates, setup, step, layers).items():
            parts[part] += seconds
    total = sum(parts.values())
    real = sum(step["real"] for step in steps)
    positions = sum(step["positions"] for step in steps)
    return {
        "parts": {part: seconds / len(steps) for part, seconds in parts.items()},
        "step_seconds": total / len(steps),
        "tokens_per_second": real / total,
        "padding_share": 1 - real / positions,
    }


def ratios(composed: dict[str, dict[str, Any]]) -> dict[str, float]:
    """Each setup's tokens/s over the baseline's, and each part's time per step over the baseline's."""
    base = composed[BASELINE]
    result = {}
    for name, figures in composed.items():
        if name == BASELINE:
            continue
        result[f"{name}: tokens/s"] = figures["tokens_per_second"] / base["tokens_per_second"]
        for part in PARTS:
            if base["parts"][part] > 0 and figures["parts"][part] > 0:
                result[f"{name}: {part}"] = figures["parts"][part] / base["parts"][part]
    return result


def compose_all(rates: dict[str, Any], epochs: dict[str, list[dict[str, float]]], layers: int) -> dict[str, Any]:
    return {setup.name: compose_epoch(rates, setup, epochs[setup.name], layers) for setup in SETUPS}


def watched_ratios(composed: dict[str, dict[str, Any]], share: float = 0.01) -> dict[str, float]:
    """The ratios whose stability decides when to stop: every setup's tokens/s, and the part ratios of parts that are
    at least `share` of the baseline's step (a part below that cannot move the headline by more than its share)."""
    base = composed[BASELINE]
    big = {part for part in PARTS if base["parts"][part] >= share * base["step_seconds"]}
    return {
        key: value for key, value in ratios(composed).items() if key.endswith("tokens/s") or key.split(": ")[1] in big
    }


def stable(history: list[dict[str, float]], tolerance: float, min_rounds: int) -> bool:
    """Whether the last round moved every ratio (composed from the medians so far) by less than `tolerance`."""
    if len(history) < max(2, min_rounds):
        return False
    previous, last = history[-2], history[-1]
    return all(abs(last[key] / previous[key] - 1) < tolerance for key in last if previous.get(key))


def spread(values: list[float]) -> dict[str, float]:
    median = statistics.median(values)
    return {
        "min": min(values),
        "median": median,
        "max": max(values),
        "relative": (max(values) - min(values)) / median if median else 0.0,
    }


# ---------------------------------------------------------------------------------------------------------------------
# Measuring the parts (in a child process per model size)


def _rss() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakMemory:
    """Peak resident memory above the level at entry, for one block (Linux: the high-water mark is reset on entry)."""

    def __enter__(self) -> "PeakMemory":
        try:
            with open("/proc/self/clear_refs", "w") as handle:
                handle.write("5")
        except OSError:
            pass
        self.start = _rss()
        return self

    def __exit__(self, *exc: Any) -> None:
        with open("/proc/self/status") as handle:
            peak = next(int(line.split()[1]) * 1024 for line in handle if line.startswith("VmHWM"))
        self.rise = max(0, peak - self.start)


def _now() -> float:
    """Wall time: the run's budget and elapsed time."""
    return time.perf_counter()


def _cpu() -> float:
    """CPU seconds of this process: what every model part is timed in. The measurements run on one thread
    (MEASURE_THREADS), so other work on a shared machine, which stretches wall time by whatever share of the cores it
    takes, leaves them almost unchanged."""
    return time.process_time()


class Laps:
    """Wall seconds each measurement of a round took (to see where a round's time goes; not a figure)."""

    def __init__(self, wall: dict[str, float]):
        self.wall, self.last = wall, _now()

    def done(self, part: str) -> None:
        self.wall[part] = _now() - self.last
        self.last = _now()


def time_layer(language_model: Any, hidden_size: int, positions: int) -> float:
    """Forward and backward of the text model (one decoder layer) on one unpadded row, as the trainers run it."""
    import torch

    inputs = torch.randn(1, positions, hidden_size, requires_grad=True)
    position_ids = torch.arange(positions).view(1, 1, -1).expand(3, 1, -1)
    start = _cpu()
    output = language_model(
        inputs_embeds=inputs,
        attention_mask=torch.ones(1, positions, dtype=torch.long),
        position_ids=position_ids,
        use_cache=False,
    ).last_hidden_state
    output.backward(torch.randn_like(output))
    return _cpu() - start


def time_attention(
    attention: Any, text_config: Any, lengths: list[int], layout: str, implementation: str
) -> tuple[float, int]:
    """The attention kernel alone, as a decoder layer calls it for this batch (`implementation`: the attention the
    setup's trainer gave its language model; mask built by transformers from the batch's padding or packed positions):
    forward twice (gradient checkpointing recomputes it) and backward. Returns (seconds, score elements)."""
    import copy

    import torch
    from transformers.masking_utils import create_causal_mask
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from vlm_recipes.modeling.segment_attention import SEGMENT_SDPA

    text_config = copy.copy(text_config)
    text_config._attn_implementation = implementation

    if layout == "packed":
        batch, length = 1, sum(lengths)
        text_positions = torch.cat([torch.arange(n) for n in lengths]).view(1, -1)
        mask_2d = None
    else:
        batch, length = len(lengths), max(lengths)
        text_positions = None
        mask_2d = torch.zeros(batch, length, dtype=torch.long)
        for row, n in enumerate(lengths):
            mask_2d[row, :n] = 1
    embeds = torch.zeros(batch, length, text_config.hidden_size)
    mask = create_causal_mask(text_config, embeds, mask_2d, None, position_ids=text_positions)
    head_dim = text_config.hidden_size // text_config.num_attention_heads
    query = torch.randn(batch, text_config.num_attention_heads, length, head_dim, requires_grad=True)
    key = torch.randn(batch, text_config.num_key_value_heads, length, head_dim, requires_grad=True)
    value = torch.randn(batch, text_config.num_key_value_heads, length, head_dim, requires_grad=True)
    kernel = ALL_ATTENTION_FUNCTIONS.get_interface(text_config._attn_implementation, None)
    start = _cpu()
    output, _ = kernel(
        attention, query, key, value, mask, dropout=0.0, scaling=attention.scaling, position_ids=text_positions
    )
    forward = _cpu() - start
    start = _cpu()
    output.backward(torch.randn_like(output))
    if layout == "packed" and implementation == SEGMENT_SDPA:
        elements = sum(n * n for n in lengths)  # each row against itself
    else:
        elements = length * length * batch
    return 2 * forward + (_cpu() - start), elements


def time_head(weight: Any, positions: int) -> float:
    """TRL's fused LM head kernel (what SFTTrainer's loss runs), forward and backward, on `positions` positions."""
    import torch
    from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE  # private: trl 1.16
    from trl.trainer.utils import _ChunkedLogProbFunction as LogProbs  # private: trl 1.16

    hidden = torch.randn(positions, weight.shape[1], requires_grad=True)
    targets = torch.randint(0, weight.shape[0], (positions,))
    start = _cpu()
    log_probs = LogProbs.apply(
        hidden, weight, None, targets, 1.0, _CHUNKED_LOGPROB_CHUNK_SIZE, None, 1.0, ("log_probs", "entropy", "is_top1")
    )[0]
    (-log_probs.sum() / positions).backward()
    return _cpu() - start


def time_vision(visual: Any, pixel_values: Any, grid_thw: Any) -> dict[str, Any]:
    """The vision tower's forward and backward as the trainers run it, with each block's share (forward: between its
    hooks; backward: between the gradients reaching its output and its input, recomputation included)."""
    import torch

    backward_phase = {"on": False}
    forward_spans: dict[int, list[float]] = {}
    gradient_times: dict[str, float] = {}
    handles = []

    def note_gradient(name: str):
        return lambda grad: gradient_times.__setitem__(name, _cpu())

    for index, block in enumerate(visual.blocks):

        def before(module, args, kwargs, index=index):
            if backward_phase["on"]:
                return
            forward_spans[index] = [_cpu(), 0.0]
            hidden = args[0] if args else kwargs["hidden_states"]
            if index == 0 and hidden.requires_grad:
                hidden.register_hook(note_gradient("input"))

        def after(module, args, kwargs, output, index=index):
            if backward_phase["on"]:
                return
            forward_spans[index][1] = _cpu()
            hidden = output[0] if isinstance(output, tuple) else output
            if hidden.requires_grad:
                hidden.register_hook(note_gradient(f"output {index}"))

        handles.append(block.register_forward_pre_hook(before, with_kwargs=True))
        handles.append(block.register_forward_hook(after, with_kwargs=True))
    try:
        start = _cpu()
        features = visual(pixel_values, grid_thw=grid_thw).pooler_output
        tower_forward = _cpu() - start
        backward_phase["on"] = True
        trains = features.requires_grad
        if trains:
            features.backward(torch.randn_like(features))
        total = _cpu() - start
    finally:
        for handle in handles:
            handle.remove()
    blocks = []
    for index in range(len(visual.blocks)):
        block_forward = forward_spans[index][1] - forward_spans[index][0]
        backward = 0.0
        if trains:
            grad_in = gradient_times["input"] if index == 0 else gradient_times[f"output {index - 1}"]
            backward = grad_in - gradient_times[f"output {index}"]
        blocks.append(block_forward + backward)
    return {"seconds": total, "forward_seconds": tower_forward, "blocks": blocks, "backward": trains}


def checkpoint_as_trainer(trainer: Any) -> None:
    """Turn activation checkpointing on as `Trainer.train` does before its first step (transformers 5: the
    `activation_checkpointing` arguments). The units call the model outside `train`; without this they ran each layer
    and vision block once forward and once backward, where a training step also recomputes the forward."""
    args = trainer.args
    if not args.activation_checkpointing:
        return
    kwargs = dict(args.activation_checkpointing_kwargs or {})
    every_n_layers, offload = kwargs.pop("every_n_layers", 1), kwargs.pop("offload", False)
    trainer.model.activation_checkpointing_enable(
        activation_checkpointing_kwargs=kwargs or None, every_n_layers=every_n_layers, offload=offload
    )


def answer_log_probs(model: Any, batch: dict[str, Any]) -> Any:
    """Log-probability of every labelled token of a batch (padded or packed), rows one after the other."""
    import torch

    inputs = {key: value for key, value in batch.items() if key != "labels"}
    logits = model(**inputs, use_cache=False).logits[:, :-1].float()
    labels = batch["labels"][:, 1:]
    log_probs = torch.log_softmax(logits, -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    return log_probs[labels != -100]


def packed_loss_check(model: Any, batch: dict[str, Any]) -> dict[str, float]:
    """One packed batch against the same rows padded, on the unit model: the largest difference of a labelled token's
    log-probability and of a row's mean loss."""
    import torch

    from vlm_recipes.training.padding_free import pack_rows

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            padded = answer_log_probs(model, batch)
            packed = answer_log_probs(model, pack_rows(model, batch))
    finally:
        model.train(was_training)
    per_row = (batch["labels"][:, 1:] != -100).sum(dim=1).tolist()
    row_losses = [(-part.mean(), -other.mean()) for part, other in zip(padded.split(per_row), packed.split(per_row))]
    return {
        "rows": len(per_row),
        "tokens": int(batch["attention_mask"].sum()),
        "max_token_difference": float((padded - packed).abs().max()),
        "max_row_loss_difference": max(float((a - b).abs()) for a, b in row_losses),
    }


def model_signature(model: Any) -> dict[str, Any]:
    """What decides a model's cost per step: trainable parameters, checkpointed blocks, attention kernel."""
    return {
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "checkpointed_blocks": sum(1 for m in model.modules() if getattr(m, "gradient_checkpointing", False) is True),
        "attention": model.config._attn_implementation,
    }


def _unit_spec(spec: dict[str, Any], setup: Setup, model: Path) -> dict[str, Any]:
    features = {
        key: value.format(max_tokens_per_batch=spec.get("max_tokens_per_batch"))
        for key, value in setup.features.items()
        if key not in LAYOUT_FIELDS
    }
    return {
        "kind": setup.trainer,
        "features": features,
        "model": str(model),
        "data": spec["data"],
        "strategy": "lora",
        "dtype": "float32",
        "batch_size": spec["batch_size"],
        "steps": 1,
        "warmup_steps": 0,
        "image_max_pixels": spec["image_max_pixels"],
        "output_dir": str(Path(spec["workdir"]) / "unit_runs" / setup.name.replace(" ", "_")),
    }


def measure_units(spec: dict[str, Any]) -> dict[str, Any]:
    """All unit measurements for one model size, in rounds until the composed ratios are stable."""
    import speed
    import torch
    from qwen_shapes import PUBLISHED_TEXT, real_width_config, save_real_width_model, vision_shape
    from transformers import AutoTokenizer, Trainer

    from vlm_recipes.console import setup_console
    from vlm_recipes.modeling.families import FAMILIES
    from vlm_recipes.modeling.frozen_vision import frozen_vision_backward
    from vlm_recipes.modeling.segment_attention import language_config
    from vlm_recipes.training.padding_free import pack_rows

    setup_console()
    torch.set_num_threads(MEASURE_THREADS)
    family = FAMILIES["qwen2_5_vl"]
    size, workdir = spec["size"], Path(spec["workdir"])
    started = _now()
    tiny = speed.tiny_model(workdir)
    vocab = len(AutoTokenizer.from_pretrained(tiny))
    unit_folder = save_real_width_model(
        tiny,
        workdir / f"qwen2_5_vl_{size}_unit",
        size,
        dtype="float32",
        text_layers=1,
        vision_depth=2,
        vocab_size=-(-vocab // 64) * 64,  # the unit never embeds or scores through this table: no 152k rows needed
    )
    full = real_width_config(__import__("transformers").AutoConfig.from_pretrained(tiny), size)
    layers = full.text_config.num_hidden_layers
    published_vision = vision_shape(size)
    full_blocks = len(published_vision["fullatt_block_indexes"])
    window_blocks = published_vision["depth"] - full_blocks

    # One trainer per dataloader: each setup's batches come from its own trainer (sampler and collator).
    trainers: dict[tuple, Any] = {}
    loaders: dict[tuple, Any] = {}
    batches_of: dict[tuple, list[list[int]]] = {}
    kernels: dict[tuple, str] = {}
    model = None
    signatures = {}
    for setup in SETUPS:
        unit_spec = _unit_spec(spec, setup, unit_folder)
        key = (unit_spec["kind"], tuple(sorted(unit_spec["features"].items())))
        if key in trainers:
            continue
        trainer = speed.plain_trl_trainer(unit_spec) if setup.trainer == "trl" else speed.package_trainer(unit_spec)
        trainers[key] = trainer
        sampler = trainer._get_train_sampler()
        drawn = list(sampler)  # row indices, or (token-budget packing) batches of them
        batches_of[key] = (
            [[int(index) for index in batch] for batch in drawn]
            if drawn and isinstance(drawn[0], list)
            else fixed_batches([int(index) for index in drawn], spec["batch_size"])
        )
        loaders[key] = iter(trainer.get_train_dataloader())
        signatures[setup.name] = model_signature(trainer.model)
        kernels[key] = language_config(trainer.model)._attn_implementation  # packing: one row at a time
        if model is None and setup.trainer == "vlm":
            model = trainer.model
    keys = {setup.name: (setup.trainer, tuple(sorted(_unit_spec(spec, setup, unit_folder)["features"].items())))
            for setup in SETUPS}  # fmt: skip
    # The model parts are measured once, on the package's model, when every trainer built the same model.
    same_model = all(signature == signatures[BASELINE] for signature in signatures.values())
    for trainer in trainers.values():  # keep the dataloaders; drop the other copies of the model
        if trainer.model is not model:
            trainer.model = trainer.model_wrapped = None
    gc.collect()
    model.train()
    checkpoint_as_trainer(next(trainer for trainer in trainers.values() if trainer.model is model))
    base = model.get_base_model()
    language_model = base.model.language_model
    visual = base.model.visual
    text_config = language_model.config
    attention = language_model.layers[0].self_attn

    # Exact epoch counts: every row's true length and image tokens, each trainer's own order.
    package_trainer = trainers[keys["package defaults"]]
    counts = speed.row_token_counts(package_trainer.train_dataset, package_trainer.processing_class)
    lengths = [count.total for count in counts]
    image_tokens = [count.image for count in counts]

    head_weight = torch.randn(PUBLISHED_TEXT[size]["vocab_size"], text_config.hidden_size) * 0.02
    optimizer_class, optimizer_kwargs = Trainer.get_optimizer_cls_and_kwargs(package_trainer.args, model)
    lora = [p for p in model.parameters() if p.requires_grad]
    full_lora = [torch.zeros_like(p, requires_grad=True) for p in lora for _ in range(layers)]
    full_grads = [torch.randn_like(p) * 1e-3 for p in full_lora]
    optimizer = optimizer_class(full_lora, **optimizer_kwargs)
    max_grad_norm = package_trainer.args.max_grad_norm

    sampled: dict[str, list[dict[str, int]]] = {setup.name: [] for setup in SETUPS}
    first_batch = next(loaders[keys["package defaults"]])
    images = min(spec["vision_images"], int(first_batch["image_grid_thw"].shape[0]))
    grid = first_batch["image_grid_thw"][:images]
    pixel_values = first_batch["pixel_values"][: int(grid.prod(dim=1).sum())]

    def next_batch(setup: Setup) -> tuple[Any, float]:
        key = keys[setup.name]
        start = _now()
        try:
            batch = next(loaders[key])
        except StopIteration:
            loaders[key] = iter(trainers[key].get_train_dataloader())
            batch = next(loaders[key])
        return batch, _now() - start

    # The attention kernel is timed on one fixed batch per setup: its epoch's median batch (by positions fed).
    representative = {
        setup.name: median_batch(batches_of[keys[setup.name]], lengths, setup.layout) for setup in SETUPS
    }
    packing = next(setup for setup in SETUPS if setup.name == PACKING)
    loss_check = packed_loss_check(model, next_batch(packing)[0])
    print(f"[{size}] packed against padded rows on the unit model: {loss_check}", flush=True)
    print(f"[{size}] unit model, trainers and epoch counts ready ({_now() - started:.0f} s)", flush=True)
    rounds: list[dict[str, Any]] = []
    history: list[dict[str, float]] = []
    epochs: dict[str, list[dict[str, float]]] = {}
    budget = spec["budget_seconds"]
    while True:
        units: dict[str, Any] = {"data": {}, "attention": {}, "memory": {}, "wall": {}}
        laps = Laps(units["wall"])

        # Data: a few steps of each setup's dataloader (packing included for packed setups).
        for setup in SETUPS:
            seconds = []
            for _ in range(spec["data_steps"]):
                batch, took = next_batch(setup)
                if setup.layout == "packed":
                    start = _cpu()
                    pack_rows(model, batch)
                    took += _cpu() - start
                seconds.append(took)
                batch_figures = speed.batch_counts(batch, setup.layout == "packed")
                sampled[setup.name].append(batch_figures)
            units["data"][setup.name] = statistics.median(seconds)
        laps.done("data")
        with PeakMemory() as memory:
            layer_seconds = time_layer(language_model, text_config.hidden_size, UNIT_POSITIONS)
        units["memory"]["decoder layer per position"] = memory.rise / UNIT_POSITIONS
        core_seconds, _ = time_attention(
            attention, text_config, [UNIT_POSITIONS], "padded", text_config._attn_implementation
        )
        units["layer"] = {"seconds": layer_seconds, "core_seconds": core_seconds, "positions": UNIT_POSITIONS}
        for setup in SETUPS:
            kernel = kernels[keys[setup.name]]
            seconds, elements = time_attention(
                attention, text_config, representative[setup.name], setup.layout, kernel
            )
            units["attention"][setup.name] = {"seconds": seconds, "elements": elements, "kernel": kernel}
        laps.done("decoder layer and attention")
        labelled = max(8, int(statistics.median(s["labelled"] for s in sampled["package defaults"])))
        points = []
        for positions in (labelled, HEAD_POSITIONS):
            with PeakMemory() as memory:
                points.append([positions, time_head(head_weight, positions)])
            label = "a batch's labelled positions" if positions == labelled else f"{positions} positions"
            units["memory"][f"LM head at {label}"] = memory.rise
        units["head"] = {"points": points}
        laps.done("LM head")
        patches = int(pixel_values.shape[0])
        for name in ("vision", "vision_trl"):
            # plain TRL's model has no frozen-vision hooks: its frozen tower records its graph (see the docstring)
            as_trl = frozen_vision_backward(model, family) if name == "vision_trl" else contextlib.nullcontext()
            with PeakMemory() as memory, as_trl:
                vision = time_vision(visual, pixel_values, grid)
            if name == "vision":
                units["memory"]["vision tower per patch (2 blocks)"] = memory.rise / patches
            window, full_attention = vision["blocks"][0], vision["blocks"][-1]
            rest = vision["seconds"] - sum(vision["blocks"])
            vision["full_depth_seconds"] = rest + window_blocks * window + full_blocks * full_attention
            vision["patches"] = patches
            units[name] = vision
        laps.done("vision tower")
        for parameter, grad in zip(full_lora, full_grads):
            parameter.grad = grad.clone()
        start = _cpu()
        torch.nn.utils.clip_grad_norm_(full_lora, max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        units["optimizer"] = {"seconds": _cpu() - start, "parameters": sum(p.numel() for p in full_lora)}
        laps.done("optimizer")
        rounds.append(units)

        labelled_per_row = statistics.mean(s["labelled"] / s["rows"] for s in sampled["package defaults"])
        epochs = {
            setup.name: epoch_steps(batches_of[keys[setup.name]], lengths, image_tokens, setup, labelled_per_row)
            for setup in SETUPS
        }
        history.append(watched_ratios(compose_all(median_rates(rounds), epochs, layers)))
        elapsed = _now() - started
        print(f"[{size}] round {len(rounds)} ({elapsed:.0f} s): " + ", ".join(
            f"{key} {value:.3f}" for key, value in history[-1].items() if key.endswith("tokens/s"))
            + "; measuring took " + ", ".join(f"{part} {seconds:.0f} s" for part, seconds in units["wall"].items()),
            flush=True)  # fmt: skip
        if stable(history, spec["tolerance"], spec["min_rounds"]) or len(rounds) >= spec["max_rounds"]:
            break
        if elapsed > budget and len(rounds) >= 2:
            break
    return {
        "size": size,
        "layers": layers,
        "vision_blocks": {"window": window_blocks, "full": full_blocks},
        "rounds": rounds,
        "history": history,
        "stable": stable(history, spec["tolerance"], spec["min_rounds"]),
        "epochs": epochs,
        "sampled_batches": sampled,
        "packed_loss_check": loss_check,
        "max_tokens_per_batch": spec["max_tokens_per_batch"],
        "signatures": signatures,
        "same_model": same_model,
        "unit_model": {"text_layers": 1, "vision_blocks": 2, "vision_images": images, "patches": patches},
        "seconds": _now() - started,
        "peak_rss_bytes": __import__("resource").getrusage(__import__("resource").RUSAGE_SELF).ru_maxrss * 1024,
    }


# ---------------------------------------------------------------------------------------------------------------------
# The shallow-model check: real trainers, real width, 2 and 4 decoder layers


def check_runs(spec: dict[str, Any], size: str, include_plain: bool) -> dict[str, Any]:
    """Train a shallow real-width model through the real trainers and return each run's per-step measurements."""
    import speed
    from qwen_shapes import save_real_width_model

    workdir = Path(spec["workdir"])
    tiny = speed.tiny_model(workdir)
    runs = {}
    plan = [("package defaults", 2), ("package defaults", 4)] + ([("plain TRL", 2)] if include_plain else [])
    tie = None if size != "7B" else True  # 7B's untied 152k x 3584 head and table would not fit the memory cap
    for name, depth in plan:
        setup = next(s for s in SETUPS if s.name == name)
        folder = save_real_width_model(
            tiny, workdir / f"qwen2_5_vl_{size}_{depth}_layers", size, dtype="bfloat16", text_layers=depth,
            vision_depth=2, tie_word_embeddings=tie,
        )  # fmt: skip
        run_spec = {
            **_unit_spec(spec, setup, folder),
            "batch_size": spec["check_batch_size"],
            "steps": spec["check_steps"],
            "warmup_steps": 1,
            "image_max_pixels": spec["check_image_max_pixels"],
            "data": spec["check_data"],
            "output_dir": str(workdir / "check_runs" / f"{size}_{name.replace(' ', '_')}_{depth}"),
            "threads": MEASURE_THREADS,  # timed as the units are: CPU seconds of one thread
            "clock": "cpu",
        }
        run_spec["result"] = run_spec["output_dir"] + ".json"
        result = speed.run_in_child(run_spec)
        runs[f"{name}, {depth} layers"] = {"setup": name, "layers": depth, **result}
        print(
            f"[check {size}] {name}, {depth} layers: {result.get('mean_step_seconds', result.get('error'))}",
            flush=True,
        )
    return runs


def check_composition(runs: dict[str, Any], rates: dict[str, Any], vision_blocks: int = 2) -> dict[str, Any]:
    """The composed forward + backward (vision on the shallow tower, layers, head) against the measured one, per run;
    and the per-layer slope measured (4 layers - 2 layers, same batches) against the composed layer time."""
    report: dict[str, Any] = {"runs": {}}
    by_layers = {}
    for label, run in runs.items():
        if "error" in run or not run.get("per_step"):
            report["runs"][label] = {"error": run.get("error", "no per-step figures")}
            continue
        setup = next(s for s in SETUPS if s.name == run["setup"])
        timed = run["per_step"][1:]
        measured = statistics.mean(step["forward_backward_seconds"] for step in timed)
        composed_parts = [
            compose_step(rates, setup, {**step, "scored": _scored(setup, step)}, run["layers"]) for step in timed
        ]
        shallow_rate = rates["vision_per_patch_shallow_trl" if setup.trainer == "trl" else "vision_per_patch_shallow"]
        shallow_vision = statistics.mean(step["patches"] for step in timed) * shallow_rate
        composed = statistics.mean(
            parts["decoder layers"] + parts["LM head and loss"] for parts in composed_parts
        ) + shallow_vision  # fmt: skip
        report["runs"][label] = {
            "measured_forward_backward": measured,
            "composed_forward_backward": composed,
            "error": composed / measured - 1,
            "measured_data": statistics.mean(step["data_seconds"] for step in timed),
            "measured_optimizer": statistics.mean(step["optimizer_seconds"] for step in timed),
        }
        if run["setup"] == "package defaults":
            by_layers[run["layers"]] = (timed, composed_parts)
    if 2 in by_layers and 4 in by_layers:
        (two, composed_two), (four, _) = by_layers[2], by_layers[4]
        same = [a["real"] for a in two] == [b["real"] for b in four]
        slope = statistics.mean(
            (b["forward_backward_seconds"] - a["forward_backward_seconds"]) / 2 for a, b in zip(two, four)
        )
        composed_layer = statistics.mean(parts["decoder layers"] / 2 for parts in composed_two)
        report["slope"] = {
            "same_batches": same,
            "measured_per_layer": slope,
            "composed_per_layer": composed_layer,
            "error": composed_layer / slope - 1 if slope > 0 else None,
        }
    return report


def _scored(setup: Setup, step: dict[str, float]) -> float:
    return step["rows"] * (step["longest"] - 1) if setup.head == "all" else step["labelled"]


# ---------------------------------------------------------------------------------------------------------------------
# Orchestration and the results file


def run_size(spec: dict[str, Any], size: str) -> dict[str, Any]:
    path = Path(spec["workdir"]) / f"units_{size}.json"
    if spec.get("reuse_units") and path.exists():  # a finished measurement of this work folder, written as is
        print(f"[{size}] unit measurements reused from {path}", flush=True)
        return json.loads(path.read_text())
    child_spec = {**spec, "size": size}
    spec_path = path.with_suffix(".spec.json")
    spec_path.write_text(json.dumps(child_spec))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    completed = subprocess.run(
        [sys.executable, __file__, "--units_child", str(spec_path), "--units_out", str(path)], env=env, text=True
    )
    if completed.returncode or not path.exists():
        return {"size": size, "error": f"unit measurements failed (exit {completed.returncode}); see the log above"}
    return json.loads(path.read_text())


def summarize_size(measured: dict[str, Any]) -> dict[str, Any]:
    """The composed full-depth figures, the per-round spread, from one size's unit measurements."""
    rates = median_rates(measured["rounds"])
    layers = measured["layers"]
    composed = compose_all(rates, measured["epochs"], layers)
    per_round = [ratios(compose_all(unit_rates(units), measured["epochs"], layers)) for units in measured["rounds"]]
    return {
        "composed": composed,
        "ratios": ratios(composed),
        "spread": {key: spread([values[key] for values in per_round]) for key in per_round[0]},
        "rates": rates,
    }


def memory_figures(size: str, measured: dict[str, Any], composed: dict[str, Any]) -> dict[str, Any]:
    """Measured per-part memory rises, and a composed full-depth peak (fp32 on a CPU, as measured) per setup."""
    from qwen_shapes import PUBLISHED_TEXT, parameter_counts, vision_shape

    rises = {key: statistics.median(units["memory"][key] for units in measured["rounds"]) for key in measured["rounds"][0]["memory"]}  # fmt: skip
    text = PUBLISHED_TEXT[size]
    weights = 4 * sum(parameter_counts(size).values())
    lora = measured["rounds"][0]["optimizer"]["parameters"]
    states = 4 * 4 * lora  # weights, gradients, two AdamW states
    per_setup = {}
    head_key = next(key for key in rises if key.startswith(f"LM head at {HEAD_POSITIONS}"))
    vision = vision_shape(size)

    def step_memory(step: dict[str, float]) -> dict[str, float]:
        saved = measured["layers"] * step["positions"] * text["hidden_size"] * 4  # each checkpointed layer's input
        vision_saved = vision["depth"] * step["patches"] * vision["hidden_size"] * 4
        transient = max(
            rises["decoder layer per position"] * step["positions"],
            rises[head_key] / HEAD_POSITIONS * min(step["scored"], 4096),  # TRL's kernel works in 4,096-row tiles
            rises["vision tower per patch (2 blocks)"] * step["patches"],
        )
        return {"checkpointed_activations": saved + vision_saved, "largest_transient": transient}

    for name, steps in measured["epochs"].items():
        peak_step = max((step_memory(step) for step in steps), key=lambda figures: sum(figures.values()))
        per_setup[name] = {
            "weights": weights,
            "lora_and_optimizer": states,
            **peak_step,
            "peak": weights + states + sum(peak_step.values()),
        }
    return {"measured_rises": rises, "composed_peak": per_setup}


def _gib(value: float) -> str:
    return f"{value / 2**30:.2f} GiB"


def markdown(report: dict[str, Any]) -> str:
    lines = [
        "# Real-width speed on a CPU: plain TRL against the package (Qwen2.5-VL-3B and -7B, full depth COMPOSED)",
        "",
        f"Measured {report['date']} on {report['machine']} (load average at start {report['load_start']}, at end "
        f"{report['load_end']}; other work shared the machine, so absolute times are slower than an idle machine's "
        f"and the ratios are what to read). `make bench` took {report['seconds'] / 60:.1f} min for this part.",
        "",
        "Data: 2,000 generated ChartQA-like rows (chart sizes like the real set, 300-1600 x 200-1200 px), "
        f"image_max_pixels {report['settings']['image_max_pixels']:,} (recipes/chartqa.yaml), batch "
        f"{report['settings']['batch_size']}, LoRA r=16 on every language-model projection, gradient checkpointing, "
        "fp32 (this CPU has no fast bf16), sdpa attention. Models: the published config.json shapes (benchmarks/"
        "qwen_shapes.py), random weights, depth cut to 1 decoder layer and 2 vision blocks for the part measurements.",
        "",
        "How each part is obtained (MEASURED at real width, COMPOSED to the published depth and to each step's counts):",
        "",
    ]
    lines += [f"- {part}: {HOW[part]}" for part in PARTS]
    lines += ["", "## Headline: non-padding tokens/s, full depth (composed)", ""]
    lines += [
        "| model | setup | tokens/s | vs plain TRL | spread over rounds (min / median / max) | rounds | padding |"
    ]
    lines += ["| --- | --- | --- | --- | --- | --- | --- |"]
    for size, result in report["sizes"].items():
        if "error" in result:
            lines.append(f"| {size} | failed: {result['error']} | | | | | |")
            continue
        summary = result["summary"]
        for name, figures in summary["composed"].items():
            ratio = summary["ratios"].get(f"{name}: tokens/s")
            band = summary["spread"].get(f"{name}: tokens/s")
            lines.append(
                f"| {size} | {name} | {figures['tokens_per_second']:.3g} | "
                + (f"{ratio:.2f}x" if ratio else "1.00x")
                + " | "
                + (
                    f"{band['min']:.2f} / {band['median']:.2f} / {band['max']:.2f} ({band['relative']:.1%})"
                    if band
                    else ""
                )
                + f" | {len(result['measured']['rounds'])}{'' if result['measured']['stable'] else ' (not stable)'}"
                + f" | {figures['padding_share']:.1%} |"
            )
    lines += ["", "## Targets (printed, never asserted)", ""]
    lines += report["targets"]
    for size, result in report["sizes"].items():
        if "error" in result:
            continue
        summary, measured = result["summary"], result["measured"]
        names = list(summary["composed"])
        lines += ["", f"## {size}: seconds per step by part (mean over the epoch's steps)", ""]
        lines += ["| part | " + " | ".join(names) + " | how |", "|" + " --- |" * (len(names) + 2)]
        for part in PARTS:
            cells = [f"{summary['composed'][name]['parts'][part]:.2f}" for name in names]
            lines.append(f"| {part} | " + " | ".join(cells) + f" | {HOW[part]} |")
        totals = [f"{summary['composed'][name]['step_seconds']:.1f}" for name in names]
        lines.append("| step (composed) | " + " | ".join(totals) + " | sum of the parts |")
        lines += ["", "Part ratios (setup / plain TRL, per step; spread over rounds):", ""]
        for key, band in summary["spread"].items():
            if key.endswith("tokens/s"):
                continue
            lines.append(
                f"- {key}: {summary['ratios'][key]:.2f} ({band['min']:.2f} / {band['median']:.2f} / {band['max']:.2f})"
            )
        memory = result["memory"]
        lines += ["", "Memory: rises MEASURED during each part (peak resident memory above its start):", ""]
        lines += [f"- {key}: {value / 2**20:.2f} MiB" for key, value in memory["measured_rises"].items()]
        lines += [
            "",
            "Peak memory of a full-depth step, COMPOSED (fp32 weights on a CPU; the epoch's most demanding step):",
            "",
        ]
        for name, figures in memory["composed_peak"].items():
            lines.append(
                f"- {name}: {_gib(figures['peak'])} = weights {_gib(figures['weights'])} + LoRA and AdamW "
                f"{_gib(figures['lora_and_optimizer'])} + checkpointed activations "
                f"{_gib(figures['checkpointed_activations'])} + largest transient {_gib(figures['largest_transient'])}"
            )
        if not measured["same_model"]:
            lines.append(f"- NOTE: the trainers built different models: {measured['signatures']}")
        trl_rounds = [units["vision_trl"] for units in measured["rounds"] if "vision_trl" in units]
        if trl_rounds and all(vision["backward"] for vision in trl_rounds):
            backward_share = statistics.median(1 - v["forward_seconds"] / v["seconds"] for v in trl_rounds)
            plain = summary["composed"][BASELINE]
            lines += [
                "",
                "Plain TRL runs a backward pass through the frozen vision tower: transformers' "
                "`enable_input_require_grads` (called for LoRA with gradient checkpointing) makes the patch "
                "embedding's output require gradients, so every vision block is recomputed and back-propagated "
                f"although nothing in it trains: {backward_share:.0%} of its vision tower's time (measured), about "
                f"{backward_share * plain['parts']['vision tower'] / plain['step_seconds']:.0%} of its step here. The "
                "package runs a frozen tower forward only (`modeling.frozen_vision`).",
            ]
        lines.append(
            f"\nMeasurement process peak memory: {_gib(measured['peak_rss_bytes'])}; {measured['seconds']:.0f} s."
        )
    check = report.get("check")
    lines += ["", "## Check: the composition against a shallow model trained through the real trainers", ""]
    if not check:
        lines.append("Not run (`--check_sizes none`).")
    for size, figures in (check or {}).items():
        lines.append(
            f"{size} at real width, 2 vision blocks, full vocabulary, batch {report['settings']['check_batch_size']}, "
            f"image_max_pixels {report['settings']['check_image_max_pixels']:,}, "
            f"{report['settings']['check_steps'] - 1} timed steps per run (forward + backward of each step):"
        )
        lines.append("")
        for label, run in figures["runs"].items():
            if "measured_forward_backward" not in run:
                lines.append(f"- {label}: failed: {run.get('error')}")
                continue
            lines.append(
                f"- {label}: measured {run['measured_forward_backward']:.1f} s, composed "
                f"{run['composed_forward_backward']:.1f} s ({run['error']:+.0%})"
            )
        slope = figures.get("slope")
        if slope:
            lines.append(
                f"- per decoder layer (4 layers - 2 layers, {'the same' if slope['same_batches'] else 'DIFFERENT'} "
                f"batches): measured {slope['measured_per_layer']:.2f} s, composed {slope['composed_per_layer']:.2f} s"
                + (f" ({slope['error']:+.0%})" if slope["error"] is not None else "")
            )
        lines.append("")
    lines += ["", f"Settings: {report['settings']}"]
    return "\n".join(lines) + "\n"


def targets(report: dict[str, Any]) -> list[str]:
    lines = []
    for size, result in report["sizes"].items():
        if "error" in result:
            continue
        summary = result["summary"]
        ratio = summary["ratios"]["all features: tokens/s"]
        band = summary["spread"]["all features: tokens/s"]["relative"]
        met = ratio >= TARGET_RATIO and band < TARGET_SPREAD
        lines.append(
            f"- {size}: all features {ratio:.2f}x plain TRL's tokens/s (target >= {TARGET_RATIO}x), spread over "
            f"rounds {band:.1%} (target < {TARGET_SPREAD:.0%}): {'MET' if met else 'NOT MET'}"
        )
        lines += packing_targets(size, result)
    return lines


def packing_targets(size: str, result: dict[str, Any]) -> list[str]:
    """issue 18's packing targets: per-row loss equal to unpacked within 1e-5, padding share 0, tokens/s at least
    grouping's (the package defaults)."""
    summary, check = result["summary"], result["measured"]["packed_loss_check"]
    packed, grouped = summary["composed"][PACKING], summary["composed"]["package defaults"]
    speed = packed["tokens_per_second"] / grouped["tokens_per_second"]
    loss_met = check["max_row_loss_difference"] <= TARGET_PACKED_LOSS
    return [
        f"- {size}: token-budget packing ({result['measured']['max_tokens_per_batch']:,} tokens per sequence): "
        f"per-row loss against the rows padded {check['max_row_loss_difference']:.1e} (largest of {check['rows']} "
        f"rows; target <= {TARGET_PACKED_LOSS:.0e}): {'MET' if loss_met else 'NOT MET'}; padding share "
        f"{packed['padding_share']:.1%} (target 0): {'MET' if packed['padding_share'] == 0 else 'NOT MET'}; "
        f"{speed:.2f}x grouping's tokens/s (target >= 1.00x): {'MET' if speed >= 1 else 'NOT MET'}"
    ]


def results_summary(report: dict[str, Any]) -> dict[str, Any]:
    """What the results file keeps (a few KB): the report without each size's per-step epoch plans, sampled batches
    and the check runs' raw per-step figures, which the full report in the work folder keeps."""
    summary = {**report, "sizes": {}, "check": {}}
    for size, result in report["sizes"].items():
        if "measured" not in result:
            summary["sizes"][size] = result
            continue
        dropped = ("epochs", "sampled_batches")
        measured = {key: value for key, value in result["measured"].items() if key not in dropped}
        summary["sizes"][size] = {**result, "measured": measured}
    for size, check in report.get("check", {}).items():
        summary["check"][size] = {key: value for key, value in check.items() if key != "raw"}
    return summary


def previous_headline(path: Path) -> dict[str, float]:
    if not path.exists():
        return {}
    try:
        old = json.loads(path.read_text())
        return {
            size: r["summary"]["ratios"]["all features: tokens/s"]
            for size, r in old["sizes"].items()
            if "summary" in r
        }
    except (KeyError, ValueError):
        return {}


def default_budget(workdir: Path, data: Path, batch_size: int, image_max_pixels: int) -> int:
    """`speed.token_budget` of the benchmark's rows, counted by the processor the trainers use."""
    import speed
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(speed.tiny_model(workdir), max_pixels=image_max_pixels)
    lengths = [count.total for count in speed.row_token_counts(speed.formatted_rows(data), processor)]
    return speed.token_budget(sum(lengths) / len(lengths), max(lengths), batch_size)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--units_child", help=argparse.SUPPRESS)
    parser.add_argument("--units_out", help=argparse.SUPPRESS)
    parser.add_argument("--sizes", default="3B,7B", help="Model sizes, of 3B, 7B (and 'test', a wiring check).")
    parser.add_argument("--check_sizes", default="3B", help="Sizes checked on a shallow model ('none' to skip).")
    parser.add_argument("--check_plain", action="store_true", help="Also check plain TRL's composition (slow).")
    parser.add_argument(
        "--reuse_units",
        action="store_true",
        help="Take each size's unit measurements from the work folder's last finished run (units_<size>.json) instead "
        "of measuring again: the results file, or the shallow-model check, from units already measured.",
    )
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--unique_rows", type=int, default=200)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--image_max_pixels", type=int, default=1003520)
    parser.add_argument(
        "--max_tokens_per_batch",
        type=int,
        default=None,
        help="Token-budget packing's budget (default: as many tokens per step as a batch of --batch_size rows).",
    )
    parser.add_argument("--vision_images", type=int, default=1, help="Images the vision unit runs on each round.")
    parser.add_argument("--data_steps", type=int, default=2, help="Dataloader steps per setup per round.")
    parser.add_argument("--min_rounds", type=int, default=2)
    parser.add_argument("--max_rounds", type=int, default=8)
    parser.add_argument(
        "--tolerance", type=float, default=0.03, help="Stop when one more round moves every watched ratio less."
    )
    parser.add_argument("--budget_minutes", type=float, default=5.0, help="Per size: stop adding rounds after this.")
    parser.add_argument("--check_batch_size", type=int, default=2)
    parser.add_argument("--check_steps", type=int, default=3, help="Steps per check run (the first is warm-up).")
    parser.add_argument("--check_image_max_pixels", type=int, default=100352, help="Small images: cheap steps.")
    parser.add_argument("--workdir", default=str(REPO / ".cache" / "bench" / "real_width"))
    parser.add_argument("--results", default=str(REPO / "benchmarks" / "results"))
    parser.add_argument("--name", default="cpu_real_width")
    args = parser.parse_args(argv)
    if args.units_child:
        spec = json.loads(Path(args.units_child).read_text())
        Path(args.units_out).write_text(json.dumps(measure_units(spec)))
        return
    import platform

    import speed

    started = _now()
    load_start = os.getloadavg()
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    data = speed.chartqa_like_dataset(workdir, args.rows, args.unique_rows)
    check_data = speed.chartqa_like_dataset(workdir, 64, 32)
    budget = args.max_tokens_per_batch or default_budget(workdir, data, args.batch_size, args.image_max_pixels)
    spec = {
        **{key: value for key, value in vars(args).items() if key not in ("units_child", "units_out")},
        "workdir": str(workdir),
        "data": str(data),
        "check_data": str(check_data),
        "budget_seconds": args.budget_minutes * 60,
        "max_tokens_per_batch": budget,
    }
    sizes = [size.strip() for size in args.sizes.split(",") if size.strip()]
    report: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": f"{os.cpu_count()} CPU cores ({platform.processor() or platform.machine()})",
        "load_start": " ".join(f"{value:.1f}" for value in load_start),
        "settings": {key: value for key, value in spec.items() if key not in ("workdir", "results")},
        "sizes": {},
    }
    for size in sizes:
        measured = run_size(spec, size)
        if "error" in measured:
            report["sizes"][size] = measured
            continue
        summary = summarize_size(measured)
        report["sizes"][size] = {
            "measured": measured,
            "summary": summary,
            "memory": memory_figures(size, measured, summary["composed"]),
        }
    check_sizes = [] if args.check_sizes == "none" else [s.strip() for s in args.check_sizes.split(",")]
    report["check"] = {}
    for size in check_sizes:
        if size not in report["sizes"] or "summary" not in report["sizes"][size]:
            continue
        measured = report["sizes"][size]["measured"]
        rates = dict(report["sizes"][size]["summary"]["rates"])
        vision_rounds = [units["vision"] for units in measured["rounds"]]
        rates["vision_per_patch_shallow"] = statistics.median(v["seconds"] / v["patches"] for v in vision_rounds)
        trl_rounds = [units["vision_trl"] for units in measured["rounds"]]
        rates["vision_per_patch_shallow_trl"] = statistics.median(v["seconds"] / v["patches"] for v in trl_rounds)
        runs = check_runs(spec, size, args.check_plain)
        report["check"][size] = check_composition(runs, rates)
        report["check"][size]["raw"] = {
            label: {k: v for k, v in run.items() if k != "log"} for label, run in runs.items()
        }
    report["load_end"] = " ".join(f"{value:.1f}" for value in os.getloadavg())
    report["seconds"] = _now() - started
    report["targets"] = targets(report)
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    before = previous_headline(results / f"{args.name}.json")
    for size, old in before.items():
        new = report["sizes"].get(size, {}).get("summary", {}).get("ratios", {}).get("all features: tokens/s")
        if new:
            report["targets"].append(
                f"- {size}: this run moved the all-features ratio by {new / old - 1:+.1%} from the last results file"
            )
    (workdir / f"{args.name}_full.json").write_text(json.dumps(report, indent=1))
    (results / f"{args.name}.json").write_text(json.dumps(results_summary(report), indent=1))
    (results / f"{args.name}.md").write_text(markdown(report))
    print(markdown(report))
    print(
        f"written: {results / args.name}.md and .json ({report['seconds'] / 60:.1f} min); every figure: "
        f"{workdir / args.name}_full.json"
    )


if __name__ == "__main__":
    main()
