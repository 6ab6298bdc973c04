"""What a user sees on the terminal: one log format, known noise filtered, output from the main process only."""

import logging
import warnings

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


def setup_console(level: int = logging.INFO) -> None:
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.WARNING)
    logging.getLogger("vlm_recipes").setLevel(level)
    quiet_known_noise()


def quiet_known_noise() -> None:
    """Runs when the package is imported, before the libraries that print these messages."""
    for category, message in KNOWN_NOISE:
        warnings.filterwarnings("ignore", message=message, category=category)
    # bitsandbytes asks for the optional `kernels` package (a Hub download) on CPUs with AVX512-BF16; its fallback works.
    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_DropMessages("gemm_4bit_forward"))


def print_main(*lines: str) -> None:
    """Print on the main process only, so a multi-GPU run shows each message once."""
    if is_main_process():
        print(*lines, sep="\n", flush=True)
