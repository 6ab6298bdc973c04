"""What a model card says about evaluation: each evaluation set's numbers and how they were computed (the task's card
text, the split, the prompt preset), and the `model-index` metadata from which the Hub shows them.

The numbers come from `eval_results.json` (the evaluate command) when the run folder has one, else from the last
evaluation during training (`training_log.json`, on `eval_max_samples` rows of each set). Local dataset paths are
never written: a local dataset is named by its folder or file name.
"""

from pathlib import Path
from typing import Any

from vlm_recipes.evaluation.sets import EvalSet, metric_key
from vlm_recipes.tasks import TASKS


def is_local_path(name: Any) -> bool:
    """A local file or folder (or a path that looks like one), as opposed to a Hub id."""
    return bool(name) and (Path(str(name)).expanduser().exists() or str(name).startswith((".", "/", "~")))


def dataset_label(dataset: Any) -> str:
    """How the card names a dataset: a Hub id as it is, local data by its file or folder name only."""
    return Path(str(dataset)).name if is_local_path(dataset) else str(dataset)


def _value(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _card_model(results: dict[str, Any], is_adapter: bool) -> str | None:
    """The column of eval_results.json that is this repository's model: the adapter's, or a full model's only one."""
    if "adapter" in results:
        return "adapter"
    return None if is_adapter or len(results) != 1 else next(iter(results))


def evaluation_lines(eval_results: dict[str, Any]) -> list[str]:
    """One subsection per evaluation set: what was evaluated and how, then a metric x model table."""
    lines = []
    for name, result in (eval_results.get("eval_sets") or {}).items():
        task = TASKS.get(result.get("task"))
        models = list(result.get("results") or {})
        metrics = task.metric_names if task else sorted({k for m in models for k in result["results"][m]})
        lines += [
            f"### {name}",
            "",
            f"{task.title if task else result.get('task')}: greedy answers on `{dataset_label(result.get('dataset'))}` "
            f"(split `{result.get('split')}`, {result.get('rows')} rows), prompt preset `{result.get('prompt_preset')}` "
            f"({result.get('prompt_source')}), at most {result.get('max_new_tokens')} new tokens."
            + (f" {task.card_text}" if task else ""),
            "",
            "| metric | " + " | ".join(models) + " |",
            "| --- | " + " | ".join("---" for _ in models) + " |",
        ]
        for metric in metrics:
            values = [_value(result["results"][model].get(metric)) for model in models]
            lines.append(f"| {metric} | " + " | ".join(values) + " |")
        lines.append("")
    return lines[:-1]


def last_training_evaluation(log_history: list[dict[str, Any]], eval_sets: list[EvalSet]) -> dict[str, Any]:
    """The last logged value of `eval_loss` and of every evaluation set's metrics, with the step of each."""
    keys = ["eval_loss"] + [metric_key(s.name, metric) for s in eval_sets for metric in s.task.metric_names]
    last: dict[str, Any] = {}
    for entry in log_history:
        last.update({key: (entry[key], entry.get("step")) for key in keys if key in entry})
    return last


def _result(eval_set_name: str, task_name: str, dataset: Any, config: Any, split: Any, metrics: list) -> dict:
    task = TASKS[task_name]
    local = is_local_path(dataset)
    entry = {
        "task": {"type": task.hub_task_type, "name": task.title},
        "dataset": {
            "type": eval_set_name if local else str(dataset),
            "name": f"{dataset_label(dataset)} ({eval_set_name})",
            "split": str(split),
        },
        "metrics": metrics,
    }
    if config and not local:
        entry["dataset"]["config"] = str(config)
    return entry


def model_index(
    model_name: str,
    eval_results: dict[str, Any] | None,
    log_history: list[dict[str, Any]],
    eval_sets: list[EvalSet],
    is_adapter: bool,
) -> list[dict[str, Any]] | None:
    """The card metadata's `model-index`: every metric of every evaluation set (task, dataset, split, metric, value,
    prompt preset), or None when the run has no evaluation of this model."""
    results = []
    for name, result in ((eval_results or {}).get("eval_sets") or {}).items():
        model = _card_model(result.get("results") or {}, is_adapter)
        if model is None or result.get("task") not in TASKS:
            continue
        values = result["results"][model]
        args = {"prompt_preset": result.get("prompt_preset"), "rows": result.get("rows")}
        metrics = [
            {"type": metric, "name": metric, "value": round(float(values[metric]), 4), "args": dict(args)}
            for metric in TASKS[result["task"]].metric_names
            if metric in values
        ]
        results.append(
            _result(
                name, result["task"], result.get("dataset"), result.get("dataset_config"), result.get("split"), metrics
            )
        )
    if not results:  # not evaluated by the command: the last evaluation during training
        last = last_training_evaluation(log_history, eval_sets)
        for eval_set in eval_sets:
            metrics = [
                {
                    "type": metric,
                    "name": metric,
                    "value": round(float(last[key][0]), 4),
                    "args": {"prompt_preset": eval_set.preset.name, "during_training_at_step": last[key][1]},
                }
                for metric in eval_set.task.metric_names
                if (key := metric_key(eval_set.name, metric)) in last
            ]
            if metrics:
                data = eval_set.data
                results.append(
                    _result(
                        eval_set.name,
                        eval_set.task.name,
                        data.dataset_name,
                        data.dataset_config,
                        eval_set.split,
                        metrics,
                    )
                )
    return [{"name": model_name, "results": results}] if results else None
