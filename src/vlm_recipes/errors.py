"""User-facing errors: one clear message instead of a traceback from deep inside a library."""

import functools
import sys


class RecipeError(Exception):
    """A problem the user can fix (recipe, data, paths); printed as one message, without a traceback."""


class DataError(RecipeError):
    """A dataset problem; the message names the file or dataset, the row and the column."""

    def __init__(
        self,
        message: str,
        *,
        source: str | None = None,
        row: int | None = None,
        column: str | None = None,
        row_label: str = "row",
    ):
        where = ", ".join(
            part
            for part in (source, row is not None and f"{row_label} {row}", column and f"column '{column}'")
            if part
        )
        super().__init__(f"{where}: {message}" if where else message)
        self.source, self.row, self.column = source, row, column


def exit_on_recipe_error(main):
    """Wrap an entry point so that a `RecipeError` ends the run with its message and exit code 2."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except RecipeError as error:
            print(f"\nerror: {error}", file=sys.stderr, flush=True)
            raise SystemExit(2) from None

    return wrapper
