"""Relaxed accuracy and exact match on the real ChartQA labels: the 5% boundary, percentages, separators, yes/no, text."""

import pytest

from vlm_recipes.evaluation.metrics import (
    aggregate,
    exact_match,
    parse_number,
    relaxed_match,
    score_predictions,
    score_row,
)


def numeric(rows):
    return [row["label"] for row in rows if parse_number(row["label"]) is not None]


def textual(rows):
    return [row["label"] for row in rows if parse_number(row["label"]) is None]


def test_the_sample_has_both_kinds_of_answers(chartqa_human_rows):
    assert len(numeric(chartqa_human_rows)) >= 12 and len(textual(chartqa_human_rows)) >= 10
    assert {"Yes", "No"} <= set(textual(chartqa_human_rows))


def test_every_label_matches_itself(chartqa_human_rows):
    for row in chartqa_human_rows:
        assert relaxed_match(row["label"], row["label"]) and exact_match(row["label"], row["label"])


@pytest.mark.parametrize(
    "factor, expected", [(1.0, True), (1.049, True), (0.951, True), (1.051, False), (0.949, False)]
)
def test_numbers_around_the_five_percent_boundary(chartqa_human_rows, factor, expected):
    for label in numeric(chartqa_human_rows):
        prediction = repr(float(label) * factor)
        assert relaxed_match(prediction, label) is expected, (prediction, label)
        assert exact_match(prediction, label) is (factor == 1.0)


def test_exactly_five_percent_off_counts(chartqa_human_rows):
    # The definition is "within 5%": 105 for 100 and 22.68 for 21.6 are correct despite floating-point rounding.
    for label in numeric(chartqa_human_rows):
        value = float(label)
        assert relaxed_match(repr(value * 1.05), label) and relaxed_match(repr(value * 0.95), label), label
    assert relaxed_match("105", "100") and relaxed_match("95", "100")
    assert not relaxed_match("105.01", "100") and not relaxed_match("94.99", "100")
    assert relaxed_match("22.68", "21.6") and not relaxed_match("22.69", "21.6")


def test_real_numeric_labels_near_and_far():
    assert relaxed_match("24", "23")  # 4.3% off
    assert not relaxed_match("25", "23")  # 8.7% off
    assert not exact_match("24", "23")
    assert relaxed_match("0.55", "0.57") and not relaxed_match("0.54", "0.57")  # 3.5% and 5.3% off
    assert relaxed_match("1.22", "1.216666667") and relaxed_match("0.33", "0.33333333")
    assert not relaxed_match("0.3", "0.33333333")
    assert relaxed_match("2010", "2014")  # as in the reference metric: a year is a number


def test_integers_and_decimals():
    assert exact_match("14.0", "14") and exact_match("14", "14.00") and exact_match("3.", "3")
    assert exact_match("+14", "14") and exact_match("-0.5", "-.5")
    assert not exact_match("14.1", "14")


def test_thousands_separators_and_currency():
    assert exact_match("977,633", "977633") and exact_match("977633", "977,633")
    assert exact_match("1,000,000", "1000000") and exact_match("$1,234.5", "1234.5")
    assert relaxed_match("977 thousand", "977633") is False  # words are not numbers
    assert parse_number("1,2") is None  # not a thousands separator: compared as text


def test_percentages():
    assert exact_match("62%", "62") and exact_match("62 %", "62") and exact_match("62", "62%")
    assert relaxed_match("3%", "0.03")  # a percentage also matches its fraction, as in the reference metric
    assert relaxed_match("61%", "62") and not relaxed_match("58%", "62")
    assert not exact_match("62%", "6.2")


def test_zero_needs_zero():
    assert exact_match("0", "0.0") and relaxed_match("0.0", "0")
    assert not relaxed_match("0.01", "0")


def test_yes_no_and_text_answers():
    assert relaxed_match("yes", "Yes") and relaxed_match("NO", "No") and relaxed_match("Yes.", "Yes")
    assert not relaxed_match("No", "Yes") and not relaxed_match("Yes, it is", "Yes")
    assert relaxed_match("Green Line", "green line") and relaxed_match("  green   line ", "green line")
    assert not relaxed_match("green", "green line")
    assert relaxed_match("u.s.", "U.S.") and relaxed_match("U.S", "U.S.")
    assert relaxed_match("democrat (scores 60 to 100)", "Democrat (scores 60 to 100)")
    assert not relaxed_match("Democrat", "Democrat (scores 60 to 100)")
    assert relaxed_match("GRAY", "Gray") and relaxed_match("Gray", "gray")


def test_best_over_several_labels():
    assert score_row("three", ["3", "three"]) == {"relaxed_accuracy": True, "exact_match": True}
    assert score_row("3.1", ["3", "three"]) == {"relaxed_accuracy": True, "exact_match": False}  # 3.3% off
    assert score_row("3.2", ["3", "three"]) == {"relaxed_accuracy": False, "exact_match": False}  # 6.7% off
    assert score_row("3.2", ["3", "3.1"]) == {"relaxed_accuracy": True, "exact_match": False}  # the second label
    assert score_row("Italy", "Italy") == {"relaxed_accuracy": True, "exact_match": True}  # one label as a string
    assert score_row("anything", []) == {"relaxed_accuracy": False, "exact_match": False}


def test_scores_over_rows(chartqa_human_rows):
    labels = [[row["label"]] for row in chartqa_human_rows]
    perfect = score_predictions([row["label"] for row in chartqa_human_rows], labels)
    assert perfect == {"relaxed_accuracy": 1.0, "exact_match": 1.0, "rows": len(chartqa_human_rows)}
    # Numbers 3% off: relaxed-correct, not exact; text answers in upper case: both correct.
    shifted = [
        repr(float(row["label"]) * 1.03) if parse_number(row["label"]) else row["label"].upper()
        for row in chartqa_human_rows
    ]
    scores = score_predictions(shifted, labels)
    text_share = len(textual(chartqa_human_rows)) / len(chartqa_human_rows)
    assert scores["relaxed_accuracy"] == 1.0 and scores["exact_match"] == pytest.approx(text_share)
    assert aggregate([]) == {"relaxed_accuracy": 0.0, "exact_match": 0.0, "rows": 0}
    with pytest.raises(ValueError, match="2 predictions for 1 rows"):
        score_predictions(["a", "b"], [["a"]])
