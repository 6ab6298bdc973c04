"""Trainer callbacks: answer-level evaluation during training, and the plot written when training ends."""

from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from vlm_recipes.configs import EvaluationArguments
from vlm_recipes.evaluation.runner import evaluate_rows
from vlm_recipes.run_folder import PLOT_FILE
from vlm_recipes.training.plots import plot_training_log


class GenerationEvaluationCallback(TrainerCallback):
    """After each of the Trainer's evaluations, generate answers for a fixed set of evaluation rows and log
    `eval_relaxed_accuracy` and `eval_exact_match` through `trainer.log`, so every logger `report_to` names gets them
    (wandb, trackio and tensorboard show them as eval/relaxed_accuracy, beside eval/loss). The values are also added to
    the evaluation's metrics, so `metric_for_best_model: relaxed_accuracy` can pick checkpoints by them."""

    def __init__(self, trainer: Any, rows: Any, batch_size: int, max_new_tokens: int):
        self.trainer = trainer
        self.rows = rows
        self.batch_size = batch_size
        self.max_new_tokens = max_new_tokens
        self._last_step: int | None = None

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if self._last_step == state.global_step:  # several evaluation sets evaluate at one step: generate once
            return
        self._last_step = state.global_step
        outcome = evaluate_rows(
            self.trainer.model,
            self.trainer.processing_class,
            self.rows,
            batch_size=self.batch_size,
            max_new_tokens=self.max_new_tokens,
            progress=not args.disable_tqdm and state.is_world_process_zero,
            description=f"Generating answers (step {state.global_step})",
        )
        logs = {f"eval_{name}": value for name, value in outcome.scores.items() if name != "rows"}
        if metrics is not None:
            metrics.update(logs)
        self.trainer.log(logs)


class TrainingPlotCallback(TrainerCallback):
    """At the end of training, `training_plot.png` in the output folder: losses and evaluation metrics by step."""

    def on_train_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            plot_training_log(state.log_history, Path(args.output_dir) / PLOT_FILE, title=Path(args.output_dir).name)


def generation_rows(eval_dataset: Any, max_samples: int | None) -> Any:
    """The first `max_samples` evaluation rows: the same rows at every evaluation, so the numbers compare."""
    if max_samples is None or len(eval_dataset) <= max_samples:
        return eval_dataset
    return eval_dataset.select(range(max_samples))


def add_evaluation_callbacks(trainer: Any, evaluation: EvaluationArguments, eval_dataset: Any) -> None:
    """Generation-based evaluation (when the run evaluates) and the end-of-training plot."""
    args = trainer.args
    if evaluation.eval_generation and eval_dataset is not None and args.eval_strategy != "no":
        trainer.add_callback(
            GenerationEvaluationCallback(
                trainer,
                generation_rows(eval_dataset, evaluation.eval_generation_rows),
                batch_size=evaluation.eval_generation_batch_size or args.per_device_eval_batch_size,
                max_new_tokens=evaluation.max_new_tokens,
            )
        )
    trainer.add_callback(TrainingPlotCallback())
