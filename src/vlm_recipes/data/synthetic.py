"""Generated chart data with known values: ChartQA-shaped questions and answers, RLAIF-V-shaped preference pairs.

Rows follow the Hub dataset HuggingFaceM4/ChartQA (`image`, `query`, `label` as a list of strings,
`human_or_machine`), so the `chartqa` formatter and evaluation treat them exactly like the real data. The folder written
by `save_chartqa_dataset` holds parquet files per split and loads with `datasets.load_dataset(folder)`.

Preference rows follow openbmb/RLAIF-V-Dataset (`image`, `question`, `chosen`, `rejected`, ...): the correct answer is
`chosen`, a wrong one drawn from the same chart is `rejected`, so DPO has a real signal to learn. The evaluation tasks'
schemas (DocVQA, TextVQA, ScienceQA) come from `vlm_recipes.data.synthetic_tasks`.

    python -m vlm_recipes.data.synthetic --output_dir .cache/data/chartqa_synthetic --train_rows 256 --test_rows 32
    python -m vlm_recipes.data.synthetic --schema rlaif_v --output_dir .cache/data/rlaif_v_synthetic --train_rows 128
    python -m vlm_recipes.data.synthetic --schema docvqa --output_dir .cache/data/docvqa_synthetic
"""

import argparse
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from vlm_recipes.data import synthetic_tasks


CATEGORIES = [
    "Lamb", "Corn", "Beef", "Rice", "Fish", "Milk", "Eggs", "Pork", "Wheat", "Soy",
    "Fiji", "Madagascar", "Chile", "Peru", "Kenya", "Norway", "Japan", "Brazil", "Canada", "India",
    "Apples", "Tea", "Coffee", "Sugar", "Cotton",
]  # fmt: skip
COLORS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]
FIRST_YEAR_CHOICES = range(1990, 2015)


@dataclass(frozen=True)
class ImageSizeRange:
    """Chart sizes are drawn uniformly from these ranges (pixels)."""

    min_width: int = 96
    max_width: int = 160
    min_height: int = 72
    max_height: int = 128


# Widths and heights spread like the real ChartQA images (about 300-1600 x 200-1200 px).
REALISTIC_SIZES = ImageSizeRange(min_width=300, max_width=1600, min_height=200, max_height=1200)


def _plot_area(size: tuple[int, int]) -> tuple[int, int, int, int]:
    width, height = size
    return int(width * 0.1), int(height * 0.08), int(width * 0.95), int(height * 0.85)


def draw_bar_chart(
    labels: list[str], values: list[float], size: tuple[int, int], color: tuple[int, int, int]
) -> Image.Image:
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    left, top, right, bottom = _plot_area(size)
    draw.line([(left, top), (left, bottom), (right, bottom)], fill="black", width=1)
    slot = (right - left) / len(values)
    peak = max(values) or 1
    for index, (label, value) in enumerate(zip(labels, values)):
        x0 = left + slot * index + slot * 0.15
        x1 = left + slot * (index + 1) - slot * 0.15
        y0 = bottom - (bottom - top) * value / peak
        draw.rectangle([x0, y0, x1, bottom], fill=color)
        draw.text((x0, max(top, y0 - 11)), f"{value:g}", fill="black")
        draw.text((x0, bottom + 2), label[:6], fill="black")
    return image


def draw_line_chart(
    years: list[int], values: list[float], size: tuple[int, int], color: tuple[int, int, int]
) -> Image.Image:
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    left, top, right, bottom = _plot_area(size)
    draw.line([(left, top), (left, bottom), (right, bottom)], fill="black", width=1)
    low, high = min(values), max(values)
    span = (high - low) or 1
    step = (right - left) / max(len(values) - 1, 1)
    points = [(left + step * i, bottom - (bottom - top) * (v - low) / span) for i, v in enumerate(values)]
    draw.line(points, fill=color, width=2)
    for (x, y), year, value in zip(points, years, values):
        draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=color)
        draw.text((x - 8, bottom + 2), str(year)[-2:], fill="black")
        draw.text((x - 6, max(top, y - 12)), f"{value:g}", fill="black")
    return image


def _number(value: float) -> str:
    return f"{value:g}"


def bar_chart_questions(labels: list[str], values: list[float], rng: random.Random) -> list[tuple[str, str]]:
    a, b = rng.sample(range(len(labels)), 2)
    top = max(range(len(values)), key=values.__getitem__)
    low = min(range(len(values)), key=values.__getitem__)
    return [
        (f"What is the value of {labels[a]}?", _number(values[a])),
        ("Which category has the highest value?", labels[top]),
        ("What's the value of the lowest bar?", _number(values[low])),
        ("How many bars are shown in the chart?", str(len(values))),
        (
            f"What is the difference in value between {labels[a]} and {labels[b]}?",
            _number(round(abs(values[a] - values[b]), 2)),
        ),
        (f"Is the value of {labels[a]} more than {labels[b]}?", "Yes" if values[a] > values[b] else "No"),
    ]


def line_chart_questions(years: list[int], values: list[float], rng: random.Random) -> list[tuple[str, str]]:
    i = rng.randrange(len(years))
    peak = max(range(len(values)), key=values.__getitem__)
    return [
        ("When does the line reach the peak?", str(years[peak])),
        (f"What was the value in {years[i]}?", _number(values[i])),
        ("What is the highest value in the chart?", _number(values[peak])),
        ("How many data points are shown in the line?", str(len(values))),
    ]


@dataclass
class Chart:
    """One drawn chart, the questions it answers, and what it shows by kind (labels, years, values): wrong answers
    are drawn from the same kind as the right one."""

    image: Image.Image
    questions: list[tuple[str, str]]
    shown: list[list[str]]


def random_chart(rng: random.Random, sizes: ImageSizeRange) -> Chart:
    """A bar chart (60%) or a line chart with random categories, years and values."""
    size = (rng.randint(sizes.min_width, sizes.max_width), rng.randint(sizes.min_height, sizes.max_height))
    color = rng.choice(COLORS)
    if rng.random() < 0.6:
        labels = rng.sample(CATEGORIES, rng.randint(3, 6))
        values = [float(rng.randint(1, 99)) for _ in labels]
        image = draw_bar_chart(labels, values, size, color)
        return Chart(image, bar_chart_questions(labels, values, rng), [labels, [_number(v) for v in values]])
    first = rng.choice(FIRST_YEAR_CHOICES)
    years = list(range(first, first + rng.randint(4, 8)))
    values = [round(rng.uniform(1, 90), 1) for _ in years]
    image = draw_line_chart(years, values, size, color)
    return Chart(
        image, line_chart_questions(years, values, rng), [[str(y) for y in years], [_number(v) for v in values]]
    )


def make_chartqa_rows(
    num_rows: int, seed: int = 0, sizes: ImageSizeRange = ImageSizeRange(), questions_per_chart: int = 2
) -> list[dict[str, Any]]:
    """`num_rows` rows in ChartQA's schema; each chart gets `questions_per_chart` questions, as in the real data."""
    rng = random.Random(seed)
    rows: list[dict[str, Any]] = []
    while len(rows) < num_rows:
        chart = random_chart(rng, sizes)
        for query, answer in rng.sample(chart.questions, min(questions_per_chart, len(chart.questions))):
            rows.append(
                {"image": chart.image, "query": query, "label": [answer], "human_or_machine": rng.randint(0, 1)}
            )
    return rows[:num_rows]


def chartqa_features():
    from datasets import Features, Image, List, Value

    return Features(
        {
            "image": Image(),
            "query": Value("string"),
            "label": List(Value("string")),
            "human_or_machine": Value("int64"),
        }
    )


def save_splits(output_dir: str | Path, splits: dict[str, list[dict[str, Any]]], features=None) -> Path:
    """Write each split as `data/<split>-00000-of-00001.parquet`, the layout `load_dataset(folder)` reads."""
    from datasets import Dataset

    output_dir = Path(output_dir)
    (output_dir / "data").mkdir(parents=True, exist_ok=True)
    for split, rows in splits.items():
        Dataset.from_list(rows, features=features).to_parquet(
            str(output_dir / "data" / f"{split}-00000-of-00001.parquet")
        )
    return output_dir


def save_chartqa_dataset(
    output_dir: str | Path,
    train_rows: int = 256,
    test_rows: int = 32,
    seed: int = 0,
    sizes: ImageSizeRange = ImageSizeRange(),
) -> Path:
    return save_generated_dataset(output_dir, "chartqa", train_rows, test_rows, seed, sizes)


# Half the rejected answers also ignore the "single word or number" instruction. A tiny random model cannot read the
# chart, so it can tell right from wrong only by memorising pairs; the wordy half it learns from the text within a few
# dozen DPO steps, so the demo shows the reward margin and accuracy rising, as they do for a real model.
WORDY_REJECTED_SHARE = 0.5
WORDY_PHRASINGS = ("The answer is {}.", "Looking at the chart, it is {}.", "It is {}, according to the chart.")


def rejected_answer(answer: str, chart: Chart, rng: random.Random) -> str:
    wrong = wrong_answer(answer, chart, rng)
    return rng.choice(WORDY_PHRASINGS).format(wrong) if rng.random() < WORDY_REJECTED_SHARE else wrong


def wrong_answer(answer: str, chart: Chart, rng: random.Random) -> str:
    """A plausible wrong answer: the other of Yes/No, another label, year or value the same chart shows, or (for
    counts and differences, which the chart does not show) a nearby number."""
    if answer in ("Yes", "No"):
        return "No" if answer == "Yes" else "Yes"
    for kind in chart.shown:
        others = [shown for shown in kind if shown != answer]
        if answer in kind and others:
            return rng.choice(others)
    try:
        return _number(round(float(answer) + rng.choice([-1, 1]) * rng.randint(1, 9), 2))
    except ValueError:
        return rng.choice([category for category in CATEGORIES if category != answer])


def make_preference_rows(
    num_rows: int, seed: int = 0, sizes: ImageSizeRange = ImageSizeRange(), questions_per_chart: int = 2
) -> list[dict[str, Any]]:
    """`num_rows` rows in openbmb/RLAIF-V-Dataset's schema: a chart, a question about it, the correct answer as
    `chosen` and a wrong one (another value or word from the same chart, or Yes/No flipped) as `rejected`."""
    rng = random.Random(seed)
    rows: list[dict[str, Any]] = []
    while len(rows) < num_rows:
        chart = random_chart(rng, sizes)
        for question, answer in rng.sample(chart.questions, min(questions_per_chart, len(chart.questions))):
            index = len(rows)
            rows.append(
                {
                    "ds_name": "synthetic_charts",
                    "image": chart.image,
                    "question": question,
                    "chosen": answer,
                    "rejected": rejected_answer(answer, chart, rng),
                    "origin_dataset": "vlm_recipes.data.synthetic",
                    "origin_split": "generated",
                    "idx": index,
                    "image_path": f"charts/{index}.png",
                }
            )
    return rows[:num_rows]


def rlaif_v_features():
    from datasets import Features, Image, Value

    text = Value("string")
    return Features(
        {
            "ds_name": text,
            "image": Image(),
            "question": text,
            "chosen": text,
            "rejected": text,
            "origin_dataset": text,
            "origin_split": text,
            "idx": Value("int64"),
            "image_path": text,
        }
    )


SCHEMAS = {
    "chartqa": (make_chartqa_rows, chartqa_features),
    "rlaif_v": (make_preference_rows, rlaif_v_features),
    "docvqa": (synthetic_tasks.make_docvqa_rows, synthetic_tasks.docvqa_features),
    "textvqa": (synthetic_tasks.make_textvqa_rows, synthetic_tasks.textvqa_features),
    "scienceqa": (synthetic_tasks.make_scienceqa_rows, synthetic_tasks.scienceqa_features),
}


def save_generated_dataset(
    output_dir: str | Path,
    schema: str = "chartqa",
    train_rows: int = 256,
    test_rows: int = 32,
    seed: int = 0,
    sizes: ImageSizeRange = ImageSizeRange(),
) -> Path:
    """A dataset folder of generated rows in `schema`'s layout (`chartqa`, `rlaif_v` preference pairs, or the
    evaluation tasks' `docvqa`, `textvqa`, `scienceqa`), with train and test splits; the test split is drawn with
    another seed."""
    make_rows, features = SCHEMAS[schema]
    splits = {
        "train": make_rows(train_rows, seed=seed, sizes=sizes),
        "test": make_rows(test_rows, seed=seed + 1, sizes=sizes),
    }
    return save_splits(output_dir, splits, features())


def cli(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write a generated dataset in a Hub dataset's schema (parquet).")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument(
        "--schema",
        choices=sorted(SCHEMAS),
        default="chartqa",
        help="chartqa: questions with answers (SFT); rlaif_v: questions with a correct `chosen` and a wrong "
        "`rejected` answer (DPO); docvqa, textvqa, scienceqa: the schemas of those tasks' Hub datasets.",
    )
    parser.add_argument("--train_rows", type=int, default=256)
    parser.add_argument("--test_rows", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--realistic_sizes", action="store_true", help="Image sizes spread like real ChartQA (300-1600 px wide)."
    )
    args = parser.parse_args(argv)
    sizes = REALISTIC_SIZES if args.realistic_sizes else ImageSizeRange()
    path = save_generated_dataset(args.output_dir, args.schema, args.train_rows, args.test_rows, args.seed, sizes)
    print(f"Wrote {args.train_rows} train and {args.test_rows} test {args.schema} rows to {path}")


if __name__ == "__main__":
    cli()
