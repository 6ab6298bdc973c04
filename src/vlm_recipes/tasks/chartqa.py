"""ChartQA: questions about charts, scored with relaxed accuracy.

`relaxed_accuracy` is the reference definition, verdict for verdict: pix2struct's `relaxed_correctness`
(google-research/pix2struct, pix2struct/metrics.py), which lmms-eval (lmms_eval/tasks/chartqa/utils.py) and VLMEvalKit
(vlmeval/dataset/utils/vqa_eval.py) copy. For one label and one prediction:
- both are read as numbers with Python's `float` (surrounding whitespace allowed, no thousands separators, no currency
  sign); a text ending in `%` is read as its number divided by 100 (`14%` is 0.14, so it does not match a label of 14);
- when the prediction is a number and the label a non-zero number, the prediction counts within 5% of the label,
  relative to the label (exactly 5% counts, as floating point computes it);
- otherwise (a text, or a label of 0) the two strings must be equal ignoring case, nothing else normalised: `0.0` does
  not match a label of `0`, `Yes.` does not match `Yes`, doubled inner spaces do not match single ones.
A row counts when any of its labels accepts the prediction (VLMEvalKit takes the best over labels; ChartQA rows have one).
The prediction is compared without surrounding whitespace (generation strips it; VLMEvalKit strips it too).

`relaxed_accuracy_normalized` is a lenient variant, reported beside the reference and never instead of it: it accepts
what the reference accepts, plus answers that write the same value another way: thousands separators (`977,633`), a
currency sign (`$14`), a trailing period (`0.57.`, `No.`), case and repeated spaces, a percentage for its number
(`14%` for 14), any number for a label of 0 that equals 0 (`0.0`), and an answer exactly 5% off that floating point
puts a hair above 5%.

`exact_match` is pix2struct's: the prediction equals a label, character for character.
"""

import re
from typing import Any

from vlm_recipes.tasks.base import (
    RECIPE_PROMPT,
    Metric,
    PromptPreset,
    RowScore,
    Task,
    reference_answers,
    short_answer_prompt,
)
from vlm_recipes.tasks.text import collapse_whitespace


MAX_RELATIVE_CHANGE = 0.05


# ---------------------------------------------------------------------------------------------------------------------
# The reference


def _reference_float(text: str) -> float | None:
    """A number as pix2struct reads one: `float(text)`, or for a text ending in `%`, float of it without the trailing
    percent signs, divided by 100; None when `float` refuses it."""
    try:
        if text.endswith("%"):
            return float(text.rstrip("%")) / 100.0
        return float(text)
    except ValueError:
        return None


def relaxed_correctness(label: str, prediction: str, max_relative_change: float = MAX_RELATIVE_CHANGE) -> bool:
    """pix2struct's relaxed correctness of `prediction` against one `label`."""
    predicted, expected = _reference_float(prediction), _reference_float(label)
    if predicted is not None and expected:  # a label of 0 cannot give a relative change: compared as text
        return abs(predicted - expected) / abs(expected) <= max_relative_change
    return prediction.lower() == label.lower()


# ---------------------------------------------------------------------------------------------------------------------
# The lenient variant

# Floating-point slack, so that an answer exactly 5% off (22.68 for 21.6) counts as the definition's words say.
_SLACK = 1e-9
_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")
_GROUPED = re.compile(r"[+-]?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_CURRENCY = "$€£¥"


def normalize_answer_text(text: str) -> str:
    """Lower case, single spaces, no surrounding whitespace or trailing period."""
    text = collapse_whitespace(str(text)).lower()
    return text[:-1].rstrip() if text.endswith(".") else text


def parse_chart_number(text: str) -> tuple[float, ...] | None:
    """The values an answer may stand for when read as a chart writes numbers (a percentage: its number and its
    fraction), or None for text."""
    text = normalize_answer_text(text)
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


def _numbers_match(prediction: float, label: float) -> bool:
    if label == 0:
        return prediction == 0
    return abs(prediction - label) / abs(label) <= MAX_RELATIVE_CHANGE + _SLACK


def relaxed_correctness_normalized(label: str, prediction: str) -> bool:
    """The reference's verdict, or the same comparison on numbers and text as charts and people write them."""
    if relaxed_correctness(label, prediction):
        return True
    predicted, expected = parse_chart_number(prediction), parse_chart_number(label)
    if predicted is not None and expected is not None:
        return any(_numbers_match(p, e) for p in predicted for e in expected)
    return normalize_answer_text(prediction) == normalize_answer_text(label)


# ---------------------------------------------------------------------------------------------------------------------
# The task


def score(prediction: str, row: dict[str, Any]) -> RowScore:
    prediction = prediction.strip()
    labels = reference_answers(row)
    return RowScore(
        {
            "relaxed_accuracy": float(any(relaxed_correctness(label, prediction) for label in labels)),
            "relaxed_accuracy_normalized": float(
                any(relaxed_correctness_normalized(label, prediction) for label in labels)
            ),
            "exact_match": float(any(prediction == label for label in labels)),
        }
    )


# lmms-eval, lmms_eval/tasks/chartqa/chartqa.yaml: `model_specific_prompt_kwargs.default` has pre_prompt "" and the
# short-answer post_prompt (utils.chartqa_doc_to_text joins them around the question). VLMEvalKit,
# vlmeval/dataset/image_vqa.py: `ImageVQADataset.build_prompt` (ChartQA_TEST) appends the same line. The two texts are
# identical today; each is kept under its harness's name so that a result says which one it used.


CHARTQA = Task(
    name="chartqa",
    title="ChartQA",
    formatter="chartqa",
    metrics=(
        Metric(
            "relaxed_accuracy",
            "pix2struct's relaxed correctness: numbers within 5% of the label, any other answer equal to it ignoring "
            "case; the best over a row's labels",
            "published ChartQA figures (papers, lmms-eval's relaxed_overall, VLMEvalKit's ChartQA_TEST) when the "
            "prompt preset is theirs and the split is the test split (human and augmented questions together)",
        ),
        Metric(
            "relaxed_accuracy_normalized",
            "relaxed accuracy that also accepts separators, currency signs, trailing periods, case and spacing, and a "
            "percentage for its number",
            "nothing published: it shows how much of the gap to relaxed_accuracy is answer formatting",
        ),
        Metric(
            "exact_match",
            "the answer equals a label character for character (pix2struct's exact_match)",
            "pix2struct's exact_match on ChartQA",
        ),
    ),
    max_new_tokens=16,  # lmms-eval's chartqa.yaml generation_kwargs
    presets=(
        RECIPE_PROMPT,
        PromptPreset(
            "lmms_eval",
            source="lmms-eval lmms_eval/tasks/chartqa/chartqa.yaml (default post_prompt)",
            text=short_answer_prompt,
        ),
        PromptPreset(
            "vlmevalkit",
            source="VLMEvalKit vlmeval/dataset/image_vqa.py ImageVQADataset.build_prompt (ChartQA_TEST)",
            text=short_answer_prompt,
        ),
    ),
    card_text=(
        "ChartQA relaxed accuracy as pix2struct defines it (the metric of published ChartQA figures, lmms-eval and "
        "VLMEvalKit): a numeric answer counts within 5% of the label, any other answer must equal it ignoring case. "
        "`relaxed_accuracy_normalized` scores the same predictions leniently (separators, currency signs, trailing "
        "periods, percentages) and is not comparable with published figures; `exact_match` is character for character."
    ),
    hub_task_type="visual-question-answering",
    score=score,
)
