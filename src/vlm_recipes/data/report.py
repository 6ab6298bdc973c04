"""The data report: rows rejected before training, counted by reason per split, with example rows.

Rejected rows are skipped, never trained on; the report goes on screen and into `data_report.json` in the output
folder. When more than `max_bad_fraction` of a split is rejected the run stops before loading the model.

`data_report.json` is shared when a run is pushed, so it holds no absolute path of this machine: paths inside the data
folder (the JSONL's folder, or the dataset folder) are written relative to it, those inside `image_dir` as
`(image_dir)/...`, and any other absolute path as `(outside the data folder)/<file name>`. Rows that read images from
outside the data folders (an absolute path, `../`) are read as asked, and counted.
"""

import json
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlm_recipes.console import print_main
from vlm_recipes.errors import DataError
from vlm_recipes.run_folder import DATA_REPORT_FILE


MAX_EXAMPLES = 5
# An absolute path in a message: a "/" not after a word, ".", ":", "/" or ")" (a fraction, a relative path, a URL, a
# path already made relative) nor after "<" or "[" (a closing tag or marker in a special token: </s>, [/INST]), up to a
# space, comma, semicolon, quote or bracket.
ABSOLUTE_PATH = re.compile(r"(?<![\w.:/)<\[])/[^\s,;'\"()\[\]]+")
OUTSIDE = "(outside the data folder)"


@dataclass
class Rejection:
    reason: str
    count: int = 0
    examples: list[str] = field(default_factory=list)  # "row 17" / "line 18"
    message: str = ""  # the first full message, with its column


@dataclass
class SplitReport:
    source: str
    rows: int = 0
    rejections: dict[str, Rejection] = field(default_factory=dict)
    # Rows kept after a fix (an image converted to RGB, resized to a size the processor takes), by kind.
    fixes: dict[str, Rejection] = field(default_factory=dict)
    # Rows that read images from outside the data folder (absolute paths, `../`): read as asked, counted here.
    outside: Rejection = field(default_factory=lambda: Rejection(reason="images outside the data folder"))

    @property
    def rejected(self) -> int:
        return sum(rejection.count for rejection in self.rejections.values())

    @property
    def kept(self) -> int:
        return self.rows - self.rejected

    @property
    def bad_fraction(self) -> float:
        return self.rejected / self.rows if self.rows else 0.0


class DataReport:
    def __init__(
        self,
        data_folder: str | Path | None = None,
        image_dir: str | Path | None = None,
        more_folders: list[str | Path] | None = None,
    ) -> None:
        self.splits: dict[str, SplitReport] = {}
        # Where relative paths in the report are relative to (`relative_paths`); None for Hub datasets.
        self.data_folder = Path(data_folder).expanduser().resolve() if data_folder else None
        self.image_dir = Path(image_dir).expanduser().resolve() if image_dir else None
        # A mixture's local sources' folders (each written as its own name in the report).
        self.more_folders = [Path(folder).expanduser().resolve() for folder in more_folders or []]
        self.sources: dict[str, str] = {}  # a mixture's source name -> what it reads (for messages)
        self.held_out: dict[str, dict[str, Any]] = {}  # split or source -> the seeded held-out split's record
        self.mixture: dict[str, dict[str, Any]] = {}  # source name -> weight, rows formatted, mixed, trained

    def inside_data_folders(self, path: str | Path) -> bool:
        """Whether a local file lies in the data folder or `image_dir` (symbolic links followed)."""
        resolved = Path(path).expanduser().resolve()
        return any(
            folder is not None and resolved.is_relative_to(folder)
            for folder in (self.data_folder, self.image_dir, *self.more_folders)
        )

    def count_trained_rows(self, train: Any, evaluation: Any) -> None:
        """After the checks: a mixture's rows per source that train and that evaluate (the `data_source` column)."""
        for name, dataset in (("train_rows", train), ("eval_rows", evaluation)):
            counts = (
                Counter(dataset["data_source"])
                if dataset is not None and "data_source" in dataset.column_names
                else {}
            )
            for source, record in self.mixture.items():
                record[name] = counts.get(source, 0)

    def relative_paths(self, text: str) -> str:
        """`text` with this machine's absolute paths made relative to the data folders, or reduced to a file name."""
        named = [(self.image_dir, "(image_dir)"), (self.data_folder, None)]
        named += [(folder, f"({folder.name})") for folder in self.more_folders]
        for folder, name in named:
            if folder is not None and folder != Path(folder.anchor):
                # "<folder>/x.png" -> "x.png" (or "(image_dir)/x.png"); "<folder>" alone -> its name (or "(image_dir)")
                inside = "" if name is None else name + os.sep
                name = name or folder.name
                pattern = re.escape(str(folder)) + r"(?:(" + re.escape(os.sep) + r")|(?=[\s,;'\")]|$))"
                text = re.sub(pattern, lambda match, inside=inside, name=name: inside if match[1] else name, text)
        return ABSOLUTE_PATH.sub(lambda match: f"{OUTSIDE}/{Path(match[0]).name}", text)

    def outside_data_folder(self, split: str, where: str) -> None:
        """Count one row of `split` that reads an image from outside the data folders."""
        outside = self.splits[split].outside
        outside.count += 1
        if len(outside.examples) < MAX_EXAMPLES:
            outside.examples.append(where)

    def split(self, name: str, source: str, rows: int) -> SplitReport:
        self.splits[name] = SplitReport(source=source, rows=rows)
        return self.splits[name]

    def reject(self, split: str, where: str, reason: str, message: str) -> None:
        """Count one rejected row of `split`; `where` is how the user finds it ("row 17", "line 18")."""
        rejection = self.splits[split].rejections.setdefault(reason, Rejection(reason=reason, message=message))
        rejection.count += 1
        if len(rejection.examples) < MAX_EXAMPLES:
            rejection.examples.append(where)

    def fix(self, split: str, where: str, kind: str) -> None:
        """Count one row of `split` that is kept after a fix of this `kind`."""
        fixed = self.splits[split].fixes.setdefault(kind, Rejection(reason=kind))
        fixed.count += 1
        if len(fixed.examples) < MAX_EXAMPLES:
            fixed.examples.append(where)

    @property
    def rejected(self) -> int:
        return sum(split.rejected for split in self.splits.values())

    @property
    def fixed(self) -> int:
        return sum(fix.count for split in self.splits.values() for fix in split.fixes.values())

    def to_dict(self) -> dict[str, Any]:
        """The report as `data_report.json` holds it: no absolute local path (`relative_paths`)."""
        local = self.relative_paths
        return (
            {
                name: {
                    "source": local(self._source(split.source)),
                    "rows": split.rows,
                    "kept": split.kept,
                    "rejected": split.rejected,
                    "rejected_by_reason": {
                        local(reason): {"count": r.count, "examples": r.examples, "first_message": local(r.message)}
                        for reason, r in sorted(split.rejections.items(), key=lambda item: -item[1].count)
                    },
                    "fixed_by_kind": {
                        local(kind): {"count": f.count, "examples": f.examples}
                        for kind, f in sorted(split.fixes.items(), key=lambda item: -item[1].count)
                    },
                    "rows_with_images_outside_the_data_folder": {
                        "count": split.outside.count,
                        "examples": split.outside.examples,
                    },
                }
                for name, split in self.splits.items()
            }
            | ({"held_out": self.held_out} if self.held_out else {})
            | (
                {
                    "mixture": {
                        name: {key: local(str(value)) if key == "source" else value for key, value in record.items()}
                        for name, record in self.mixture.items()
                    }
                }
                if self.mixture
                else {}
            )
        )

    def _source(self, source: str) -> str:
        """A local dataset's path as an absolute path (which `relative_paths` then shortens); a Hub id as it is."""
        path = Path(source).expanduser()
        if self.data_folder is None or not path.exists():
            return source
        return str(path.resolve())

    def write(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), indent=2), encoding="utf-8")
        return path

    def table(self) -> str:
        """A plain-text table of kept and rejected rows, one line per split and per rejection reason."""
        lines = []
        for name, split in self.splits.items():
            lines.append(f"{name}: {split.kept} of {split.rows} rows kept, {split.rejected} rejected ({split.source})")
            for reason, rejection in sorted(split.rejections.items(), key=lambda item: -item[1].count):
                lines.append(f"  {rejection.count:>7}  {reason}  (e.g. {', '.join(rejection.examples)})")
            for kind, fixed in sorted(split.fixes.items(), key=lambda item: -item[1].count):
                lines.append(f"  {fixed.count:>7}  fixed and kept: {kind}  (e.g. {', '.join(fixed.examples)})")
            if split.outside.count:
                lines.append(
                    f"  {split.outside.count:>7}  read images from outside the data folder (e.g. "
                    f"{', '.join(split.outside.examples)}): kept; data_report.json counts them without their paths"
                )
        return "\n".join(lines)

    def stop_if_too_many_rejected(self, max_bad_fraction: float, when: str = "before loading the model") -> None:
        """Raise a `DataError` naming the reasons and example rows when a split loses more than `max_bad_fraction`;
        `when` says where the run stops."""
        for name, split in self.splits.items():
            if split.rejected and split.bad_fraction > max_bad_fraction:  # as `stops` says
                worst = max(split.rejections.values(), key=lambda rejection: rejection.count)
                raise DataError(
                    f"{split.rejected} of {split.rows} rows of the '{name}' split were rejected "
                    f"({split.bad_fraction:.0%} > max_bad_fraction {max_bad_fraction:.0%}), so the run stops {when}. "
                    f"Most common: {worst.reason} ({worst.count} rows, e.g. "
                    f"{', '.join(worst.examples)}): {worst.message}.\n{self.table()}",
                    source=split.source,
                )

    def stops(self, max_bad_fraction: float) -> bool:
        """Whether `publish` will stop the run (a split loses more than `max_bad_fraction`)."""
        return any(split.rejected and split.bad_fraction > max_bad_fraction for split in self.splits.values())

    def publish(self, path: str | Path | None, max_bad_fraction: float) -> None:
        """Write the report to `path` (`data_report.json`; None: not written), show the table when rows were rejected
        or fixed or read images from outside the data folder, and stop if too many were rejected."""
        if path is not None:
            self.write(path)
        outside = sum(split.outside.count for split in self.splits.values())
        if self.rejected or self.fixed or outside:
            print_main(
                f"Data check: {self.rejected} row(s) rejected and skipped, {self.fixed} fixed and kept (details in "
                f"{DATA_REPORT_FILE})",
                self.table(),
            )
        self.stop_if_too_many_rejected(max_bad_fraction)
