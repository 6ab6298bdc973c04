"""Trainer callbacks: answer-level evaluation during training and the plot written when training ends (each log as a
console line: `training/log_lines.py`)."""

from pathlib import Path
from typing import Any

from transformers import TrainerCallback

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
