"""Each log of a training run as one short line above the progress bar, instead of transformers' printed dict:
`step 20/80  loss 1.234  mean_token_accuracy 0.61  grad_norm 0.52  learning_rate 5e-05`.

The line shows the keys a user watches for the run's method (`HEADLINE_KEYS`), in the table's order; an evaluation
gets its own `eval step ...` line. Everything the trainer logs still reaches training_log.json, the plot and every
`report_to` logger unchanged: only the console is shortened.
"""

from typing import Any

from transformers import PrinterCallback, ProgressCallback

from vlm_recipes.training.source_loss import LOSS_PREFIX


# The keys a user watches while a method trains, in the order the line shows them (read from what TRL 1.16's trainers
# log). A key ending in "/" stands for every logged key that starts with it: `loss/<source>` on a mixture. What
# is left out (logps, logits, entropy, num_tokens, clip ratios, each reward function's mean and std, ...) stays in
# training_log.json and the loggers.
HEADLINE_KEYS: dict[str, tuple[str, ...]] = {
    "sft": ("loss", LOSS_PREFIX, "mean_token_accuracy", "grad_norm", "learning_rate"),
    "dpo": ("loss", LOSS_PREFIX, "rewards/margins", "rewards/accuracies", "learning_rate"),
    # GRPO's loss is near zero by construction (advantages are centred): the reward is what moves.
    "grpo": ("reward", "reward_std", "kl", "completions/mean_length", "learning_rate"),
    "kto": ("loss", "rewards/margins", "kl", "learning_rate"),
}
# A method the table does not know: what every transformers Trainer logs.
DEFAULT_HEADLINE_KEYS = ("loss", "grad_norm", "learning_rate")

EVAL_PREFIX = "eval_"
# The Trainer's end-of-training dict (runtime, samples per second, mean loss): the command's summary says the same.
END_OF_TRAINING_KEY = "train_runtime"
# Never on a line: the step is its start; the rest is bookkeeping or timing, not how training goes.
NOT_SHOWN = {"step", "epoch", "total_flos"}
TIMING_SUFFIXES = ("_runtime", "_samples_per_second", "_steps_per_second")


def method_of(trainer: Any) -> str | None:
    """The training method of a trainer (a key of `HEADLINE_KEYS`), from the TRL trainer it is; None for another."""
    from trl import DPOTrainer, GRPOTrainer, KTOTrainer, SFTTrainer

    for method, trainer_class in (
        ("sft", SFTTrainer),
        ("dpo", DPOTrainer),
        ("grpo", GRPOTrainer),
        ("kto", KTOTrainer),
    ):
        if isinstance(trainer, trainer_class):
            return method
    return None


def _format(value: float | int) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _headline(values: dict[str, float | int], keys: tuple[str, ...]) -> list[str]:
    """`values`' keys that `keys` names, in `keys`' order (a key ending in "/" taking every key it prefixes)."""
    chosen: list[str] = []
    for key in keys:
        if key.endswith("/"):
            chosen += sorted(name for name in values if name.startswith(key) and name not in chosen)
        elif key in values:
            chosen.append(key)
    return chosen


def log_line(state: Any, logs: dict[str, Any], method: str | None = None) -> str | None:
    """One log as a line: `step N/M` and the method's headline keys that this log has. An evaluation's log (every key
    `eval_...`) as `eval step N/M` and the same keys without the prefix. A log holding none of the headline keys (the
    answer-level scores `eval_<set>/<metric>`, a value a callback logs) shows each of its numbers instead, so nothing
    logged goes unseen. None for the end-of-training dict, which the summary replaces, and for a log with no number."""
    if END_OF_TRAINING_KEY in logs:
        return None
    numbers = {
        key: value
        for key, value in logs.items()
        if key not in NOT_SHOWN and isinstance(value, int | float) and not isinstance(value, bool)
    }
    evaluation = bool(numbers) and all(key.startswith(EVAL_PREFIX) for key in numbers)
    if evaluation:
        numbers = {key.removeprefix(EVAL_PREFIX): value for key, value in numbers.items()}
    numbers = {key: value for key, value in numbers.items() if not key.endswith(TIMING_SUFFIXES)}
    shown = _headline(numbers, HEADLINE_KEYS.get(method or "", DEFAULT_HEADLINE_KEYS)) or list(numbers)
    if not shown:
        return None
    start = f"{'eval ' if evaluation else ''}step {state.global_step}/{state.max_steps}"
    return "  ".join([start, *(f"{key} {_format(numbers[key])}" for key in shown)])


class ProgressWithLogLines(ProgressCallback):
    """transformers' progress bar, with each log as `log_line` above the bar rather than a printed dict."""

    def __init__(self, method: str | None = None):
        super().__init__()
        self.method = method

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and self.training_bar is not None and logs:
            line = log_line(state, logs, self.method)
            if line:
                self.training_bar.write(line)

    def on_train_end(self, args, state, control, **kwargs):
        # A resume at max_steps ends training before this callback's on_train_begin made a bar (the fault guards stop
        # it first): nothing to close.
        if self.training_bar is not None:
            super().on_train_end(args, state, control, **kwargs)


class LogLines(PrinterCallback):
    """`disable_tqdm: true`: no bar, each log as `log_line`."""

    def __init__(self, method: str | None = None):
        super().__init__()
        self.method = method

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs and (line := log_line(state, logs, self.method)):
            print(line, flush=True)


def use_log_lines(trainer: Any) -> None:
    """Swap the Trainer's printers of raw log dicts (its progress bar's, or PrinterCallback's) for `log_line`, with the
    trainer's method's headline keys."""
    method = method_of(trainer)
    for printer, replacement in ((ProgressCallback, ProgressWithLogLines), (PrinterCallback, LogLines)):
        if any(type(callback) is printer for callback in trainer.callback_handler.callbacks):
            trainer.remove_callback(printer)
            trainer.add_callback(replacement(method))
