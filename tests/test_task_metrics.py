"""Each task's metric against its published definition, verdict for verdict.

For every metric this file holds an implementation written here from the published definition (the paper's words and
the reference script's behaviour, as described in each function), and compares the package's metric with it on
hundreds of (reference, prediction) pairs: ChartQA pairs built from the real ChartQA test labels in
tests/data/chartqa_test_human_sample.jsonl and the answer shapes models produce.
"""

import re
import string
from collections import Counter

import pytest

from vlm_recipes.tasks import get_task
from vlm_recipes.tasks.chartqa import relaxed_correctness, relaxed_correctness_normalized
from vlm_recipes.tasks.conversation import token_f1
from vlm_recipes.tasks.docvqa import anls
from vlm_recipes.tasks.multiple_choice import read_choice
from vlm_recipes.tasks.vqa import vqa_accuracy


# ---------------------------------------------------------------------------------------------------------------------
# ChartQA relaxed accuracy


def published_relaxed_correctness(target: str, prediction: str) -> bool:
    """ChartQA (Masry et al., 2022, sec. 5.1, after Methani et al., 2020): a numeric answer is correct within 5% of the
    gold answer, a non-numeric one needs an exact match. pix2struct's code makes the words precise: numbers are what
    Python's float() reads, a trailing "%" (all trailing "%" signs) divides by 100, a zero target is never treated as a
    number, the change is relative to the target, and the exact match ignores case."""

    def as_number(text):
        body = text.rstrip("%") if text.endswith("%") else text
        try:
            value = float(body)
        except ValueError:
            return None
        return value / 100.0 if text.endswith("%") else value

    gold, guess = as_number(target), as_number(prediction)
    if gold is not None and gold != 0 and guess is not None:
        return abs(guess - gold) / abs(gold) <= 0.05
    return target.lower() == prediction.lower()


def number_variants(label: str) -> list[str]:
    value = float(label)
    shapes = [
        f"{value * factor!r}" for factor in (1.0, 1.03, 1.049, 1.05, 1.051, 0.95, 0.949, 0.97, 1.2, 0.5, 100, 0.01)
    ]
    shapes += [f"{value:.1f}", f"{value:.2f}", f"{round(value)}", f"{value:g}", f"{value:.0f}."]
    shapes += [f"{label}%", f"{label} %", f"${label}", f"{label}.", f"+{label}", f"-{label}", f"{value / 100!r}"]
    shapes += [f"{value:,.0f}", f"{value:,}", f"{label} million", f"about {label}", f"{label}0", f"{label}e0"]
    return shapes


def text_variants(label: str) -> list[str]:
    words = label.split()
    return [
        label, label.lower(), label.upper(), label.title(), f"{label}.", f" {label} ", f"{label}!",
        "  ".join(words), f"The answer is {label}", label.replace(" ", ""), words[0], f"{label}s",
        "Yes" if label != "Yes" else "No", "yes.", "No.", "none", "",
    ]  # fmt: skip


# Labels the sample lacks but the ChartQA test split has: a difference of 0, a percentage, a large count.
DERIVED_LABELS = ["0", "0.0", "62%", "1,000"]


@pytest.fixture(scope="module")
def chartqa_pairs(chartqa_human_rows):
    labels = [row["label"] for row in chartqa_human_rows] + DERIVED_LABELS
    pairs = []
    for label in labels:
        numeric = published_relaxed_correctness(label, label) and _is_float(label.rstrip("%"))
        variants = number_variants(label.rstrip("%").replace(",", "")) if numeric else text_variants(label)
        pairs += [(label, prediction) for prediction in dict.fromkeys(variants + text_variants(label))]
    pairs += [("0", "0.0"), ("0", "0"), ("0", "0.00"), ("0", "zero"), ("14", "14%"), ("14", "$14"), ("0.57", "0.57.")]
    pairs += [("977633", "977,633"), ("No", "No."), ("green line", "green  line"), ("62", "0.62"), ("62%", "0.62")]
    return pairs


def _is_float(text):
    try:
        float(text)
        return True
    except ValueError:
        return False


def test_relaxed_accuracy_is_the_reference_verdict_for_verdict(chartqa_pairs):
    assert len(chartqa_pairs) >= 600
    differing = [
        (label, prediction)
        for label, prediction in chartqa_pairs
        if relaxed_correctness(label, prediction) != published_relaxed_correctness(label, prediction)
    ]
    assert differing == []
    # The pairs exercise both verdicts in both kinds of label.
    verdicts = Counter((_is_float(label), published_relaxed_correctness(label, p)) for label, p in chartqa_pairs)
    assert min(verdicts.values()) >= 40, verdicts


def test_the_task_scores_the_best_label_with_the_reference(chartqa_pairs):
    task = get_task("chartqa")
    for label, prediction in chartqa_pairs:
        row = {"answers": ["not this one", label], "messages": []}
        values = task.score(prediction, row).values
        # Generation strips answers; the task compares them stripped, as VLMEvalKit does.
        assert values["relaxed_accuracy"] == float(published_relaxed_correctness(label, prediction.strip()))
        assert values["exact_match"] == float(prediction.strip() == label)


@pytest.mark.parametrize(
    "label, prediction, reference, normalized",
    [
        ("14", "14%", False, True),  # the reference reads 14% as 0.14
        ("14", "$14", False, True),
        ("977633", "977,633", False, True),
        ("0.57", "0.57.", False, True),
        ("No", "No.", False, True),
        ("green line", "green  line", False, True),
        ("0", "0.0", False, True),  # a zero label is compared as text by the reference
        ("0", "0", True, True),
        ("62", "0.62", False, False),
        ("62%", "0.62", True, True),
        ("21.6", "20.52", False, True),  # exactly 5% off, a hair above 5% in floating point
        ("100", "105", True, True),
        ("100", "105.01", False, False),
        ("2014", "2010", True, True),  # a year is a number to both
        ("Yes", "yes", True, True),
        ("Yes", "Yes, it is", False, False),
    ],
)
def test_the_classes_that_separate_the_two_metrics(label, prediction, reference, normalized):
    assert relaxed_correctness(label, prediction) is reference
    assert relaxed_correctness_normalized(label, prediction) is normalized


def test_the_normalized_variant_only_adds_acceptances(chartqa_pairs):
    reference = [relaxed_correctness(label, prediction) for label, prediction in chartqa_pairs]
    normalized = [relaxed_correctness_normalized(label, prediction) for label, prediction in chartqa_pairs]
    assert all(n for r, n in zip(reference, normalized) if r)  # never rejects what the reference accepts
    assert sum(normalized) - sum(reference) >= 30  # and accepts answers it does not: reported beside it, not for it


# ---------------------------------------------------------------------------------------------------------------------
# ANLS


def published_anls(prediction: str, answers: list[str]) -> float:
    """Biten et al. (2019), eq. 1, as the official DocVQA/InfographicVQA script applies it: strip, lower-case and join
    the words of both texts with single spaces; Levenshtein distance of those over the longer ORIGINAL length;
    1 - the smallest distance over the answers, set to 0 when below 0.5."""

    def edit_distance(a, b):
        table = [[i + j if i * j == 0 else 0 for j in range(len(b) + 1)] for i in range(len(a) + 1)]
        for i in range(1, len(a) + 1):
            for j in range(1, len(b) + 1):
                table[i][j] = min(
                    table[i - 1][j] + 1, table[i][j - 1] + 1, table[i - 1][j - 1] + (a[i - 1] != b[j - 1])
                )
        return table[-1][-1]

    distances = []
    for answer in answers:
        clean = lambda text: " ".join(text.strip().lower().split())  # noqa: E731
        longest = max(len(answer.upper()), len(prediction.upper()))
        distances.append(edit_distance(clean(answer), clean(prediction)) / longest if longest else 0.0)
    score = 1 - min(distances)
    return 0 if score < 0.5 else score


DOC_ANSWERS = [
    ["48213"], ["$1,284.50", "1,284.50"], ["02/28/1993", "February 28, 1993"], ["Kenya Trading Co."],
    ["ITC Limited", "itc limited"], ["0.5%"], ["Dr. Robert J. Smith", "Robert J. Smith"], ["10 am", "10:00 am"],
]  # fmt: skip


def doc_predictions(answers):
    first = answers[0]
    return [
        first, first.lower(), first.upper(), f" {first} ", first[:-1], first + "x", first[1:], first.replace(" ", "  "),
        f"The answer is {first}", first[: len(first) // 2], first[::-1], "unanswerable", "", first.replace(".", ""),
        "12345", "1284.5", "Feb 28, 1993", "Kenya Trading", "Robert Smith", "10 a.m.",
    ]  # fmt: skip


def test_anls_is_the_official_script_value_for_value():
    pairs = [(prediction, answers) for answers in DOC_ANSWERS for prediction in doc_predictions(answers)]
    assert len(pairs) >= 150
    for prediction, answers in pairs:
        assert anls(prediction, answers) == published_anls(prediction, answers), (prediction, answers)
    values = [anls(prediction, answers) for prediction, answers in pairs]
    assert any(v == 0 for v in values) and any(v == 1 for v in values) and any(0.5 <= v < 1 for v in values)


def test_anls_threshold_and_best_answer():
    assert anls("abcd", ["abce"]) == 0.75
    assert anls("ab", ["abcd"]) == 0.5  # similarity exactly 0.5 is kept
    assert anls("a", ["abc"]) == 0  # 1/3 is below the threshold
    assert anls("1,284.50", ["$1,284.50", "1,284.50"]) == 1.0  # the best over the answers
    assert anls("anything", []) == 0.0
    assert get_task("docvqa").score(
        " Kenya Trading Co. ", {"answers": ["kenya trading co."], "messages": []}
    ).values == {"anls": 1.0}


# ---------------------------------------------------------------------------------------------------------------------
# VQA accuracy


def published_vqa_normalize(answer: str) -> str:
    """The EvalAI / TextVQA answer processing, step by step: lower case; drop "," and "?"; "'s" -> " 's"; newlines and
    tabs to spaces; each punctuation mark removed where the text has it next to a space, else replaced by a space
    (the digit-comma-digit clause never fires once commas are gone); periods not followed by a digit removed (at most
    32); words: number words to digits, articles dropped, contractions given their apostrophe."""
    text = answer.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = text.replace("\n", " ").replace("\t", " ").strip()
    original = text
    for mark in ';/[]"{}()=+\\_-><@`,?!':
        text = text.replace(mark, "" if f"{mark} " in original or f" {mark}" in original else " ")
    text = re.sub(r"\.(?!\d)", "", text, count=32)
    numbers = "none zero one two three four five six seven eight nine ten".split()
    digits = ["0", "0"] + [str(n) for n in range(1, 11)]
    contractions = {"dont": "don't", "cant": "can't", "isnt": "isn't", "wont": "won't", "thats": "that's"}
    words = [dict(zip(numbers, digits)).get(word, word) for word in text.split()]
    return " ".join(contractions.get(word, word) for word in words if word not in ("a", "an", "the"))


def published_vqa_accuracy(prediction: str, humans: list[str]) -> float:
    """Antol et al. (2015): acc = min(#humans that said the answer / 3, 1), averaged over all 10-choose-9 subsets of
    the ten human answers."""
    predicted = published_vqa_normalize(prediction)
    normalized = [published_vqa_normalize(human) for human in humans]
    subsets = [normalized[:i] + normalized[i + 1 :] for i in range(len(normalized))]
    return sum(min(subset.count(predicted) / 3, 1) for subset in subsets) / len(subsets)


HUMAN_ANSWERS = [
    ["stop"] * 6 + ["stop sign"] * 2 + ["STOP", "unanswerable"],
    ["2"] * 4 + ["two"] * 3 + ["2 dogs", "3", "two."],
    ["yes"] * 9 + ["no"],
    ["bus"] * 3 + ["van"] * 4 + ["truck"] * 3,
    ["coca-cola", "coca cola", "coca-cola", "cocacola", "coke", "coca-cola", "coca cola", "coca-cola", "coke", "pepsi"],
    ["dont walk"] * 3 + ["don't walk"] * 3 + ["do not walk"] * 4,
    ["3.5", "3.5", "3.5%", "3.5", "3 .5", "35", "3.5", "three and a half", "3.5", "3.50"],
    ["the red one", "red", "red", "a red car", "red", "red.", "Red", "red", "crimson", "red"],
    ["12:30", "12:30 pm", "12:30", "12:30", "half past twelve", "12:30", "1230", "12:30", "12.30", "12:30"],
    ["Mcdonald's", "mcdonalds", "mcdonald's", "McDonald's", "mcdonald's", "mc donalds", "mcdonald's", "mcd", "mcdonald's", "mcdonald s"],
]  # fmt: skip


def vqa_predictions(humans):
    first = humans[0]
    return list(
        dict.fromkeys(
            humans + [first.upper(), f"The {first}", f"{first}.", f"A {first}!", f"({first})", f"{first}?", "",
                      "two", "Two dogs", "i dont know", "the answer is " + first, first.replace(" ", "-"),
                      "3,5", "3. 5", "red/white", "$12", "won't", "wont", "thats it", "1,000", "e.g. red"]
        )
    )  # fmt: skip


def test_vqa_accuracy_is_the_published_definition_value_for_value():
    pairs = [(prediction, humans) for humans in HUMAN_ANSWERS for prediction in vqa_predictions(humans)]
    assert len(pairs) >= 200
    for prediction, humans in pairs:
        assert vqa_accuracy(prediction, humans) == pytest.approx(published_vqa_accuracy(prediction, humans), abs=1e-12)
    values = {round(vqa_accuracy(prediction, humans), 4) for prediction, humans in pairs}
    assert {0.0, 0.3, 0.6, 0.9, 1.0} <= values  # every level of agreement occurs


def test_vqa_accuracy_levels_and_normalisation():
    humans = ["two"] * 3 + ["2"] * 1 + ["three"] * 6
    assert vqa_accuracy("2", humans) == 1.0  # "two" and "2" are the same answer: 4 humans
    assert vqa_accuracy("3", ["3"] * 3 + ["4"] * 7) == pytest.approx(0.9)
    assert vqa_accuracy("3", ["3"] * 2 + ["4"] * 8) == pytest.approx(0.6)
    assert vqa_accuracy("The stop sign.", ["stop sign"] * 10) == 1.0
    assert vqa_accuracy("dont", ["don't"] * 10) == 1.0
    assert vqa_accuracy("anything", []) == 0.0


# ---------------------------------------------------------------------------------------------------------------------
# Multiple choice


def published_mmmu_choice(response: str, options: list[str]) -> str | None:
    """MMMU's parse_multi_choice_response without its random fallback (None where it would guess)."""
    letters = [chr(65 + i) for i in range(len(options))]
    for char in ",.!?;:'":
        response = response.strip(char)
    response = f" {response} "
    marks = {letter: f"({letter})" for letter in letters}
    found = [letter for letter in letters if marks[letter] in response]
    if not found:
        marks = {letter: f" {letter} " for letter in letters}
        found = [letter for letter in letters if marks[letter] in response]
    where = lambda letter: response.rfind(marks[letter])  # noqa: E731
    if not found and len(response.split()) > 5:
        found = [letter for letter, option in zip(letters, options) if option.lower() in response.lower()]
        where = lambda letter: response.lower().rfind(options[letters.index(letter)].lower())  # noqa: E731
    if not found:
        return None
    positions = [where(letter) for letter in found]
    return found[positions.index(max(positions))]


OPTION_SETS = [
    ["red", "blue", "green", "yellow"],
    ["Chloroplast", "Mitochondrion", "Nucleus"],
    ["The water cycle", "Photosynthesis"],
    ["1.5 m/s", "3 m/s", "6 m/s", "12 m/s", "24 m/s"],
    ["A", "B", "C", "D"],  # options that are letters themselves
]


def choice_answers(options):
    first, second = options[0], options[1]
    return [
        "A", "B", "C.", "(B)", "(C) is right", "B.", "b", "Answer: B", "The answer is C.", "The answer is (A).",
        "A or B", "(A) and (B)", "I think it is B, not A", "**B**", "B) " + second, first, second.lower(),
        f"The correct option is {second} because it fits", f"It must be {first} and not {second} at all here",
        f"I would say {first.upper()}", "None of the above", "", "I cannot tell from the image.", "E", "Option D",
        "A.B.", "'C'", "?A", "B:", "C;", f"{second}.", f"  {first}  ", "a", "AB", "The answer: A B C",
    ]  # fmt: skip


def test_multiple_choice_reads_options_as_mmmu_does():
    pairs = [(answer, options) for options in OPTION_SETS for answer in choice_answers(options)]
    assert len(pairs) >= 150
    unparsed = 0
    for answer, options in pairs:
        expected = published_mmmu_choice(answer, options)
        got = read_choice(answer, options)
        if expected is not None:
            assert got == expected, (answer, options)
        else:
            unparsed += got is None
            # Only an answer that is exactly one option's text is read where MMMU would guess.
            assert got is None or got == chr(65 + [o.lower() for o in options].index(answer.strip(" ,.!?;:'").lower()))
    assert unparsed >= 20


def test_unparsed_answers_count_wrong_and_are_counted():
    task = get_task("multiple_choice")
    row = {"options": ["red", "blue", "green"], "answers": ["B"], "messages": []}
    scores = [task.score(answer, row) for answer in ["B", "(B) blue", "blue", "A", "I don't know", ""]]
    assert [s.values["accuracy"] for s in scores] == [1, 1, 1, 0, 0, 0]
    assert [s.details["picked"] for s in scores] == ["B", "B", "B", "A", None, None]
    totals = task.aggregate(scores)
    assert totals["accuracy"] == pytest.approx(3 / 6) and totals["unparsed"] == pytest.approx(2 / 6)
    assert totals["rows"] == 6


# ---------------------------------------------------------------------------------------------------------------------
# Token F1 and the conversation task


def published_squad(prediction: str, truth: str) -> tuple[bool, float]:
    """SQuAD v1.1 evaluate-v1.1.py: normalize_answer (lower, drop punctuation, drop articles, fix whitespace);
    exact match of the normalised texts; F1 of their words (bag overlap), 0 without overlap."""

    def normalize(text):
        text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
        return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())

    p, t = normalize(prediction).split(), normalize(truth).split()
    same = sum((Counter(p) & Counter(t)).values())
    f1 = 0.0 if same == 0 else 2 * (same / len(p)) * (same / len(t)) / (same / len(p) + same / len(t))
    return normalize(prediction) == normalize(truth), f1


REFERENCES = [
    "A bar chart of rice exports, rising from 1990 to 2010.",
    "The cat is sitting on the red sofa.",
    "Three people, two of them holding umbrellas.",
    "It shows the invoice total: $1,284.50.",
]


def test_token_f1_and_normalized_match_are_squad_v1_1():
    task = get_task("conversation")
    pairs = []
    for reference in REFERENCES:
        words = reference.split()
        pairs += [(reference, reference), (reference.upper(), reference), (" ".join(words[:3]), reference)]
        pairs += [(" ".join(reversed(words)), reference), ("the the the", reference), ("", reference)]
        pairs += [(" ".join(words[1:] + words[1:]), reference), (reference.replace(",", ""), reference)]
        pairs += [(other, reference) for other in REFERENCES]
    assert len(pairs) >= 40
    for prediction, reference in pairs:
        exact, f1 = published_squad(prediction, reference)
        values = task.score(prediction, {"messages": [], "answers": [reference]}).values
        assert token_f1(prediction, reference) == pytest.approx(f1, abs=1e-12)
        assert values["token_f1"] == pytest.approx(f1, abs=1e-12)
        assert values["normalized_match"] == float(exact)
        assert values["exact_match"] == float(prediction.strip() == reference)
