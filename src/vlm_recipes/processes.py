"""Which process this is, and ordering work between processes: the one place that asks accelerate.

Under one process every answer is the trivial one. Under `accelerate launch` (or torchrun) the main process is rank 0;
each machine also has a local main process, which does the work that writes to that machine's disk first.
"""

from collections.abc import Iterator
from contextlib import contextmanager


def _state():
    from accelerate import PartialState

    return PartialState()


def is_main_process() -> bool:
    """Whether this is the launch's main process (rank 0), the one that writes the run's outputs and prints."""
    return _state().is_main_process


def wait_for_everyone() -> None:
    """A barrier: return when every process of the launch has reached it (at once under one process)."""
    _state().wait_for_everyone()


@contextmanager
def main_process_first(local: bool = True) -> Iterator[None]:
    """Run the body on each machine's main process first while the others wait, then on the others, which find the
    datasets cache it wrote (loaded splits, formatted rows) and reuse it instead of formatting again. `local=False`:
    the main process of the first machine only (for a filesystem every machine shares).

    The main process releases the others also when the body fails, so that every process stops with the same error
    instead of the others waiting at the barrier until the launcher kills them."""
    state = _state()
    if state.num_processes == 1:
        yield
        return
    first = state.is_local_main_process if local else state.is_main_process
    if not first:
        state.wait_for_everyone()
    try:
        yield
    finally:
        if first:
            state.wait_for_everyone()
