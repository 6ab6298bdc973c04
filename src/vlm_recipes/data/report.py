"""The data report: rows rejected before training, counted by reason per split, with example rows.

Rejected rows are skipped, never trained on; the report goes on screen and into `data_report.json` in the output
folder. When more than `max_bad_fraction` of a split is rejected the run stops before loading the model.
"""

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlm_recipes.console import print_main
from vlm_recipes.errors import DataError
from vlm_recipes.run_folder import DATA_REPORT_FILE


MAX_EXAMPLES = 5


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
    def __init__(self) -> None:
        self.splits: dict[str, SplitReport] = {}

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
        return {
            name: {
                "source": split.source,
                "rows": split.rows,
                "kept": split.kept,
                "rejected": split.rejected,
                "rejected_by_reason": {
                    reason: {"count": r.count, "examples": r.examples, "first_message": r.message}
                    for reason, r in sorted(split.rejections.items(), key=lambda item: -item[1].count)
                },
                "fixed_by_kind": {
                    kind: {"count": f.count, "examples": f.examples}
                    for kind, f in sorted(split.fixes.items(), key=lambda item: -item[1].count)
                },
            }
            for name, split in self.splits.items()
        }

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
        return "\n".join(lines)

    def stop_if_too_many_rejected(self, max_bad_fraction: float) -> None:
        """Raise a `DataError` naming the reasons and example rows when a split loses more than `max_bad_fraction`."""
        for name, split in self.splits.items():
            if split.rejected and split.bad_fraction > max_bad_fraction:
                worst = max(split.rejections.values(), key=lambda rejection: rejection.count)
                raise DataError(
                    f"{split.rejected} of {split.rows} rows of the '{name}' split were rejected "
                    f"({split.bad_fraction:.0%} > max_bad_fraction {max_bad_fraction:.0%}), so the run stops before "
                    f"loading the model. Most common: {worst.reason} ({worst.count} rows, e.g. "
                    f"{', '.join(worst.examples)}): {worst.message}.\n{self.table()}",
                    source=split.source,
                )

    def publish(self, path: str | Path | None, max_bad_fraction: float) -> None:
        """Write the report to `path` (`data_report.json`; None: not written), show the table when rows were rejected
        or fixed, and stop if too many were rejected."""
        if path is not None:
            self.write(path)
        if self.rejected or self.fixed:
            print_main(
                f"Data check: {self.rejected} row(s) rejected and skipped, {self.fixed} fixed and kept (details in "
                f"{DATA_REPORT_FILE})",
                self.table(),
            )
        self.stop_if_too_many_rejected(max_bad_fraction)
