"""What a user sees on the terminal: one log format, known noise filtered, output from the main process only."""

import logging
import os
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

from vlm_recipes.processes import is_main_process


# Messages the libraries print on every run that tell the user nothing they can act on.
KNOWN_NOISE = [
    # TRL's own config sets `gradient_checkpointing`, which transformers renamed in 5.23.
    (FutureWarning, r".*`gradient_checkpointing` is deprecated.*"),
    (FutureWarning, r".*`is_gradient_checkpointing` is deprecated.*"),
]


class _DropMessages(logging.Filter):
    def __init__(self, *fragments: str):
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(fragment in str(record.msg) for fragment in self.fragments)


_command_started = time.monotonic()  # reset by setup_console, which every command calls first


class _DropUnlessDeepSpeedRuns(_DropMessages):
    def filter(self, record: logging.LogRecord) -> bool:
        # accelerate sets ACCELERATE_USE_DEEPSPEED for a DeepSpeed launch: there the message is worth a line.
        return os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true" or super().filter(record)


@contextmanager
def quiet_progress() -> Iterator[None]:
    """Inside, datasets' own progress bars are off (split generation, formatting, casts: a bar each, for steps that
    take a blink); the stage shows its one bar (the data checks') and a line saying what it did."""
    from datasets.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    was_disabled = are_progress_bars_disabled()
    disable_progress_bars()
    try:
        yield
    finally:
        if not was_disabled:
            enable_progress_bars()


def setup_console(level: int = logging.INFO) -> None:
    global _command_started
    _command_started = time.monotonic()
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.WARNING)
    logging.getLogger("vlm_recipes").setLevel(level)
    quiet_known_noise()


def quiet_known_noise() -> None:
    """Runs when the package is imported, before the libraries that print these messages."""
    for category, message in KNOWN_NOISE:
        warnings.filterwarnings("ignore", message=message, category=category)
    # DeepSpeed, installed but not in use, announces at import (transformers imports it) that it picked the CPU.
    logging.getLogger("DeepSpeed").addFilter(_DropUnlessDeepSpeedRuns("Setting accelerator to CPU"))
    # bitsandbytes asks for the optional `kernels` package (a Hub download) on CPUs with AVX512-BF16; its fallback works.
    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_DropMessages("gemm_4bit_forward"))


def print_main(*lines: str) -> None:
    """Print on the main process only, so a multi-GPU run shows each message once."""
    if is_main_process():
        print(*lines, sep="\n", flush=True)


def wall_time(seconds: float) -> str:
    minutes, seconds = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return (
        f"{hours}h {minutes:02d}m {seconds:02d}s"
        if hours
        else f"{minutes}m {seconds:02d}s"
        if minutes
        else f"{seconds}s"
    )


def print_summary(command: str, lines: list[str], next_commands: list[str] = ()) -> None:
    """The few lines a command ends with: what it made and where (`lines`), its wall time, and what to run next."""
    block = [f"=== {command}: done in {wall_time(time.monotonic() - _command_started)} ===", *lines]
    if next_commands:
        block += ["Next:", *(f"  {command_line}" for command_line in next_commands)]
    print_main("", *block)
