"""Evaluate a model on its recipe's evaluation split: greedy answers, relaxed accuracy and exact match.

    python -m vlm_recipes.evaluate recipes/chartqa.yaml                       # the base model
    python -m vlm_recipes.evaluate recipes/chartqa.yaml --adapter outputs/run # base and base + adapter, side by side
    accelerate launch -m vlm_recipes.evaluate recipes/chartqa.yaml --adapter outputs/run   # rows split over GPUs

Reads top to bottom: parse the recipe, refuse to overwrite earlier results, format the evaluation split, load the model
(with the adapter, checked against it), generate and score with the adapter off (the base) and on, write
`eval_results.json` and one predictions JSONL per model in the recipe's `output_dir`, print the comparison.
"""

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlm_recipes.console import print_main, setup_console
from vlm_recipes.data.loading import load_datasets
from vlm_recipes.errors import RecipeError, exit_on_recipe_error
from vlm_recipes.evaluation.metrics import MATCHERS
from vlm_recipes.evaluation.runner import EvaluationOutcome, evaluate_rows
from vlm_recipes.modeling.loading import load_for_inference
from vlm_recipes.modeling.strategies import loads_in_4bit
from vlm_recipes.processes import is_main_process, main_process_first
from vlm_recipes.recipe import parse_recipe
from vlm_recipes.run_folder import EVAL_RESULTS_FILE, predictions_file, sft_adapter_under
from vlm_recipes.sft import SFTRecipe


@dataclass
class EvaluateCommandArguments:
    """Options of the evaluate command (not recipe fields)."""

    adapter: str | None = field(
        default=None,
        metadata={
            "help": "A trained adapter folder (a training run's `output_dir`) to evaluate on the recipe's model."
        },
    )
    evaluate_base: bool = field(
        default=True,
        metadata={
            "help": "With `--adapter`, also evaluate the base model (the adapter switched off), for before/after."
        },
    )
    overwrite_results: bool = field(
        default=False,
        metadata={"help": f"Replace an existing {EVAL_RESULTS_FILE} and predictions files in `output_dir`."},
    )


@dataclass
class EvaluateRecipe(SFTRecipe):
    """A task recipe (an SFT recipe: its data, model and evaluation settings) plus the command's own options."""

    command: EvaluateCommandArguments


def result_paths(output_dir: Path, names: list[str]) -> list[Path]:
    return [output_dir / EVAL_RESULTS_FILE] + [output_dir / predictions_file(name) for name in names]


def refuse_to_overwrite(paths: list[Path], overwrite: bool) -> None:
    existing = [path for path in paths if path.exists()]
    if existing and not overwrite:
        raise RecipeError(
            f"{existing[0]} already exists; nothing was evaluated. Pass `--overwrite_results true` to replace it, or "
            "`--output_dir` to write the results elsewhere."
        )


def comparison_table(results: dict[str, dict[str, Any]]) -> str:
    """Metrics as rows, models as columns, and the change from the first model to the last."""
    names = list(results)
    header = f"{'metric':<18}" + "".join(f"{name:>12}" for name in names)
    if len(names) > 1:
        header += f"{'change':>12}"
    lines = [header]
    for metric in MATCHERS:
        values = [results[name][metric] for name in names]
        line = f"{metric:<18}" + "".join(f"{value:>12.4f}" for value in values)
        if len(names) > 1:
            line += f"{values[-1] - values[0]:>+12.4f}"
        lines.append(line)
    return "\n".join(lines)


def write_predictions(path: Path, outcome: EvaluationOutcome) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        for record in outcome.records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")


def evaluate(recipe: EvaluateRecipe) -> dict[str, Any]:
    data_args, model_args, training_args = recipe.data, recipe.model, recipe.training
    evaluation, command = recipe.evaluation, recipe.command
    names = (["base"] if command.evaluate_base or not command.adapter else []) + (
        ["adapter"] if command.adapter else []
    )
    if not training_args.output_dir:
        raise RecipeError("The recipe sets no `output_dir` (where the results go).")
    output_dir = Path(training_args.output_dir)
    refuse_to_overwrite(result_paths(output_dir, names), command.overwrite_results)

    # Data first: a missing evaluation split fails before any weights load. Under several processes each machine's
    # main process formats it first and the others reuse the datasets cache.
    with main_process_first():
        _, rows, data_report = load_datasets(
            data_args,
            seed=training_args.seed,
            need_eval=True,
            num_proc=training_args.dataset_num_proc,
            format_train=False,
        )
    if rows is None or len(rows) == 0:
        raise RecipeError(f"The evaluation split of {data_args.dataset_name} has no rows to evaluate.")
    if data_report.rejected:
        print_main(f"Data check: {data_report.rejected} evaluation row(s) rejected and skipped", data_report.table())
    data_report.stop_if_too_many_rejected(data_args.max_bad_fraction)

    # The precision the recipe trains in (4-bit for qlora), for the base and the adapter alike.
    load_args = copy.copy(model_args)  # the recipe's own fields stay as set
    load_args.load_in_4bit = loads_in_4bit(
        {"tuning_strategy": recipe.tuning.tuning_strategy, "load_in_4bit": model_args.load_in_4bit}
    )
    model, processor, _ = load_for_inference(load_args, command.adapter, training_args.trust_remote_code)
    sft_adapter = sft_adapter_under(command.adapter)  # a DPO adapter (`reference: sft_merged`) on base + SFT adapter
    if sft_adapter is not None and "base" in names:
        print_main(f"'base' is {model_args.model_name_or_path} + the SFT adapter in {sft_adapter}, merged in.")
    options = {
        "batch_size": evaluation.eval_generation_batch_size or training_args.per_device_eval_batch_size,
        "max_new_tokens": evaluation.max_new_tokens,
        "progress": not training_args.disable_tqdm,
    }
    outcomes: dict[str, EvaluationOutcome] = {}
    for name in names:
        if name == "base" and command.adapter:
            with model.disable_adapter():  # the same weights, processor and rows, with the adapter off
                outcomes[name] = evaluate_rows(model, processor, rows, description="base model", **options)
        else:
            outcomes[name] = evaluate_rows(model, processor, rows, description=f"{name} model", **options)

    split = (
        data_args.dataset_test_split
        if not data_args.eval_split_size
        else f"held out of {data_args.dataset_train_split}"
    )
    results = {
        "dataset": data_args.dataset_name,
        "split": split,
        "rows": len(rows),
        "rows_rejected": data_report.rejected,
        "base_model": model_args.model_name_or_path,
        "adapter": command.adapter,
        **({"sft_adapter_merged_into_base": str(sft_adapter)} if sft_adapter is not None else {}),
        "max_new_tokens": evaluation.max_new_tokens,
        "results": {
            name: {**outcome.scores, "predictions": predictions_file(name)} for name, outcome in outcomes.items()
        },
    }
    if is_main_process():
        output_dir.mkdir(parents=True, exist_ok=True)
        for name, outcome in outcomes.items():
            write_predictions(output_dir / predictions_file(name), outcome)
        (output_dir / EVAL_RESULTS_FILE).write_text(json.dumps(results, indent=2), encoding="utf-8")
    print_main(
        f"\nEvaluation of {model_args.model_name_or_path}"
        + (f" + adapter {command.adapter}" if command.adapter else "")
        + f" on {data_args.dataset_name} ({split}, {len(rows)} rows)",
        comparison_table({name: outcome.scores for name, outcome in outcomes.items()}),
        f"Results in {(output_dir / EVAL_RESULTS_FILE).resolve()}; predictions in "
        + ", ".join(predictions_file(name) for name in outcomes),
    )
    return results


@exit_on_recipe_error
def main(argv: list[str] | None = None) -> dict[str, Any]:
    setup_console()
    recipe = parse_recipe(EvaluateRecipe, argv, prog="python -m vlm_recipes.evaluate")
    return evaluate(recipe)


if __name__ == "__main__":
    main()
