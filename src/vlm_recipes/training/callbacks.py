"""Trainer callbacks: answer-level evaluation during training, and the plot written when training ends."""

from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from vlm_recipes.configs import EvaluationArguments
from vlm_recipes.console import print_main
from vlm_recipes.evaluation.runner import evaluate_rows
from vlm_recipes.evaluation.sets import EvalSet, first_rows, metric_key
from vlm_recipes.training.plots import PLOT_FILE, plot_training_log


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
    metrics named in `metric_keys` (those `GenerationEvaluationCallback` logs)."""

    def __init__(self, metric_keys: tuple[str, ...] = ()):
        self.metric_keys = metric_keys

    def on_train_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            output_dir = Path(args.output_dir)
            plot_training_log(
                state.log_history, output_dir / PLOT_FILE, metric_keys=self.metric_keys, title=output_dir.name
            )


class LaunchSummaryCallback(TrainerCallback):
    """When training starts (the model wrapped by then), on the main process: the launch (DDP, ZeRO stage, FSDP), the
    global batch and, under DDP, whose gradients are reduced (`training.distributed.launch_summary`)."""

    def __init__(self, trainer: Any):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        from vlm_recipes.training.distributed import launch_summary

        lines = launch_summary(self.trainer)
        if lines:
            print_main(*lines)


def add_evaluation_callbacks(
    trainer: Any, evaluation: EvaluationArguments, sets: list[tuple[EvalSet, Any]] | None
) -> None:
    """Generation-based evaluation of each evaluation set (when the run evaluates) and the end-of-training plot."""
    args = trainer.args
    sets = (sets or []) if evaluation.eval_generation and args.eval_strategy != "no" else []
    if sets:
        limit = evaluation.eval_max_samples
        trainer.add_callback(
            GenerationEvaluationCallback(
                trainer,
                [(eval_set, first_rows(rows, eval_set.max_samples or limit)) for eval_set, rows in sets],
                batch_size=evaluation.eval_generation_batch_size or args.per_device_eval_batch_size,
            )
        )
    keys = tuple(metric_key(eval_set.name, metric) for eval_set, _ in sets for metric in eval_set.task.metric_names)
    trainer.add_callback(TrainingPlotCallback(keys))
