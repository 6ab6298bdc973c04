"""Trainer callbacks: answer-level evaluation during training, the plot written when training ends, and each log as one
readable line instead of transformers' printed dict."""

from pathlib import Path
from typing import Any

from transformers import PrinterCallback, ProgressCallback, TrainerCallback

from vlm_recipes.configs import EvaluationArguments
from vlm_recipes.evaluation.runner import evaluate_rows
from vlm_recipes.evaluation.sets import EvalSet, first_rows, metric_key
from vlm_recipes.run_folder import PLOT_FILE
from vlm_recipes.training.plots import plot_training_log


class GenerationEvaluationCallback(TrainerCallback):
    """After each of the Trainer's evaluations, generate answers for a fixed set of rows of every evaluation set and
    log each set's metrics as `eval_<set>/<metric>` through `trainer.log`, so every logger `report_to` names gets them
    (wandb, trackio and tensorboard show eval/<set>/<metric>, beside eval/loss). The values are also added to the
    evaluation's metrics, so `metric_for_best_model: <set>/<metric>` can pick checkpoints by them."""

    def __init__(self, trainer: Any, sets: list[tuple[EvalSet, Any]], batch_size: int):
        self.trainer = trainer
        self.sets = sets  # (evaluation set, its rows)
        self.batch_size = batch_size
        self._last_step: int | None = None

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if self._last_step == state.global_step:  # several evaluation datasets evaluate at one step: generate once
            return
        self._last_step = state.global_step
        logs = {}
        for eval_set, rows in self.sets:
            outcome = evaluate_rows(
                self.trainer.model,
                self.trainer.processing_class,
                rows,
                eval_set.task,
                eval_set.preset,
                batch_size=self.batch_size,
                max_new_tokens=eval_set.max_new_tokens,
                progress=not args.disable_tqdm and state.is_world_process_zero,
                description=f"Generating answers for {eval_set.name} (step {state.global_step})",
            )
            logs.update(
                {metric_key(eval_set.name, name): value for name, value in outcome.scores.items() if name != "rows"}
            )
        if metrics is not None:
            metrics.update(logs)
        self.trainer.log(logs)


class TrainingPlotCallback(TrainerCallback):
    """At the end of training, `training_plot.png` in the output folder: losses and, by step, the answer-level
    metrics named in `metric_keys` (those `GenerationEvaluationCallback` logs), and a panel for each group of
    `panels` (a method's own logged values: GRPO's rewards, KTO's rewards and KL)."""

    def __init__(
        self,
        metric_keys: tuple[str, ...] = (),
        panels: tuple[tuple[str, tuple[str, ...]], ...] = (),
        title: str | None = None,
    ):
        self.metric_keys = metric_keys
        self.panels = panels
        self.title = title

    def on_train_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            output_dir = Path(args.output_dir)
            plot_training_log(
                state.log_history,
                output_dir / PLOT_FILE,
                metric_keys=self.metric_keys,
                title=self.title or output_dir.name,
                panels=self.panels,
            )


def add_evaluation_callbacks(
    trainer: Any,
    evaluation: EvaluationArguments,
    sets: list[tuple[EvalSet, Any]] | None,
    plot_title: str | None = None,
) -> None:
    """Generation-based evaluation of each evaluation set (when the run evaluates) and the end-of-training plot."""
    args = trainer.args
    sets = (sets or []) if evaluation.eval_generation and args.eval_strategy != "no" else []
    if sets:
        limit = evaluation.eval_generation_rows
        trainer.add_callback(
            GenerationEvaluationCallback(
                trainer,
                [(eval_set, first_rows(rows, eval_set.max_samples or limit)) for eval_set, rows in sets],
                batch_size=evaluation.eval_generation_batch_size or args.per_device_eval_batch_size,
            )
        )
    keys = tuple(metric_key(eval_set.name, metric) for eval_set, _ in sets for metric in eval_set.task.metric_names)
    trainer.add_callback(TrainingPlotCallback(keys, title=plot_title))


# The Trainer's end-of-training dict (runtime, samples per second, mean loss): the command's summary says the same.
END_OF_TRAINING_KEY = "train_runtime"


def log_line(state: Any, logs: dict[str, Any]) -> str | None:
    """One logged step as a line (`step 20/80  loss 1.234  grad_norm 0.5  learning_rate 5e-05 ...`) in place of
    transformers' printed dict; None for the end-of-training dict, which the summary replaces."""
    if END_OF_TRAINING_KEY in logs:
        return None
    values = [
        f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}"
        for key, value in logs.items()
        if key not in {"total_flos", "epoch"} and not isinstance(value, str | list | dict)
    ]
    return "  ".join([f"step {state.global_step}/{state.max_steps}", *values])


class ProgressWithLogLines(ProgressCallback):
    """transformers' progress bar, with each log as `log_line` above the bar rather than a printed dict."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and self.training_bar is not None and logs:
            line = log_line(state, logs)
            if line:
                self.training_bar.write(line)

    def on_train_end(self, args, state, control, **kwargs):
        # A resume at max_steps ends training before this callback's on_train_begin made a bar (the fault guards stop
        # it first): nothing to close.
        if self.training_bar is not None:
            super().on_train_end(args, state, control, **kwargs)


class LogLines(PrinterCallback):
    """`disable_tqdm: true`: no bar, each log as `log_line`."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs and (line := log_line(state, logs)):
            print(line, flush=True)


def use_log_lines(trainer: Any) -> None:
    """Swap the Trainer's printers of raw log dicts (its progress bar's, or PrinterCallback's) for `log_line`."""
    for printer, replacement in ((ProgressCallback, ProgressWithLogLines), (PrinterCallback, LogLines)):
        if any(type(callback) is printer for callback in trainer.callback_handler.callbacks):
            trainer.remove_callback(printer)
            trainer.add_callback(replacement)
