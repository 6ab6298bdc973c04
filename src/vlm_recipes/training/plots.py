"""A PNG of how training went: the losses, and the evaluation metrics beside them when there are any."""

from pathlib import Path
from typing import Any


PLOT_FILE = "training_plot.png"
LOSS_KEYS = ("loss", "eval_loss")


def series(log_history: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    points = [(entry["step"], entry[key]) for entry in log_history if key in entry and "step" in entry]
    return [step for step, _ in points], [float(value) for _, value in points]


def plot_training_log(
    log_history: list[dict[str, Any]],
    path: str | Path,
    loss_keys: tuple[str, ...] = LOSS_KEYS,
    metric_keys: tuple[str, ...] = (),
    title: str | None = None,
) -> Path | None:
    """Write the plot to `path`; None (and no file) when the log holds none of the keys. `metric_keys`: the
    answer-level metrics evaluation during training logs (`eval_<set>/<metric>`, each between 0 and 1)."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed: training machines usually have none
    import matplotlib.pyplot as plt

    panels = [
        (name, keys)
        for name, keys in (("loss", loss_keys), ("evaluation", metric_keys))
        if any(series(log_history, key)[0] for key in keys)
    ]
    if not panels:
        return None
    figure, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4), squeeze=False)
    for axis, (name, keys) in zip(axes[0], panels):
        for key in keys:
            steps, values = series(log_history, key)
            if steps:
                label = key.removeprefix("eval_") if name == "evaluation" else key  # loggers show <set>/<metric>
                axis.plot(steps, values, marker="o" if len(steps) < 30 else None, markersize=3, label=label)
        axis.set_xlabel("step")
        axis.set_ylabel(name)
        if name == "evaluation":
            axis.set_ylim(-0.02, 1.02)
        axis.grid(alpha=0.3)
        axis.legend()
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
