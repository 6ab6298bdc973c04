"""Evaluation sets: which data a run is evaluated on, as which task, asked how.

A recipe names its task (`task:`, else the task of its `formatter`) and may list `eval_datasets`; without them it has
one set, named after the task, on its own evaluation split. Each set is resolved here once, checked before any data or
weights load (names, tasks, presets, fields), and loaded by `load_eval_set` in the formatters' shape.

    eval_datasets:
      - {name: chartqa, prompt_preset: lmms_eval}                       # the recipe's own split, lmms-eval's prompt
      - {name: docs, dataset: lmms-lab/DocVQA, dataset_config: DocVQA, task: docvqa, split: validation, max_samples: 500}
"""

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from vlm_recipes.configs import DataArguments, EvaluationArguments
from vlm_recipes.data.formatters import get_formatter
from vlm_recipes.data.loading import load_datasets
from vlm_recipes.data.report import DataReport
from vlm_recipes.errors import RecipeError
from vlm_recipes.tasks import TASKS, PromptPreset, Task, get_task, task_for_formatter


ENTRY_FIELDS = (
    "name", "dataset", "dataset_config", "task", "formatter", "split", "max_samples", "prompt_preset", "max_new_tokens",
)  # fmt: skip
# A set's name goes into log keys (eval/<name>/<metric>) and file names (predictions_<name>_<model>.jsonl).
SET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def resolve_task(task_name: str | None, formatter: str) -> Task:
    """The recipe's task: the one it names, else the task of its formatter."""
    if task_name:
        return get_task(task_name)
    task = task_for_formatter(formatter)
    if task is None:
        get_formatter(formatter, "sft")  # an unknown formatter, or one for preference data, is named as such
        raise RecipeError(
            f"The formatter '{formatter}' belongs to no evaluation task; set `task` to one of: {', '.join(TASKS)}."
        )
    return task


def apply_task_defaults(recipe: Any) -> Task:
    """Resolve the recipe's task and give `formatter` the task's default where the recipe names none (like any other
    default of an entry point, through `Recipe.apply_defaults`). Returns the task."""
    task = resolve_task(recipe.evaluation.task, recipe.data.formatter)
    recipe.apply_defaults("data", {"formatter": task.formatter})
    recipe.evaluation.task = task.name
    return task


def saved_eval_sets(saved: Mapping[str, Any]) -> list["EvalSet"]:
    """The evaluation sets of a finished SFT run, from the fields of its saved `recipe.yaml` (what its log and results
    were computed on); [] when they cannot be resolved."""
    from dataclasses import fields

    def part(kind: type) -> Any:
        return kind(**{f.name: saved[f.name] for f in fields(kind) if f.name in saved})

    try:
        data, evaluation = part(DataArguments), part(EvaluationArguments)
        task = resolve_task(evaluation.task, data.formatter)
        if "formatter" not in saved:
            data.formatter = task.formatter
        evaluation.task = task.name
        return resolve_eval_sets(data, evaluation)
    except (RecipeError, TypeError):
        return []


@dataclass(frozen=True)
class EvalSet:
    name: str
    task: Task
    preset: PromptPreset
    data: DataArguments  # how its rows load: dataset, configuration, formatter, split (`dataset_test_split`)
    max_samples: int | None  # the set's own row cap (None: every row for `evaluate`, `eval_max_samples` in training)
    max_new_tokens: int
    own_split: bool  # the recipe's own evaluation split (the one the Trainer computes its eval loss on)

    @property
    def split(self) -> str:
        if self.own_split and self.data.eval_split_size:
            return f"held out of {self.data.dataset_train_split}"
        return str(self.data.dataset_test_split)

    def describe(self) -> dict[str, Any]:
        """What eval_results.json and the model card say about the set."""
        return {
            "dataset": self.data.dataset_name,
            "dataset_config": self.data.dataset_config,
            "split": self.split,
            "task": self.task.name,
            "prompt_preset": self.preset.name,
            "prompt_source": self.preset.source,
            "max_new_tokens": self.max_new_tokens,
        }


def _entries(value: Any) -> list[dict[str, Any]]:
    """`eval_datasets` as mappings: YAML gives them, the command line gives JSON objects."""
    entries = []
    for position, item in enumerate(value or [], start=1):
        if isinstance(item, str):
            try:
                item = json.loads(item)
            except json.JSONDecodeError as error:
                raise RecipeError(
                    f"eval_datasets entry {position} is not a mapping or a JSON object ({error.msg}): {item!r:.80}"
                ) from None
        if not isinstance(item, Mapping):
            raise RecipeError(f"eval_datasets entry {position} should be a mapping with a `name`, got {item!r:.80}.")
        unknown = sorted(set(item) - set(ENTRY_FIELDS))
        if unknown:
            raise RecipeError(
                f"eval_datasets entry {position}: unknown field '{unknown[0]}'. Its fields: {', '.join(ENTRY_FIELDS)}."
            )
        name = item.get("name")
        if not isinstance(name, str) or not SET_NAME.fullmatch(name):
            raise RecipeError(
                f"eval_datasets entry {position} needs a `name` of letters, digits, '_', '.' or '-' (it names the "
                f"logged metrics, eval/<name>/<metric>), got {name!r}."
            )
        entries.append(dict(item))
    names = [entry["name"] for entry in entries]
    duplicate = next((name for name in names if names.count(name) > 1), None)
    if duplicate:
        raise RecipeError(f"eval_datasets names the set '{duplicate}' twice; each set needs its own name.")
    return entries


def resolve_eval_sets(data_args: DataArguments, evaluation: EvaluationArguments) -> list[EvalSet]:
    """The recipe's evaluation sets, every name, task and prompt preset checked. The recipe's task must be resolved
    (`apply_task_defaults`) first."""
    task = resolve_task(evaluation.task, data_args.formatter)
    sets = []
    for entry in _entries(evaluation.eval_datasets) or [{"name": task.name}]:
        where = f"eval_datasets entry '{entry['name']}'" if evaluation.eval_datasets else "the recipe"
        set_task = get_task(entry["task"]) if entry.get("task") else task
        dataset = entry.get("dataset") or data_args.dataset_name
        config = entry.get("dataset_config", data_args.dataset_config if dataset == data_args.dataset_name else None)
        own_dataset = dataset == data_args.dataset_name and config == data_args.dataset_config
        # On the recipe's dataset the data keeps its shape (the recipe's formatter); other data reads as its task's.
        formatter = entry.get("formatter") or (data_args.formatter if own_dataset else set_task.formatter)
        split = entry.get("split") or data_args.dataset_test_split
        own_split = own_dataset and formatter == data_args.formatter and split == data_args.dataset_test_split
        if not own_split and (not split or str(split).lower() == "none"):
            raise RecipeError(f"{where}: name the `split` to evaluate on.")
        try:
            preset = set_task.preset(entry.get("prompt_preset") or evaluation.prompt_preset)
        except RecipeError as error:
            raise RecipeError(f"{where}: {error}") from None
        data = replace(
            data_args,
            dataset_name=dataset,
            dataset_config=config,
            formatter=formatter,
            dataset_test_split=split,
            eval_split_size=data_args.eval_split_size if own_split else None,
            max_eval_samples=data_args.max_eval_samples if own_split else None,
        )
        sets.append(
            EvalSet(
                name=entry["name"],
                task=set_task,
                preset=preset,
                data=data,
                max_samples=_positive(entry.get("max_samples"), where, "max_samples"),
                max_new_tokens=_positive(entry.get("max_new_tokens"), where, "max_new_tokens")
                or evaluation.max_new_tokens
                or set_task.max_new_tokens,
                own_split=own_split,
            )
        )
    return sets


def _positive(value: Any, where: str, field: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise RecipeError(f"{where}: `{field}` should be a whole number of at least 1, got {value!r}.")
    return value


def load_eval_set(
    eval_set: EvalSet, *, seed: int, num_proc: int | None, limit: int | None = None
) -> tuple[Any, DataReport]:
    """The set's formatted rows (the first `limit`, when given) and the report of the rows its formatter rejected."""
    data = eval_set.data if limit is None else replace(eval_set.data, max_eval_samples=limit)
    try:
        _, rows, report = load_datasets(data, seed=seed, need_eval=True, num_proc=num_proc, format_train=False)
    except RecipeError as error:
        raise type(error)(f"Evaluation set '{eval_set.name}': {error}") from None
    if rows is None or len(rows) == 0:
        raise RecipeError(f"The evaluation set '{eval_set.name}' ({data.dataset_name}, {eval_set.split}) has no rows.")
    return rows, report


def first_rows(rows: Any, limit: int | None) -> Any:
    """The first `limit` rows: the same rows at every evaluation, so the numbers compare."""
    if limit is None or len(rows) <= limit:
        return rows
    return rows.select(range(limit)) if hasattr(rows, "select") else rows[:limit]


def metric_key(set_name: str, metric: str) -> str:
    """The key a set's metric is logged under during training: the Trainer's `eval_` prefix (loggers show
    eval/<set>/<metric>; `metric_for_best_model: <set>/<metric>` finds it)."""
    return f"eval_{set_name}/{metric}"


def headline_keys(eval_sets: list[EvalSet]) -> tuple[str, ...]:
    """Each set's headline metric as logged during training (the end-of-run summary shows how they moved)."""
    return tuple(metric_key(eval_set.name, eval_set.task.primary_metric) for eval_set in eval_sets)
