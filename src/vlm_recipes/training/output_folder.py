"""The run's output folder: what may be written into, and what `overwrite_output_dir` may replace.

Nothing a user has is lost to a run's output folder:
- a non-empty folder is used only to resume from it, or, with `overwrite_output_dir`, when it is recognisably an
  earlier run of this package (`recipe.yaml`, `training_log.json`, `data_report.json` or a checkpoint) holding nothing
  but what a run writes (`run_file_patterns`); a folder holding anything else is refused, naming what would be lost;
- the earlier run is moved aside to `<output_dir>.previous-<timestamp>`, never deleted, and only once the new run's
  recipe, model and data checks have passed (`OutputFolderPlan.apply`, called by `training.run` after the data checks);
- the current directory, the home folder, a filesystem root, the dataset's, images', recipe's or model's folder, and any
  folder that contains one of them, are never an output folder;
- a symbolic link is followed: the checks and the move apply to the folder it points to, and the link stays.

A folder holding only what a run writes before training starts (the data report; DPO's copy of the SFT adapter) is the
trace of a run that stopped before training: it is reused, and those files are written again.
"""

import shutil
import time
from dataclasses import dataclass, field
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

from vlm_recipes.console import print_main
from vlm_recipes.errors import RecipeError
from vlm_recipes.hub.upload import PUSHED_PATTERNS, PUSHED_SUBFOLDERS
from vlm_recipes.run_folder import (
    CHECKPOINT_PREFIX,
    COMPLETE_MARKER,
    LOCAL_RUN_PATTERNS,
    PRE_TRAINING_FILES,
    PRE_TRAINING_FOLDERS,
    PREVIOUS_RUN_SUFFIX,
    RUN_MARKERS,
    TRAINER_STATE,
)


def run_file_patterns() -> tuple[str, ...]:
    """Top-level names (glob patterns) a run of this package writes into its output folder: what push uploads
    (`hub.upload.PUSHED_PATTERNS`, `PUSHED_SUBFOLDERS`) and what stays local (`run_folder.LOCAL_RUN_PATTERNS`:
    checkpoints, also those moved aside, DPO's reference adapter, the Trainer's pickled arguments and TensorBoard logs,
    evaluate's predictions)."""
    return (*PUSHED_PATTERNS, *PUSHED_SUBFOLDERS, *LOCAL_RUN_PATTERNS)


def _entry_name(entry: Path) -> str:
    return entry.name + ("/" if entry.is_dir() and not entry.is_symlink() else "")


def _is_checkpoint(entry: Path) -> bool:
    return entry.is_dir() and any((entry / name).is_file() for name in (COMPLETE_MARKER, TRAINER_STATE))


def is_earlier_run(path: Path) -> bool:
    """Whether a folder is recognisably a run of this package: it holds one of `RUN_MARKERS` or a checkpoint."""
    return any((path / name).is_file() for name in RUN_MARKERS) or any(
        _is_checkpoint(entry) for entry in path.glob(f"{CHECKPOINT_PREFIX}-*")
    )


def foreign_entries(path: Path) -> list[str]:
    """The entries of a folder that no run of this package writes (sorted names; folders end with "/")."""
    patterns = run_file_patterns()
    return sorted(
        _entry_name(entry) for entry in path.iterdir() if not any(fnmatch(entry.name, pattern) for pattern in patterns)
    )


def holds_only_pre_training_files(path: Path) -> bool:
    """Whether a non-empty folder holds only what a run writes before training starts (`PRE_TRAINING_FILES`,
    `PRE_TRAINING_FOLDERS`). Entries that vanish while it looks (the main process clearing them) count as such."""
    for entry in path.iterdir():
        if entry.is_file() and not entry.is_symlink() and entry.name in PRE_TRAINING_FILES:
            continue
        allowed = PRE_TRAINING_FOLDERS.get(entry.name)
        try:
            if (
                allowed is not None
                and entry.is_dir()
                and not entry.is_symlink()
                and all(item.is_file() and item.name in allowed for item in entry.iterdir())
            ):
                continue
        except FileNotFoundError:
            continue
        if not entry.exists() and not entry.is_symlink():
            continue
        return False
    return True


def _contents(path: Path, limit: int = 8) -> str:
    names = sorted(_entry_name(entry) for entry in path.iterdir())
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def check_not_protected(path: Path, protected: dict[str, Any]) -> None:
    """Refuse an output folder that is, or contains, a folder the run must never write over (`protected`: what it is
    -> its path, None where the recipe has none), the current directory, the home folder or a filesystem root."""
    resolved = path.resolve()
    if resolved == Path(resolved.anchor):
        raise RecipeError(f"output_dir {path} is a filesystem root; choose a folder for this run.")
    folders = {"the current directory": Path.cwd(), "your home folder": Path.home(), **protected}
    for what, folder in folders.items():
        if folder is None or not str(folder):
            continue
        other = Path(folder).expanduser().resolve()
        if other == resolved:
            raise RecipeError(f"output_dir {path} is {what}; choose a folder of its own for this run.")
        if other.is_relative_to(resolved):
            raise RecipeError(
                f"output_dir {path} contains {what} ({folder}); choose a folder of its own for this run."
            )


@dataclass
class OutputFolderPlan:
    """What a run does with its output folder, decided before any data or weights load, done by `apply` once the
    checks have passed. `path` is the folder itself (a symbolic link resolved)."""

    path: Path
    action: str  # "create", "use" (empty or resumed), "reuse" (pre-training files only), "move_aside"
    given: str = ""  # output_dir as the recipe gives it, for messages
    moved_to: Path | None = field(default=None)

    @property
    def holds_earlier_run(self) -> bool:
        """The folder still holds an earlier run that `apply` will move aside (nothing may be written into it yet)."""
        return self.action == "move_aside" and self.moved_to is None

    def apply(self, is_main_process: bool = True) -> Path:
        """Make the folder ready (main process): move an earlier run aside, clear a stopped run's pre-training files,
        create the folder. Returns the folder."""
        if not is_main_process:
            return self.path
        if self.action == "move_aside" and self.moved_to is None and self.path.is_dir():
            self.moved_to = _previous_name(self.path)
            self.path.rename(self.moved_to)
            print_main(
                f"overwrite_output_dir: the earlier run in {self.given} was moved to {self.moved_to} (nothing was "
                "deleted; remove it yourself once you no longer need it)."
            )
        if self.action == "reuse" and self.path.is_dir():
            print_main(
                f"output_dir {self.given} holds only what a run writes before training ({_contents(self.path)}), "
                "left by a run that stopped before training: reusing it (these files are replaced)."
            )
            for entry in self.path.iterdir():
                shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
        self.path.mkdir(parents=True, exist_ok=True)
        return self.path


def _previous_name(path: Path) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target = path.with_name(f"{path.name}{PREVIOUS_RUN_SUFFIX}{stamp}")
    number = 2
    while target.exists():
        target = path.with_name(f"{path.name}{PREVIOUS_RUN_SUFFIX}{stamp}-{number}")
        number += 1
    return target


def plan_output_dir(
    output_dir: str | None, *, overwrite: bool, resume: Any, protected: dict[str, Any] | None = None
) -> OutputFolderPlan:
    """Decide what happens to `output_dir`, changing nothing: a clear error for a folder the run must not use (see the
    module docstring). `resume` is the recipe's `resume_from_checkpoint` as `outputs.resume_requested` reads it;
    `protected`: folders the run reads (what -> path), never an output folder nor inside one that is replaced."""
    if not output_dir:
        raise RecipeError("The recipe sets no `output_dir`.")
    given = Path(output_dir).expanduser()
    path = given.resolve() if given.is_symlink() else given  # a link is followed: its folder is the output folder
    if path.exists() and not path.is_dir():
        raise RecipeError(f"output_dir {output_dir} exists and is not a folder.")
    if not path.exists():
        return OutputFolderPlan(path, "create", str(output_dir))
    if resume:
        return OutputFolderPlan(path, "use", str(output_dir))
    check_not_protected(path, protected or {})
    if not any(path.iterdir()):
        return OutputFolderPlan(path, "use", str(output_dir))
    if holds_only_pre_training_files(path):
        return OutputFolderPlan(path, "reuse", str(output_dir))
    if not overwrite:
        raise RecipeError(
            f"output_dir {output_dir} already holds files. Nothing was changed. To continue that run set "
            "`resume_from_checkpoint: true`; to replace it set `overwrite_output_dir: true` (the earlier run is "
            "moved aside, not deleted); or choose another `output_dir`."
        )
    if not is_earlier_run(path):
        raise RecipeError(
            f"output_dir {output_dir} is not a folder of an earlier vlm-recipes run (it has no {', '.join(RUN_MARKERS)} "
            f"or checkpoint), and overwrite_output_dir replaces only those. It holds {_contents(path)}, which would be "
            "lost. Nothing was changed: choose another `output_dir`."
        )
    foreign = foreign_entries(path)
    if foreign:
        raise RecipeError(
            f"output_dir {output_dir} holds an earlier run, and also {', '.join(foreign[:8])}"
            f"{f' and {len(foreign) - 8} more' if len(foreign) > 8 else ''}, which no run writes and which would be "
            "lost with it. Nothing was changed: move them out, or choose another `output_dir`."
        )
    return OutputFolderPlan(path, "move_aside", str(output_dir))


def prepare_output_dir(
    output_dir: str | None, *, overwrite: bool, resume: Any, protected: dict[str, Any] | None = None
) -> Path:
    """`plan_output_dir` and `apply` at once, for commands whose checks all come first (merge)."""
    return plan_output_dir(output_dir, overwrite=overwrite, resume=resume, protected=protected).apply()
