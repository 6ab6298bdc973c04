"""Preflight: check a recipe's data and size up its run before spending GPU hours, without loading any weights.

    python -m vlm_recipes.preflight recipes/chartqa.yaml [--field value ...] [--preflight_report preflight.json]

Runs the same data checks as training (every train and eval row: images decode and are converted to RGB at a size the
processor takes, text, placeholders, token length against `max_length`) and prints, for the recipe as configured:
the rows kept, fixed and rejected by reason; the token-length distribution (p50, p95, max) with image tokens per row;
the share of padding the configured batch size carries grouped by length and under random batching; and an ESTIMATE
of peak GPU memory per device for the model and tuning strategy (GRPO: with its generation batch; DPO, GRPO, KTO: with
a reference that costs weights). SFT, DPO, GRPO and KTO recipes (the `# entry point:` line). It reads the model's
config and processor only. Exit code 0 when training
would start, 2 (with the same message training would give) when too many rows are rejected or the recipe is wrong.
Nothing is written to the recipe's `output_dir`.
"""

import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlm_recipes import dpo, grpo, kto, sft
from vlm_recipes.console import setup_console
from vlm_recipes.data.augmentation import augmentation_grid, build_augmenter
from vlm_recipes.data.checks import CheckedSplit, check_datasets, check_policy, default_num_proc
from vlm_recipes.data.lengths import TokenCounter, padding_share, percentile, random_batching_padding_share
from vlm_recipes.data.loading import DATA_SOURCE, load_datasets
from vlm_recipes.errors import DataError, RecipeError, exit_on_recipe_error
from vlm_recipes.modeling.memory import estimate_peak_memory, method_load
from vlm_recipes.recipe import entry_point_of, parse_recipe
from vlm_recipes.training.run import data_processes, resolve_model
from vlm_recipes.training.sampling import LengthGroupedSampler


VERIFY_ROWS = 8  # rows whose token counts are compared with TRL's collator


@dataclass
class PreflightArguments:
    """Options of the preflight command itself (not part of a training recipe)."""

    preflight_report: str | None = field(
        default=None, metadata={"help": "Also write everything the preflight prints as JSON to this file."}
    )
    show_augmentation: str | None = field(
        default=None,
        metadata={
            "help": "Write a PNG grid of the recipe's `augmentation` to this file: `augmentation_samples` training "
            "images, each as it is and in `augmentation_variants` augmented versions, to look at before training."
        },
    )
    augmentation_samples: int = field(default=4, metadata={"help": "--show_augmentation: training images (rows)."})
    augmentation_variants: int = field(
        default=4, metadata={"help": "--show_augmentation: augmented versions of each (columns)."}
    )


@dataclass
class SFTPreflightRecipe(sft.SFTRecipe):
    preflight: PreflightArguments


@dataclass
class DPOPreflightRecipe(dpo.DPORecipe):
    preflight: PreflightArguments


@dataclass
class GRPOPreflightRecipe(grpo.GRPORecipe):
    preflight: PreflightArguments


@dataclass
class KTOPreflightRecipe(kto.KTORecipe):
    preflight: PreflightArguments


@dataclass(frozen=True)
class PreflightTarget:
    """How the preflight reads a recipe of one training entry point: as it parses it, with its defaults, for its task."""

    recipe_class: type
    apply_defaults: Callable[[Any], None]
    task: str  # the formatters' task: "sft", "preference", "prompt" (GRPO) or "unpaired" (KTO)


# A recipe's `# entry point:` line (SFT when it has none) -> how the preflight checks it.
TARGETS = {
    "vlm_recipes.sft": PreflightTarget(SFTPreflightRecipe, sft.apply_defaults, "sft"),
    "vlm_recipes.dpo": PreflightTarget(DPOPreflightRecipe, dpo.apply_defaults, "preference"),
    "vlm_recipes.grpo": PreflightTarget(GRPOPreflightRecipe, grpo.apply_defaults, "prompt"),
    "vlm_recipes.kto": PreflightTarget(KTOPreflightRecipe, kto.apply_defaults, "unpaired"),
}


def target_of(argv: list[str]) -> PreflightTarget:
    """What the recipe (`argv[0]`) is for, by its `# entry point:` line; SFT without one."""
    text = Path(argv[0]).read_text(encoding="utf-8") if argv and Path(argv[0]).is_file() else ""
    name = entry_point_of(text)
    if name not in TARGETS:
        raise RecipeError(f"preflight checks recipes of {', '.join(TARGETS)}; this one is for {name}.")
    return TARGETS[name]


def length_summary(checked: CheckedSplit, batch_size: int, group_batches: int = 64) -> dict[str, Any]:
    tokens, image = checked.tokens, checked.image_tokens
    return {
        "rows": len(tokens),
        "tokens": {"p50": percentile(tokens, 0.5), "p95": percentile(tokens, 0.95), "max": max(tokens, default=0)},
        "image_tokens_per_row": {
            "p50": percentile(image, 0.5),
            "p95": percentile(image, 0.95),
            "max": max(image, default=0),
            "mean": round(sum(image) / len(image), 1) if image else 0,
        },
        "padding_share": {
            "batch_size": batch_size,
            "random_batching": round(random_batching_padding_share(tokens, batch_size), 4),
            # The order length-grouped batching trains in (one process; more processes group the same way)
            "grouped_by_length": round(
                padding_share(tokens, batch_size, LengthGroupedSampler(tokens, batch_size, 1, group_batches).order()),
                4,
            ),
        },
    }


def per_source(checked: CheckedSplit) -> dict[str, CheckedSplit]:
    """A mixture's checked split by source (its `data_source` column); {} for a single dataset."""
    if DATA_SOURCE not in checked.dataset.column_names:
        return {}
    sources = checked.dataset[DATA_SOURCE]
    split = {}
    for name in dict.fromkeys(sources):
        rows = [index for index, source in enumerate(sources) if source == name]
        split[name] = CheckedSplit(
            checked.dataset.select(rows), [checked.tokens[i] for i in rows], [checked.image_tokens[i] for i in rows]
        )
    return split


def verify_counts(dataset: Any, counter: TokenCounter, processor: Any, rows: int = VERIFY_ROWS) -> tuple[int, int]:
    """(rows whose count equals TRL's vision collator's non-padding tokens, rows compared); SFT rows only."""
    if len(dataset) == 0 or "messages" not in dataset.column_names:
        return 0, 0
    from trl.chat_template_utils import get_training_chat_template
    from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling

    try:
        template = get_training_chat_template(processor)
    except ValueError:
        template = None
    collator = DataCollatorForVisionLanguageModeling(processor, chat_template=template)
    sample = [dataset[index] for index in range(min(rows, len(dataset)))]
    batch = collator([{"images": row["images"], "messages": row["messages"]} for row in sample])
    expected = batch["attention_mask"].sum(dim=1).tolist()
    counted = [counter.count_row(row, [image.size for image in row["images"]]).total for row in sample]
    return sum(a == b for a, b in zip(counted, expected)), len(sample)


def write_augmentation_grid(recipe: Any, processor: Any, dataset: Any, path: str) -> Path:
    """`--show_augmentation`: the first training images with their augmentations, as a PNG grid."""
    options = recipe.preflight
    augmenter = build_augmenter(
        recipe.data.augmentation, recipe.training.seed, processor, recipe.reliability.min_image_side
    )
    if augmenter is None:
        raise RecipeError("--show_augmentation: the recipe sets no `augmentation` (see docs/your-data.md).")
    if options.augmentation_samples < 1 or options.augmentation_variants < 1:
        raise RecipeError("--show_augmentation: augmentation_samples and augmentation_variants should be at least 1.")
    images = []
    for row in dataset:
        images += [image for image in row.get("images") or [] if hasattr(image, "size")]
        if len(images) >= options.augmentation_samples:
            break
    if not images:
        raise RecipeError("--show_augmentation: the training rows have no images to augment.")
    grid = augmentation_grid(images[: options.augmentation_samples], augmenter, options.augmentation_variants)
    grid.save(path)
    print(f"Augmentation grid: {path} ({len(images[: options.augmentation_samples])} images x "
          f"{options.augmentation_variants} augmentations, originals first)")  # fmt: skip
    return Path(path)


def preflight(recipe: Any, target: PreflightTarget) -> dict[str, Any]:
    """Everything the preflight reports, as a dict; prints it as it goes. Raises `DataError` if training would stop."""
    task = target.task
    target.apply_defaults(recipe)  # the entry point's own defaults over TRL's (SFT: the task's formatter), as training
    data_args, model_args = recipe.data, recipe.model
    reliability, training_args = recipe.reliability, recipe.training

    # The recipe's model side first, from the config alone: a wrong family or strategy fails before the data.
    setup = resolve_model(recipe)
    family, plan = setup.family, setup.plan
    max_length, reserved_tokens = recipe.length_limit()  # GRPO: each prompt leaves room for its completion
    processor = setup.load_processor()
    room = f", each prompt + {reserved_tokens} completion tokens" if reserved_tokens else ""
    print(f"Preflight of {recipe.source or 'the recipe'}: {task}, {model_args.model_name_or_path} ({family.name}), "
          f"tuning strategy '{plan.strategy.name}', max_length {max_length}{room}")  # fmt: skip

    started = time.perf_counter()
    need_eval = str(getattr(training_args.eval_strategy, "value", training_args.eval_strategy)) != "no"
    train, evaluation, report = load_datasets(
        data_args,
        seed=training_args.seed,
        need_eval=need_eval,
        task=task,
        num_proc=data_processes(training_args),
    )
    counter = TokenCounter(processor)
    num_proc = reliability.check_num_proc or data_processes(training_args)
    checked = check_datasets(
        {"train": train, "eval": evaluation},
        report,
        counter,
        check_policy(processor, reliability, max_length, reserved_tokens=reserved_tokens),
        num_proc,
    )
    seconds = time.perf_counter() - started
    rows = sum(report.splits[name].rows for name in checked)  # a mixture's per-source splits are within these
    processes = default_num_proc(len(train), num_proc)
    print(f"\nData checks: {rows:,} rows in {seconds:.0f} s ({processes} process(es))", report.table(), sep="\n")

    batch_size = training_args.per_device_train_batch_size
    group_batches = recipe.speed.length_group_batches
    lengths = {name: length_summary(split, batch_size, group_batches) for name, split in checked.items()}
    for name, split in per_source(checked["train"]).items():  # a mixture: each source's rows as they would train
        lengths[f"train:{name}"] = length_summary(split, batch_size, group_batches)
    width = max(6, *(len(name) + 1 for name in lengths))
    print(f"\nTokens per row (text + image tokens; max_length {max_length}{room})")
    print(f"  {'split':<{width}}{'rows':>9}{'p50':>8}{'p95':>8}{'max':>8}   image tokens p50 / p95 / max (mean)")
    for name, summary in lengths.items():
        t, i = summary["tokens"], summary["image_tokens_per_row"]
        print(f"  {name:<{width}}{summary['rows']:>9,}{t['p50']:>8,}{t['p95']:>8,}{t['max']:>8,}   "
              f"{i['p50']:,} / {i['p95']:,} / {i['max']:,} ({i['mean']:,})")  # fmt: skip
    sources = [name for name in lengths if name.startswith("train:")]
    if sources:
        shares = ", ".join(
            f"{name.removeprefix('train:')} {lengths[name]['padding_share']['grouped_by_length']:.1%}"
            for name in sources
        )
        print(f"Padding per source, each grouped by length on its own: {shares}")
    padding = lengths["train"]["padding_share"]
    print(f"Padding at per_device_train_batch_size {batch_size}: {padding['grouped_by_length']:.1%} of the positions fed "
          f"to the model with rows grouped by length, {padding['random_batching']:.1%} under random batching (this "
          f"recipe: train_sampling_strategy {training_args.train_sampling_strategy})")  # fmt: skip

    verified, compared = verify_counts(checked["train"].dataset, counter, processor)
    if compared:
        print(f"Token counts checked against TRL's collator on {compared} rows: {verified} exact")

    longest = max(lengths["train"]["tokens"]["max"], lengths.get("eval", {}).get("tokens", {}).get("max", 0))
    longest_image = max(split.image_tokens and max(split.image_tokens) or 0 for split in checked.values())
    pairs = 2 if task == "preference" else 1  # chosen and rejected run together
    # GRPO trains on sequences of prompt + completion; what a method adds (generation, a reference) is counted apart
    method = method_load(training_args, plan, getattr(recipe, "policy", None), longest)
    memory = estimate_peak_memory(
        setup, training_args, longest + reserved_tokens, longest_image, pairs, recipe.speed, method
    )
    print("", *memory.lines(), sep="\n")

    if recipe.preflight.show_augmentation:
        write_augmentation_grid(recipe, processor, checked["train"].dataset, recipe.preflight.show_augmentation)

    result = {
        "recipe": recipe.source,
        "task": task,
        "model": model_args.model_name_or_path,
        "family": family.name,
        "tuning_strategy": plan.strategy.name,
        "check_seconds": round(seconds, 1),
        "check_processes": processes,
        "data_report": report.to_dict(),
        "lengths": lengths,
        "token_counts_verified": {"exact": verified, "compared": compared},
        "memory_estimate_bytes": {
            "weights": memory.weights,
            "gradients_and_optimizer": memory.training_states,
            "activations_checkpointed": memory.activations_checkpointed,
            "activations_without_checkpointing": memory.activations_full,
            "logits": memory.logits,
            "generation": memory.generation,
            "generation_sequences": memory.generation_sequences,
            "reference_weights": memory.reference_weights,
            "peak_with_checkpointing": memory.peak(True),
            "peak_without_checkpointing": memory.peak(False),
            "is_estimate": True,
        },
    }
    if recipe.preflight.preflight_report:
        Path(recipe.preflight.preflight_report).write_text(json.dumps(result, indent=2), encoding="utf-8")
    try:
        report.stop_if_too_many_rejected(data_args.max_bad_fraction)
    except DataError as error:
        raise DataError(f"training would stop here: {error}") from None
    print("\nPreflight passed: training would start with these rows.")
    return result


@exit_on_recipe_error
def main(argv: list[str] | None = None) -> None:
    setup_console()
    argv = list(sys.argv[1:] if argv is None else argv)
    target = target_of(argv)
    recipe = parse_recipe(target.recipe_class, argv, prog="python -m vlm_recipes.preflight")
    preflight(recipe, target)


if __name__ == "__main__":
    main()
