"""Answer metrics, as pure functions: ChartQA's relaxed accuracy and exact match.

Relaxed accuracy is ChartQA's metric (Masry et al., 2022; the reference code is `relaxed_correctness` in
google-research/pix2struct): a numeric answer is correct when it is within 5% of the label, relative to the label;
any other answer must equal the label, ignoring case. A row with several labels counts when any label matches.

Where the reference code is silent or brittle, these functions read numbers the way chart labels write them:
- thousands separators (`977,633`), a leading currency sign (`$12`), a trailing period (`14.`);
- a percentage matches both its number and its fraction: `62%` matches `62` and `0.62` (the reference reads `62%` only
  as 0.62, so a model answering "62%" to "What percent ...?" labelled `62` would be marked wrong);
- a label of 0 needs an answer of exactly 0 (a relative change from 0 is undefined).
Exact match is the same comparison with no tolerance: `14.0` equals `14`, `Yes.` equals `yes`.
Like the reference, a year is a number: 2010 for 2014 is within 5%.
"""

import re
from collections.abc import Callable, Sequence


RELAXED_TOLERANCE = 0.05
# Floating-point slack, so that an answer exactly 5% off (105 for 100, 22.68 for 21.6) counts as the definition says.
_SLACK = 1e-9

_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")
_GROUPED = re.compile(r"[+-]?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_CURRENCY = "$€£¥"


def normalize_text(text: str) -> str:
    """Lower case, single spaces, no surrounding whitespace or trailing period."""
    text = " ".join(str(text).split()).lower()
    return text[:-1].rstrip() if text.endswith(".") else text


def parse_number(text: str) -> tuple[float, ...] | None:
    """The values a numeric answer may stand for (a percentage: its number and its fraction), or None for text."""
    text = normalize_text(text)
    percent = text.endswith("%")
    text = text.removesuffix("%").rstrip()
    sign = ""
    if text[:1] in ("+", "-"):
        sign, text = text[0], text[1:]
    text = text.lstrip(_CURRENCY).lstrip()
    if _GROUPED.fullmatch(text):
        text = text.replace(",", "")
    if not _NUMBER.fullmatch(text):
        return None
    value = float(sign + text)
    return (value, value / 100) if percent else (value,)


def _numbers_match(prediction: float, label: float, tolerance: float) -> bool:
    if label == 0:
        return prediction == 0
    return abs(prediction - label) / abs(label) <= tolerance + _SLACK


def relaxed_match(prediction: str, label: str, tolerance: float = RELAXED_TOLERANCE) -> bool:
    """ChartQA's relaxed correctness of one prediction against one label."""
    predicted, expected = parse_number(prediction), parse_number(label)
    if predicted is not None and expected is not None:
        return any(_numbers_match(p, e, tolerance) for p in predicted for e in expected)
    return normalize_text(prediction) == normalize_text(label)


def exact_match(prediction: str, label: str) -> bool:
    """The same comparison without tolerance: equal text (ignoring case), or equal numbers."""
    return relaxed_match(prediction, label, tolerance=0.0)


MATCHERS: dict[str, Callable[[str, str], bool]] = {"relaxed_accuracy": relaxed_match, "exact_match": exact_match}


def best_over_labels(match: Callable[[str, str], bool], prediction: str, labels: Sequence[str]) -> bool:
    """A row counts when its prediction matches any of its labels."""
    if isinstance(labels, str):
        labels = [labels]
    return any(match(prediction, label) for label in labels)


def score_row(prediction: str, labels: Sequence[str]) -> dict[str, bool]:
    """{metric name: whether this row is correct under it}."""
    return {name: best_over_labels(match, prediction, labels) for name, match in MATCHERS.items()}


def aggregate(row_scores: Sequence[dict[str, bool]]) -> dict[str, float]:
    """Each metric's mean over rows (0 for no rows), plus the row count."""
    count = len(row_scores)
    means = {name: (sum(row[name] for row in row_scores) / count if count else 0.0) for name in MATCHERS}
    return {**means, "rows": count}


def score_predictions(predictions: Sequence[str], labels: Sequence[Sequence[str]]) -> dict[str, float]:
    if len(predictions) != len(labels):
        raise ValueError(f"{len(predictions)} predictions for {len(labels)} rows of labels")
    return aggregate([score_row(prediction, row_labels) for prediction, row_labels in zip(predictions, labels)])
