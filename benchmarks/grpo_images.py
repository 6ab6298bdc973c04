"""`make bench`'s GRPO images-once row: a generation batch's image encodings with and without `ImageFeatureCache`.

    python benchmarks/grpo_images.py                      # the recipe's shape: 2 prompts x 8 generations, beta > 0
    python benchmarks/grpo_images.py --num_generations 4 --prompts 4

TRL's GRPO batch repeats each prompt, image included, once per generation, and encodes every copy in each pass that
reads the batch: the generation's prefill, the reference pass (beta > 0) and the policy's training pass (and an
old-policy pass where TRL runs one: not counted here). With the vision tower frozen the package encodes each distinct
image once per generation batch (`training.image_features.ImageFeatureCache`), so the tower runs P times instead of
P x G x passes.

Two figures:

- plumbing (tiny random Qwen2.5-VL, a toy shape, never a headline): the real path, MEASURED: `generate` (prefill and
  a few decoding steps), then two forwards without gradient standing for the reference and policy passes, on P x G
  rows, with and without the cache; images encoded counted, the logits compared (equal), wall seconds timed;
- real width (Qwen2.5-VL-3B's vision tower as published, `benchmarks/qwen_shapes.py`): the tower's forward MEASURED
  per image on a 2-block tower (one window-attention block, one full-attention block, patch embedding and merger;
  `real_width.time_vision`, CPU seconds on one thread), COMPOSED to 32 blocks (28 window, 4 full), then to a generation
  batch: per image x images encoded (P x G x passes without the cache, P with it).

Output: benchmarks/results/cpu_grpo_images.md and .json.
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any


REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "benchmarks"))

CHART_SIZE = (812, 588)  # a ChartQA-sized chart, in the processor's 28-pixel steps: 58 x 42 patches, 609 image tokens


def chart_images(count: int, size: tuple[int, int]) -> list[Any]:
    """`count` distinct charts (each prompt its own image): bars of different heights on white."""
    from PIL import Image, ImageDraw

    images = []
    for index in range(count):
        image = Image.new("RGB", size, "white")
        draw = ImageDraw.Draw(image)
        for bar in range(5):
            height = (index * 37 + bar * 53) % (size[1] - 40) + 20
            draw.rectangle(
                [40 + bar * 120, size[1] - height, 120 + bar * 120, size[1] - 10], fill=(30, 60 + bar * 30, 160)
            )
        images.append(image)
    return images


def generation_batch(processor: Any, images: list[Any], generations: int) -> dict[str, Any]:
    """P prompts, each repeated once per generation with its image, as TRL lays out a generation batch."""
    prompt = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is the highest value?"}]}]
    text = processor.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
    rows = [[image] for image in images for _ in range(generations)]
    processor.tokenizer.padding_side = "left"  # generation pads on the left, as TRL's does
    return processor(text=[text] * len(rows), images=rows, return_tensors="pt", padding=True)


def plumbing(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """The tiny model's generation batch through generate + two passes, with and without the cache (MEASURED)."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from vlm_recipes.testing.tiny_models import build_tiny_model
    from vlm_recipes.training.image_features import ImageFeatureCache

    folder = build_tiny_model("qwen2_5_vl", workdir / "tiny_qwen2_5_vl")
    processor = AutoProcessor.from_pretrained(folder, max_pixels=args.image_max_pixels)
    model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32).eval()
    batch = generation_batch(processor, chart_images(args.prompts, CHART_SIZE), args.num_generations)
    passes = 2 + (args.beta > 0)

    def one_batch(cache: ImageFeatureCache | None) -> tuple[float, int, Any]:
        counted = {"encoded": 0}

        def count(module: Any, a: Any, k: Any, output: Any) -> None:  # every image the tower encodes, cache or not
            counted["encoded"] += len(k["grid_thw"] if "grid_thw" in k else a[1])

        hook = model.model.visual.register_forward_hook(count, with_kwargs=True)
        started = time.perf_counter()
        try:
            with torch.no_grad(), cache.serving(model) if cache else _nothing():
                model.generate(**batch, max_new_tokens=args.max_completion_length, do_sample=False)
                for _ in range(passes - 1):  # the reference's and the policy's passes over the same rows
                    logits = model(**batch).logits
        finally:
            hook.remove()
        return time.perf_counter() - started, counted["encoded"], logits

    rounds = {"without": [], "with": []}
    for _ in range(args.rounds):
        seconds, encoded_plain, plain_logits = one_batch(None)
        rounds["without"].append(seconds)
        cache = ImageFeatureCache()
        seconds, encoded_cached, cached_logits = one_batch(cache)
        rounds["with"].append(seconds)
    return {
        "rows": args.prompts * args.num_generations,
        "passes": passes,
        "images_encoded": {"without": encoded_plain, "with": encoded_cached},
        "logits_max_difference": float((plain_logits - cached_logits).abs().max()),
        "wall_seconds": {name: statistics.median(values) for name, values in rounds.items()},
        "wall_seconds_rounds": rounds,
    }


def real_width(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """Qwen2.5-VL-3B's vision tower per image (MEASURED on 2 blocks, COMPOSED to 32) and per generation batch."""
    import torch
    from qwen_shapes import PUBLISHED_VISION, real_width_config
    from real_width import time_vision
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

    from vlm_recipes.testing.tiny_models import build_tiny_model

    torch.set_num_threads(1)  # CPU seconds on one thread: other work on the machine leaves them almost unchanged
    tiny = build_tiny_model("qwen2_5_vl", workdir / "tiny_qwen2_5_vl")
    config = real_width_config(AutoConfig.from_pretrained(tiny), "3B", text_layers=1, vision_depth=2, vocab_size=512)
    model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32).eval()
    visual = model.model.visual
    processor = AutoProcessor.from_pretrained(tiny, max_pixels=args.image_max_pixels)
    image = processor.image_processor(images=[chart_images(1, CHART_SIZE)[0]], return_tensors="pt")
    full_blocks = set(config.vision_config.fullatt_block_indexes)
    measured = []
    with torch.no_grad():  # the frozen tower: forward only, as the package runs it (`modeling.frozen_vision`)
        time_vision(visual, image["pixel_values"], image["image_grid_thw"])  # warm-up
        for _ in range(args.rounds):
            timed = time_vision(visual, image["pixel_values"], image["image_grid_thw"])
            window = [t for i, t in enumerate(timed["blocks"]) if i not in full_blocks]
            full = [t for i, t in enumerate(timed["blocks"]) if i in full_blocks]
            outside = timed["forward_seconds"] - sum(timed["blocks"])  # patch embedding, rotary, merger
            depth, published_full = PUBLISHED_VISION["depth"], len(PUBLISHED_VISION["fullatt_block_indexes"])
            measured.append(outside + (depth - published_full) * window[0] + published_full * full[0])
    per_image = statistics.median(measured)
    patches = int(image["image_grid_thw"].prod())
    passes = 2 + (args.beta > 0)
    encoded = {"without": args.prompts * args.num_generations * passes, "with": args.prompts}
    return {
        "patches_per_image": patches,
        "image_tokens_per_image": patches // 4,
        "vision_seconds_per_image": per_image,
        "vision_seconds_per_image_rounds": measured,
        "passes": passes,
        "images_encoded": encoded,
        "vision_seconds_per_generation_batch": {name: per_image * count for name, count in encoded.items()},
    }


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> None:
        return None


def markdown(report: dict[str, Any]) -> str:
    s, tiny, real = report["settings"], report["plumbing"], report["real_width"]
    saved = real["vision_seconds_per_generation_batch"]
    lines = [
        "# GRPO images once: a generation batch's image encodings with and without ImageFeatureCache (CPU)",
        "",
        f"Measured {report['measured']} on {report['machine']} by `python benchmarks/grpo_images.py` "
        f"(`make bench`). Generation batch: {s['prompts']} prompts x {s['num_generations']} generations, beta "
        f"{s['beta']:g} (passes that encode images without the cache: generation prefill, "
        f"{'reference, ' if s['beta'] > 0 else ''}policy = {real['passes']}; an old-policy pass, where TRL runs one, "
        "would add one more). One chart per prompt, "
        f"{CHART_SIZE[0]} x {CHART_SIZE[1]} px, image_max_pixels {s['image_max_pixels']:,}.",
        "",
        "## Real width: Qwen2.5-VL-3B's vision tower (frozen: forward only)",
        "",
        f"Per image: {real['patches_per_image']:,} patches ({real['image_tokens_per_image']:,} image tokens), "
        f"{real['vision_seconds_per_image']:.2f} CPU s on one thread (MEASURED on 2 blocks + embedding/merger, "
        f"COMPOSED to 32 blocks: 28 window, 4 full; rounds: "
        + ", ".join(f"{v:.2f}" for v in real["vision_seconds_per_image_rounds"])
        + ").",
        "",
        "| per generation batch | images encoded | vision tower CPU s (composed) |",
        "| --- | --- | --- |",
        f"| without the cache (TRL) | {real['images_encoded']['without']} | {saved['without']:.1f} |",
        f"| with ImageFeatureCache | {real['images_encoded']['with']} | {saved['with']:.1f} |",
        f"| saved | {real['images_encoded']['without'] - real['images_encoded']['with']} | "
        f"{saved['without'] - saved['with']:.1f} ({saved['without'] / saved['with']:.0f}x fewer) |",
        "",
        "On a GPU the tower's time per image is far smaller; the count of encodings, and so the share of the tower's "
        "work saved, is the same.",
        "",
        "## Plumbing: the tiny random model (a toy shape; wall times mean nothing for a real model)",
        "",
        f"`generate` ({s['max_completion_length']} new tokens) and {tiny['passes'] - 1} more forward(s) on "
        f"{tiny['rows']} rows, MEASURED: images encoded {tiny['images_encoded']['without']} without the cache, "
        f"{tiny['images_encoded']['with']} with it; largest logit difference "
        f"{tiny['logits_max_difference']:.2e}; wall s (median of {s['rounds']}) "
        f"{tiny['wall_seconds']['without']:.2f} without, {tiny['wall_seconds']['with']:.2f} with.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=2, help="Prompts per generation batch (recipes/chartqa_grpo).")
    parser.add_argument("--num_generations", type=int, default=8)
    parser.add_argument("--beta", type=float, default=0.04, help="> 0: the reference pass runs.")
    parser.add_argument("--max_completion_length", type=int, default=4, help="Plumbing: new tokens generated.")
    parser.add_argument("--image_max_pixels", type=int, default=1003520)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--workdir", default=str(REPO / ".cache" / "bench" / "grpo_images"))
    parser.add_argument("--output", default=str(REPO / "benchmarks" / "results" / "cpu_grpo_images"))
    parser.add_argument("--skip_real_width", action="store_true", help="Plumbing only (the tests' wiring check).")
    args = parser.parse_args(argv)
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    import os
    import platform

    report = {
        "measured": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{os.cpu_count()} CPU cores ({platform.machine()})",
        "settings": {key: value for key, value in vars(args).items() if key not in ("workdir", "output")},
        "plumbing": plumbing(args, workdir),
    }
    if args.skip_real_width:
        print(json.dumps(report["plumbing"], indent=2))
        return report
    report["real_width"] = real_width(args, workdir)
    output = Path(args.output)
    output.with_suffix(".json").write_text(json.dumps(report, indent=2), encoding="utf-8")
    output.with_suffix(".md").write_text(markdown(report), encoding="utf-8")
    print(markdown(report))
    return report


if __name__ == "__main__":
    main()
