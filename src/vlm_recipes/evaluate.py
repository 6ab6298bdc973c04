"""Evaluate a model on its recipe's evaluation sets: greedy answers, scored with each set's task metrics.

    python -m vlm_recipes.evaluate recipes/chartqa.yaml                       # the base model
    python -m vlm_recipes.evaluate recipes/chartqa.yaml --adapter outputs/run # base and base + adapter, side by side
    python -m vlm_recipes.evaluate recipes/chartqa.yaml --adapter outputs/run --prompt_preset lmms_eval
    accelerate launch -m vlm_recipes.evaluate recipes/chartqa.yaml --adapter outputs/run   # rows split over GPUs

Reads top to bottom: parse the recipe, resolve its task and evaluation sets (`eval_datasets`, else its own evaluation
split), refuse to overwrite earlier results, format each set, load the model (with the adapter, checked against it),
generate and score each set with the adapter off (the base) and on, write `eval_results.json` (with each set's task,
split and prompt preset) and one predictions JSONL per set and model in the recipe's `output_dir`, print the comparison.
"""

import copy
import json
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlm_recipes.console import print_main, print_summary, setup_console
from vlm_recipes.errors import RecipeError, exit_on_recipe_error
from vlm_recipes.evaluation.runner import EvaluationOutcome, evaluate_rows
from vlm_recipes.evaluation.sets import EvalSet, apply_task_defaults, load_eval_set, resolve_eval_sets
from vlm_recipes.hub.card import write_card_at_save
from vlm_recipes.modeling.loading import load_for_inference
from vlm_recipes.modeling.strategies import loads_in_4bit
from vlm_recipes.processes import is_main_process, main_process_first
from vlm_recipes.recipe import parse_recipe
from vlm_recipes.run_folder import EVAL_RESULTS_FILE, RECIPE_FILE, predictions_file, sft_adapter_under
from vlm_recipes.sft import SFTRecipe
from vlm_recipes.tasks import get_task


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


def result_paths(output_dir: Path, set_names: list[str], models: list[str]) -> list[Path]:
    return [output_dir / EVAL_RESULTS_FILE] + [
        output_dir / predictions_file(set_name, model) for set_name in set_names for model in models
    ]


def refuse_to_overwrite(paths: list[Path], overwrite: bool) -> None:
    existing = [path for path in paths if path.exists()]
    if existing and not overwrite:
        raise RecipeError(
            f"{existing[0]} already exists; nothing was evaluated. Pass `--overwrite_results true` to replace it, or "
            "`--output_dir` to write the results elsewhere."
        )


def comparison_table(metrics: list[str], results: dict[str, dict[str, Any]]) -> str:
    """Metrics as rows, models as columns, and the change from the first model to the last."""
    names = list(results)
    width = max(18, *(len(metric) + 2 for metric in metrics))
    header = f"{'metric':<{width}}" + "".join(f"{name:>12}" for name in names)
    if len(names) > 1:
        header += f"{'change':>12}"
    lines = [header]
    for metric in metrics:
        values = [results[name][metric] for name in names]
        line = f"{metric:<{width}}" + "".join(f"{value:>12.4f}" for value in values)
        if len(names) > 1:
            line += f"{values[-1] - values[0]:>+12.4f}"
        lines.append(line)
    return "\n".join(lines)


def write_predictions(path: Path, outcome: EvaluationOutcome) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        for record in outcome.records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")


def load_sets(recipe: EvaluateRecipe, eval_sets: list[EvalSet]) -> dict[str, Any]:
    """Each set's formatted rows (all of them, or the set's `max_samples`). Under several processes each machine's
    main process formats first and the others reuse the datasets cache. Too many rows the formatter rejects stop here,
    before any weights load."""
    training_args, loaded = recipe.training, {}
    with main_process_first():
        for eval_set in eval_sets:
            loaded[eval_set.name] = load_eval_set(
                eval_set, seed=training_args.seed, num_proc=training_args.dataset_num_proc, limit=eval_set.max_samples
            )
    for eval_set in eval_sets:
        report = loaded[eval_set.name][1]
        if report.rejected:
            print_main(
                f"Data check of '{eval_set.name}': {report.rejected} row(s) rejected and skipped", report.table()
            )
        report.stop_if_too_many_rejected(recipe.data.max_bad_fraction)
    return loaded


def evaluate(recipe: EvaluateRecipe) -> dict[str, Any]:
    model_args, training_args, command = recipe.model, recipe.training, recipe.command
    apply_task_defaults(recipe)
    eval_sets = resolve_eval_sets(recipe.data, recipe.evaluation)
    names = (["base"] if command.evaluate_base or not command.adapter else []) + (
        ["adapter"] if command.adapter else []
    )
    if not training_args.output_dir:
        raise RecipeError("The recipe sets no `output_dir` (where the results go).")
    output_dir = Path(training_args.output_dir)
    refuse_to_overwrite(result_paths(output_dir, [s.name for s in eval_sets], names), command.overwrite_results)
    loaded = load_sets(recipe, eval_sets)  # data first: a missing split fails before any weights load

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
        "batch_size": recipe.evaluation.eval_generation_batch_size or training_args.per_device_eval_batch_size,
        "progress": not training_args.disable_tqdm,
    }
    results: dict[str, Any] = {
        "base_model": model_args.model_name_or_path,
        "adapter": command.adapter,
        **({"sft_adapter_merged_into_base": str(sft_adapter)} if sft_adapter is not None else {}),
        "eval_sets": {},
    }
    outcomes: dict[tuple[str, str], EvaluationOutcome] = {}
    for eval_set in eval_sets:
        rows, report = loaded[eval_set.name]
        print_main(
            f"\nEvaluation set '{eval_set.name}': {eval_set.task.title} on {eval_set.data.dataset_name} "
            f"({eval_set.split}, {len(rows)} rows), prompt preset '{eval_set.preset.name}' ({eval_set.preset.source}), "
            f"max_new_tokens {eval_set.max_new_tokens}"
        )
        for name in names:
            # The base: the same weights, processor and rows, with the adapter off.
            with model.disable_adapter() if name == "base" and command.adapter else nullcontext():
                outcomes[eval_set.name, name] = evaluate_rows(
                    model,
                    processor,
                    rows,
                    eval_set.task,
                    eval_set.preset,
                    max_new_tokens=eval_set.max_new_tokens,
                    description=f"{eval_set.name}, {name} model",
                    **options,
                )
        scores = {name: outcomes[eval_set.name, name].scores for name in names}
        speeds = ", ".join(f"{name} {outcomes[eval_set.name, name].rows_per_second:.2f}" for name in names)
        print_main(comparison_table(eval_set.task.metric_names, scores), f"rows/s: {speeds}")
        results["eval_sets"][eval_set.name] = {
            **eval_set.describe(),
            "rows": len(rows),
            "rows_rejected": report.rejected,
            "results": {
                name: {
                    **outcomes[eval_set.name, name].scores,
                    "rows_per_second": round(outcomes[eval_set.name, name].rows_per_second, 3),
                    "predictions": predictions_file(eval_set.name, name),
                }
                for name in names
            },
        }
    if is_main_process():
        output_dir.mkdir(parents=True, exist_ok=True)
        for (set_name, name), outcome in outcomes.items():
            write_predictions(output_dir / predictions_file(set_name, name), outcome)
        (output_dir / EVAL_RESULTS_FILE).write_text(json.dumps(results, indent=2), encoding="utf-8")
        if (output_dir / RECIPE_FILE).is_file() and any(output_dir.glob("*.safetensors")):
            write_card_at_save(output_dir)  # the results sit beside the model they describe: its card shows them
    headlines = [
        f"{set_name} {(metric := get_task(entry['task']).metric_names[0])}: "
        + ", ".join(f"{name} {entry['results'][name][metric]:.4f}" for name in names)
        for set_name, entry in results["eval_sets"].items()
    ]
    print_summary(
        "evaluate",
        [
            f"Evaluated {model_args.model_name_or_path}"
            + (f" + adapter {command.adapter}" if command.adapter else ""),
            f"Results in {(output_dir / EVAL_RESULTS_FILE).resolve()}; predictions: "
            + ", ".join(predictions_file(set_name, name) for set_name, name in outcomes),
            *headlines,
        ],
        [f"vlm-recipes push {command.adapter} --dry_run"] if command.adapter else [],
    )
    return results


@exit_on_recipe_error
def main(argv: list[str] | None = None) -> dict[str, Any]:
    setup_console()
    # A task recipe, or any training run's recipe.yaml (its data, model and evaluation parts; GRPO's rewards and the
    # like are skipped)
    recipe = parse_recipe(EvaluateRecipe, argv, prog="python -m vlm_recipes.evaluate", ignore_method_fields=True)
    return evaluate(recipe)


if __name__ == "__main__":
    main()
