"""How many samples per second TRL's vision SFT collator and ours (`VisionSFTCollator`) collate, on the same batches.

    python benchmarks/collator_speed.py [--batch_size 8 --batches 3 --rounds 5 --turns 1 --threads 2]

Builds the tiny Qwen2.5-VL (its processor is the real one's: 28x28 pixels per image token, no pixel cap), draws
800x600 charts with `turns` questions and answers each, and collates them with assistant-only loss (TRL's training
chat template) in this one process. Each batch is collated `rounds` times by each collator, alternating which goes
first; a collator's time for a batch is its best round (the one least disturbed by other work on the machine). The
two outputs are compared key by key; prints one line. `make bench` imports `measure_collators_on_tiny_model`
(or `measure_collators`, for any processor and rows).
"""

import argparse
import random
import sys
import time
from pathlib import Path
from typing import Any


def chart_examples(
    num_examples: int, size: tuple[int, int] = (800, 600), turns: int = 1, seed: int = 0
) -> list[dict[str, Any]]:
    """SFT rows of one generated chart each: `turns` question/answer turns about it, the image in the first."""
    from vlm_recipes.data.synthetic import ImageSizeRange, random_chart

    rng = random.Random(seed)
    sizes = ImageSizeRange(min_width=size[0], max_width=size[0], min_height=size[1], max_height=size[1])
    examples = []
    for _ in range(num_examples):
        chart = random_chart(rng, sizes)
        messages = []
        for turn in range(turns):
            question, answer = chart.questions[turn % len(chart.questions)]
            image = [{"type": "image"}] if turn == 0 else []
            messages += [
                {"role": "user", "content": [*image, {"type": "text", "text": question}]},
                {"role": "assistant", "content": [{"type": "text", "text": answer}]},
            ]
        examples.append({"images": [chart.image], "messages": messages})
    return examples


def _differing_keys(ours: dict[str, Any], theirs: dict[str, Any]) -> list[str]:
    import torch

    keys = sorted(set(ours) | set(theirs))
    return [key for key in keys if key not in ours or key not in theirs or not torch.equal(ours[key], theirs[key])]


def _seconds(collator: Any, batch: list[dict[str, Any]]) -> tuple[float, float, dict[str, Any]]:
    """Wall and CPU seconds (all of this process's threads) of collating one batch, and the output."""
    rows = [dict(row) for row in batch]  # TRL's collator may rewrite the rows it is given
    wall, cpu = time.perf_counter(), time.process_time()
    output = collator(rows)
    return time.perf_counter() - wall, time.process_time() - cpu, output


def measure_collators(
    processor: Any,
    examples: list[dict[str, Any]],
    batch_size: int = 8,
    rounds: int = 5,
    chat_template: str | None = None,
) -> dict[str, Any]:
    """Time TRL's `DataCollatorForVisionLanguageModeling` and our `VisionSFTCollator` (both with assistant-only loss)
    on the same batches of `examples`, and check that they give the same tensors.

    `chat_template` defaults to TRL's training template for the processor's stock one, as SFTTrainer swaps in.
    Returns samples/s of each (from each batch's best round), our speed-up in wall and in CPU time, and whether every
    output was identical.
    """
    from trl.chat_template_utils import get_training_chat_template
    from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling

    from vlm_recipes.training.collators import VisionSFTCollator

    template = chat_template or get_training_chat_template(processor)
    arguments = dict(processor=processor, assistant_only_loss=True, chat_template=template)
    contenders = {"trl": DataCollatorForVisionLanguageModeling(**arguments), "ours": VisionSFTCollator(**arguments)}
    batches = [examples[start : start + batch_size] for start in range(0, len(examples), batch_size)]
    best = {name: [float("inf")] * len(batches) for name in contenders}  # wall seconds per batch
    best_cpu = {name: [float("inf")] * len(batches) for name in contenders}
    differing: set[str] = set()
    for round_index in range(rounds):
        order = list(contenders) if round_index % 2 == 0 else list(reversed(contenders))
        for index, batch in enumerate(batches):
            outputs = {}
            for name in order:
                seconds, cpu_seconds, outputs[name] = _seconds(contenders[name], batch)
                best[name][index] = min(best[name][index], seconds)
                best_cpu[name][index] = min(best_cpu[name][index], cpu_seconds)
            if round_index == 0:
                differing.update(_differing_keys(outputs["ours"], outputs["trl"]))
    samples = sum(len(batch) for batch in batches)
    trl_speed, our_speed = (samples / sum(best[name]) for name in ("trl", "ours"))
    return {
        "batch_size": batch_size,
        "batches": len(batches),
        "samples": samples,
        "rounds": rounds,
        "trl_samples_per_s": trl_speed,
        "ours_samples_per_s": our_speed,
        "speedup": our_speed / trl_speed,
        # CPU time is less sensitive than wall time to other processes on a shared machine
        "cpu_speedup": sum(best_cpu["trl"]) / sum(best_cpu["ours"]),
        "identical": not differing,
        "differing_keys": sorted(differing),
    }


class EncodedRows:
    """Rows whose images are PNG bytes, decoded when a row is read, as a `datasets` image column is: in a DataLoader with
    workers, decoding happens in the workers too."""

    def __init__(self, examples: list[dict[str, Any]]):
        import io

        def png(image: Any) -> bytes:
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            return buffer.getvalue()

        self.rows = [{**row, "images": [png(image) for image in row["images"]]} for row in examples]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, Any]:
        import io

        from PIL import Image

        row = self.rows[index]
        images = []
        for data in row["images"]:
            image = Image.open(io.BytesIO(data))
            image.load()
            images.append(image)
        return {**row, "images": images}


def measure_pipelines(
    processor: Any, examples: list[dict[str, Any]], batch_size: int = 8, workers: int = 2, epochs: int = 2
) -> dict[str, Any]:
    """Samples/s of the whole data pipeline (read and decode each image, collate) through a DataLoader: TRL's collator
    as TRL runs it (no workers, the default), ours with `workers` DataLoader workers (the package's default on GPU
    machines, where the cores are free for data work). The first batch of each epoch (worker start-up) is not timed."""
    from torch.utils.data import DataLoader
    from trl.chat_template_utils import get_training_chat_template
    from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling

    from vlm_recipes.training.collators import VisionSFTCollator

    arguments = dict(
        processor=processor, assistant_only_loss=True, chat_template=get_training_chat_template(processor)
    )
    rows = EncodedRows(examples)
    setups = {
        "trl": (DataCollatorForVisionLanguageModeling(**arguments), 0),
        "ours": (VisionSFTCollator(**arguments), workers),
    }
    speed = {}
    for name, (collator, num_workers) in setups.items():
        loader = DataLoader(rows, batch_size=batch_size, collate_fn=collator, num_workers=num_workers)
        samples, seconds = 0, 0.0
        for _ in range(epochs):
            iterator = iter(loader)
            next(iterator)  # worker start-up and the first batch: not timed
            started = time.perf_counter()
            for batch in iterator:
                samples += batch["input_ids"].shape[0]
            seconds += time.perf_counter() - started
        speed[name] = samples / seconds
    return {
        "workers": workers,
        "trl_pipeline_samples_per_s": speed["trl"],
        "ours_pipeline_samples_per_s": speed["ours"],
        "pipeline_speedup": speed["ours"] / speed["trl"],
    }


def measure_collators_on_tiny_model(
    workdir: str | Path,
    batch_size: int = 8,
    batches: int = 3,
    rounds: int = 5,
    turns: int = 1,
    size: tuple[int, int] = (800, 600),
) -> dict[str, Any]:
    """`measure_collators` with the tiny Qwen2.5-VL (built in `workdir`, or reused) on generated charts of `size`."""
    from transformers import AutoProcessor

    from vlm_recipes.testing.tiny_models import build_tiny_model

    model = build_tiny_model("qwen2_5_vl", Path(workdir) / "tiny_qwen2_5_vl")
    processor = AutoProcessor.from_pretrained(model)
    examples = chart_examples(batch_size * batches, size, turns)
    figures = measure_collators(processor, examples, batch_size, rounds)
    pipeline = measure_pipelines(processor, chart_examples(batch_size * 6, size, turns, seed=1), batch_size)
    summary = (
        f"batch {batch_size}, {size[0]}x{size[1]} images, {turns} answer turn(s): in one process TRL "
        f"{figures['trl_samples_per_s']:.1f} samples/s, ours {figures['ours_samples_per_s']:.1f} "
        f"({figures['speedup']:.2f}x, outputs {'identical' if figures['identical'] else 'DIFFERENT'}); whole pipeline "
        f"(decode + collate) TRL without workers {pipeline['trl_pipeline_samples_per_s']:.1f} samples/s, ours with "
        f"{pipeline['workers']} workers {pipeline['ours_pipeline_samples_per_s']:.1f} ({pipeline['pipeline_speedup']:.2f}x)"
    )
    return {**figures, **pipeline, "image_size": f"{size[0]}x{size[1]}", "turns": turns, "summary": summary}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--batches", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--turns", type=int, default=1, help="question/answer turns per row (assistant spans)")
    parser.add_argument("--width", type=int, default=800)
    parser.add_argument("--height", type=int, default=600)
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--workdir", default=".cache/bench/collator")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    figures = measure_collators_on_tiny_model(
        args.workdir, args.batch_size, args.batches, args.rounds, args.turns, (args.width, args.height)
    )
    print(
        f"SFT collator, batch {args.batch_size}, {args.width}x{args.height}, {args.turns} turn(s), "
        f"{args.threads} thread(s): TRL {figures['trl_samples_per_s']:.1f} samples/s, ours "
        f"{figures['ours_samples_per_s']:.1f} samples/s ({figures['speedup']:.2f}x; CPU time "
        f"{figures['cpu_speedup']:.2f}x); outputs "
        + ("identical" if figures["identical"] else f"DIFFER in {', '.join(figures['differing_keys'])}")
    )
    return 0 if figures["identical"] else 1


if __name__ == "__main__":
    sys.exit(main())
