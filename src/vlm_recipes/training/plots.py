"""A PNG of how training went: one panel per group of logged metrics that the run has (losses, a preference method's
rewards and accuracies, the evaluation sets' metrics, learning rate and gradient norm), by step.

The groups are a table (`PANELS`): a training method that logs other metrics adds a row, not a code path. A group takes
the keys its `match` accepts, in their training (`rewards/margins`) and evaluation (`eval_rewards/margins`) forms.
"""

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlm_recipes.training.source_loss import ACCURACY_PREFIX as SOURCE_ACCURACY_PREFIX
from vlm_recipes.training.source_loss import LOSS_PREFIX as SOURCE_LOSS_PREFIX


LOSS_KEYS = ("loss", "eval_loss")


@dataclass(frozen=True)
class Panel:
    title: str
    match: Callable[[str], bool]  # a logged key -> whether this panel draws it
    unit_interval: bool = False  # values between 0 and 1 (accuracies, scores): the axis shows all of [0, 1]
    log_scale: bool = False


def _base(key: str) -> str:
    return key.removeprefix("eval_")


# In drawing order. A key is drawn by the first panel that matches it.
PANELS = (
    Panel("loss", lambda key: key in LOSS_KEYS),
    # a mixture's sources: SFT's token mean, DPO's pair mean (`training.source_loss`)
    Panel("training loss per source", lambda key: key.startswith(SOURCE_LOSS_PREFIX)),
    Panel("reward margin (chosen - rejected)", lambda key: _base(key) == "rewards/margins"),
    Panel("reward accuracy (chosen > rejected)", lambda key: _base(key) == "rewards/accuracies", unit_interval=True),
    Panel(
        "reward accuracy per source (chosen > rejected)",
        lambda key: key.startswith(SOURCE_ACCURACY_PREFIX),
        unit_interval=True,
    ),
    Panel("learning rate", lambda key: key == "learning_rate"),
    Panel("gradient norm", lambda key: key == "grad_norm", log_scale=True),
)
EVALUATION_PANEL = "evaluation (answers scored by each set's task)"


def series(log_history: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    points = [(entry["step"], entry[key]) for entry in log_history if key in entry and "step" in entry]
    return [step for step, _ in points], [float(value) for _, value in points]


def _logged_keys(log_history: list[dict[str, Any]]) -> list[str]:
    keys: dict[str, None] = {}
    for entry in log_history:
        if "step" in entry:
            keys.update(dict.fromkeys(key for key, value in entry.items() if isinstance(value, int | float)))
    return list(keys)


def panels_for(
    log_history: list[dict[str, Any]],
    loss_keys: tuple[str, ...],
    metric_keys: tuple[str, ...],
    extra: tuple[tuple[str, tuple[str, ...]], ...] = (),
) -> list[tuple[Panel, list[str]]]:
    """The panels this log fills, each with its keys: the table's groups, a method's own groups (`extra`: (title,
    keys), such as GRPO's rewards and KL), then the named evaluation metrics."""
    logged = _logged_keys(log_history)
    method_panels = tuple(Panel(title, lambda key, keys=keys: _base(key) in keys) for title, keys in extra)
    chosen = []
    for panel in PANELS + method_panels:
        if panel.title == "loss":  # the caller's loss keys, in their order
            keys = [key for key in loss_keys if key in logged]
        else:
            keys = [key for key in logged if panel.match(key)]
        if keys:
            chosen.append((panel, keys))
    evaluation = [key for key in metric_keys if key in logged]
    if evaluation:
        chosen.append((Panel(EVALUATION_PANEL, lambda key: key in metric_keys, unit_interval=True), evaluation))
    return chosen


def plot_title(model: str | None, task: str | None, recipe: str | None) -> str:
    """The plot's title: which model, on which task, from which recipe (local paths by their last part)."""
    parts = [
        Path(str(model)).name if model else None,
        f"task {task}" if task else None,
        Path(recipe).name if recipe else None,
    ]
    return " | ".join(part for part in parts if part)


def plot_training_log(
    log_history: list[dict[str, Any]],
    path: str | Path,
    loss_keys: tuple[str, ...] = LOSS_KEYS,
    metric_keys: tuple[str, ...] = (),
    title: str | None = None,
    panels: tuple[tuple[str, tuple[str, ...]], ...] = (),
) -> Path | None:
    """Write the plot to `path`; None (and no file) when the log holds no loss or metric. `metric_keys`: the
    answer-level metrics evaluation during training logs (`eval_<set>/<metric>`, each between 0 and 1). `panels`: a
    method's own groups of logged values, (title, keys) each (GRPO's rewards, their spread, completion length, KL)."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed: training machines usually have none
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    panels = panels_for(log_history, loss_keys, metric_keys, panels)
    if not any(panel.title in ("loss", EVALUATION_PANEL) or "reward" in panel.title for panel, _ in panels):
        return None  # a log without anything learned (e.g. only the runtime)
    columns = min(len(panels), 3)
    rows = -(-len(panels) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(5.5 * columns, 3.8 * rows), squeeze=False)
    for axis, (panel, keys) in zip(axes.flat, panels):
        for key in keys:
            steps, values = series(log_history, key)
            label = "evaluation" if key.startswith("eval_") and panel.title != EVALUATION_PANEL else "training"
            if panel.title == EVALUATION_PANEL:
                label = key.removeprefix("eval_")  # loggers show eval/<set>/<metric>
            elif panel.title == "loss":
                label = key
            elif key.startswith((SOURCE_LOSS_PREFIX, SOURCE_ACCURACY_PREFIX)):
                label = key.removeprefix(SOURCE_LOSS_PREFIX).removeprefix(SOURCE_ACCURACY_PREFIX)  # the source
            axis.plot(steps, values, marker="o" if len(steps) < 30 else None, markersize=3, label=label)
        axis.set_title(panel.title, fontsize=10)
        axis.set_xlabel("step")
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))  # no step 2.5 on a short run
        if panel.unit_interval:
            axis.set_ylim(-0.02, 1.02)
        values = [value for key in keys for value in series(log_history, key)[1]]
        if panel.log_scale and min(values) > 0 and max(values) / min(values) > 20:  # spikes beside a calm run
            axis.set_yscale("log")
        axis.grid(alpha=0.3)
        if len(keys) > 1 or panel.title == EVALUATION_PANEL:
            axis.legend(fontsize=8)
    for axis in list(axes.flat)[len(panels) :]:
        axis.set_visible(False)
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
