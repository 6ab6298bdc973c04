"""Attention per step at Qwen2.5-VL real width on a CPU: length grouping (a padded batch under sdpa) against token-budget
packing with sdpa over the whole packed sequence (the block-diagonal mask, as before `modeling.segment_attention`) and
with each packed row attended alone (what the trainers run now).

    python benchmarks/packing_attention.py --size 3B --reps 3

The part of `benchmarks/real_width.py` that packing changes, measured on its own (seconds): each setup's median batch
of one epoch of 2,000 ChartQA-like rows (the same data, batch 4 and budget as `make bench`), its attention kernel
forward twice (gradient checkpointing recomputes it) and backward, in CPU seconds of one thread, `--reps` times
(median); per step = per score element x the epoch's mean score elements per step, times the published layer count.
Everything else in a step (projections, MLP, LM head, vision tower) does not depend on the attention kernel.
"""

import argparse
import statistics
import sys
from pathlib import Path


REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "benchmarks"))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="3B", help="3B or 7B (published shapes, benchmarks/qwen_shapes.py).")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--unique_rows", type=int, default=200)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--max_tokens_per_batch", type=int, default=3136, help="make bench's default budget.")
    parser.add_argument("--image_max_pixels", type=int, default=1003520)
    parser.add_argument("--workdir", default=str(REPO / ".cache" / "bench" / "real_width"))
    args = parser.parse_args(argv)

    import real_width
    import speed
    import torch
    from qwen_shapes import real_width_config
    from transformers import AutoConfig, AutoProcessor
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLAttention

    from vlm_recipes.modeling.segment_attention import SEGMENT_SDPA, register_segment_sdpa
    from vlm_recipes.training.sampling import LengthGroupedSampler, first_fit_decreasing

    torch.set_num_threads(real_width.MEASURE_THREADS)
    workdir = Path(args.workdir)
    tiny = speed.tiny_model(workdir)
    data = speed.chartqa_like_dataset(workdir, args.rows, args.unique_rows)
    processor = AutoProcessor.from_pretrained(tiny, max_pixels=args.image_max_pixels)
    lengths = [count.total for count in speed.row_token_counts(speed.formatted_rows(data), processor)]

    grouped = real_width.fixed_batches(list(LengthGroupedSampler(lengths, args.batch_size, seed=42)), args.batch_size)
    packed = first_fit_decreasing(lengths, args.max_tokens_per_batch)
    text_config = real_width_config(AutoConfig.from_pretrained(tiny), args.size).text_config
    text_config._attn_implementation = "sdpa"
    attention = Qwen2_5_VLAttention(text_config, layer_idx=0)
    register_segment_sdpa()
    setups = {
        "length grouping (padded, sdpa)": (grouped, "padded", "sdpa", "padded"),
        "packing, sdpa over the packed sequence": (packed, "packed", "sdpa", "dense"),
        "packing, each row alone (segment sdpa)": (packed, "packed", SEGMENT_SDPA, "rows"),
    }
    results = {}
    for name, (batches, layout, kernel, count) in setups.items():
        batch = real_width.median_batch(batches, lengths, layout)
        measured = [real_width.time_attention(attention, text_config, batch, layout, kernel) for _ in range(args.reps)]
        seconds = statistics.median(seconds for seconds, _ in measured)
        per_element = seconds / measured[0][1]
        elements = []
        for rows_of_step in batches:
            step_lengths = [lengths[index] for index in rows_of_step]
            if count == "padded":
                elements.append(len(step_lengths) * max(step_lengths) ** 2)
            elif count == "dense":
                elements.append(sum(step_lengths) ** 2)
            else:
                elements.append(sum(length * length for length in step_lengths))
        tokens = sum(lengths) / len(batches)
        per_step = per_element * statistics.mean(elements) * text_config.num_hidden_layers
        spread = [s for s, _ in measured]
        results[name] = (per_step, tokens, per_step / tokens * 1000, min(spread), max(spread))
    print(f"Qwen2.5-VL-{args.size} attention, {text_config.num_hidden_layers} layers, CPU seconds of one thread:")
    print("| setup | attention s/step | tokens/step | attention ms/token | median batch s (min-max over reps) |")
    print("| --- | --- | --- | --- | --- |")
    for name, (per_step, tokens, per_token, low, high) in results.items():
        print(f"| {name} | {per_step:,.0f} | {tokens:,.0f} | {per_token:.1f} | {low:.2f}-{high:.2f} |")


if __name__ == "__main__":
    main()
