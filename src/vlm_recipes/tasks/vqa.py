"""TextVQA and VQAv2: short answers scored against ten human answers with VQA accuracy.

VQA accuracy (Antol et al., 2015) as the TextVQA evaluator and the EvalAI VQA challenge compute it (MMF's
`EvalAIAnswerProcessor` and `TextVQAAccuracyEvaluator`; lmms-eval's textvqa and vqav2 tasks use the same processor,
lmms_eval/tasks/_task_utils/vqa_eval_metric.py):
- the prediction and every human answer are normalised: lower case; commas and question marks dropped and `'s`
  split off; punctuation removed (or replaced by a space where it sits between letters); periods not followed by a digit
  removed; number words zero to ten written as digits, `none` as 0; the articles a, an, the dropped; contractions
  written with their apostrophe (`dont` -> `don't`);
- for each of the N human answers, the prediction scores min(#other humans who gave it / 3, 1), counting the other
  N - 1 answers (the leave-one-out subsets), and the row's accuracy is the mean of those N scores (N = 10 in both
  datasets; an answer given by 4 or more of 10 humans scores 1, by 3 scores 0.9, by 2 scores 0.6, by 1 scores 0.3).

The official VQAv2 script (GT-Vision-Lab/VQA, vqaEval.py) normalises the human answers only when they are not all the
same; VQAv2's stored answers are already normalised, so the two agree on the real data.
"""

import re
from collections.abc import Sequence
from typing import Any

from vlm_recipes.tasks.base import (
    RECIPE_PROMPT,
    SHORT_ANSWER_INSTRUCTION,
    Metric,
    PromptPreset,
    RowScore,
    Task,
    reference_answers,
)
from vlm_recipes.tasks.base import short_answer_prompt as short_answer


# The tables of the reference processor (MMF, EvalAIAnswerProcessor), entry for entry. Keys with capitals never match
# after lower-casing; they are kept as the reference has them.
CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've",
    "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's",
    "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've",
    "mightve": "might've", "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at",
    "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd", "someoned've": "someone'd've",
    "someone'dve": "someone'd've", "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's",
    "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd",
    "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're", "youve": "you've",
}  # fmt: skip
NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
    "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
ARTICLES = frozenset({"a", "an", "the"})
PUNCTUATION = (
    ";",
    "/",
    "[",
    "]",
    '"',
    "{",
    "}",
    "(",
    ")",
    "=",
    "+",
    "\\",
    "_",
    "-",
    ">",
    "<",
    "@",
    "`",
    ",",
    "?",
    "!",
)
# The reference's pattern as written: its `(?!<=\d)` is a lookahead (not a lookbehind) that never fails before a
# period, so a period is removed unless a digit follows it ("3.5" keeps its period, "3." and "a.b" lose theirs).
PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")
DIGIT_COMMA = re.compile(r"(?<=\d)(\,)+(?=\d)")
# The reference calls `PERIOD.sub("", text, re.UNICODE)`, which passes re.UNICODE (32) as the count: at most 32 periods
# of an answer are removed.
PERIOD_COUNT = int(re.UNICODE)


def _punctuation(text: str) -> str:
    out = text
    for mark in PUNCTUATION:
        # Decided on the text as it came in: marks next to a space (or any text with a digit-comma-digit) vanish,
        # marks inside a word become a space.
        if mark + " " in text or " " + mark in text or DIGIT_COMMA.search(text) is not None:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return PERIOD.sub("", out, count=PERIOD_COUNT)


def _digits_and_articles(text: str) -> str:
    words = [NUMBER_WORDS.get(word, word) for word in text.lower().split()]
    return " ".join(CONTRACTIONS.get(word, word) for word in words if word not in ARTICLES)


def normalize_vqa_answer(text: str) -> str:
    """An answer as the EvalAI / TextVQA evaluators compare it."""
    text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return _digits_and_articles(_punctuation(text))


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """Mean over the human answers of min(#other humans who gave the prediction / 3, 1); 0 without answers."""
    if not answers:
        return 0.0
    predicted = normalize_vqa_answer(prediction)
    humans = [normalize_vqa_answer(answer) for answer in answers]
    agreeing = humans.count(predicted)
    # Leaving out one human who gave the prediction leaves `agreeing - 1` others; leaving out anyone else, `agreeing`.
    scores = [min(1.0, (agreeing - (human == predicted)) / 3) for human in humans]
    return sum(scores) / len(scores)


def score(prediction: str, row: dict[str, Any]) -> RowScore:
    return RowScore({"vqa_accuracy": vqa_accuracy(prediction, reference_answers(row))})


VQA_ACCURACY = Metric(
    "vqa_accuracy",
    "min(#humans who gave the normalised answer / 3, 1), averaged over the leave-one-out subsets of the ten human "
    "answers",
    "the TextVQA and VQAv2 leaderboards (EvalAI), lmms-eval's textvqa/vqav2 exact_match and VLMEvalKit's TextVQA "
    "score (×100 there) when the prompt preset is theirs and the split the same",
)


def capitalized_short_answer(row: dict[str, Any]) -> str:
    # lmms-eval, lmms_eval/tasks/textvqa/utils.py textvqa_doc_to_text: the question goes through `str.capitalize()`
    # (first letter upper case, the rest lower case) before the post_prompt.
    return f"{str(row['question']).capitalize()}{SHORT_ANSWER_INSTRUCTION}"


def _card_text(title: str) -> str:
    return (
        f"{title} VQA accuracy as the EvalAI / TextVQA evaluators compute it (answers normalised, min(#humans who gave "
        "the answer / 3, 1) averaged over the leave-one-out subsets of the ten human answers), the metric of the "
        "leaderboard, lmms-eval and VLMEvalKit."
    )


TEXTVQA = Task(
    name="textvqa",
    title="TextVQA",
    formatter="vqa",
    metrics=(VQA_ACCURACY,),
    max_new_tokens=16,  # answers are a few words; lmms-eval's vqav2 generates 16 tokens
    presets=(
        RECIPE_PROMPT,
        PromptPreset(
            "lmms_eval",
            source="lmms-eval lmms_eval/tasks/textvqa/_default_template_textvqa_yaml (default post_prompt, "
            "question capitalized by utils.textvqa_doc_to_text)",
            text=capitalized_short_answer,
        ),
        PromptPreset(
            "vlmevalkit",
            source="VLMEvalKit vlmeval/dataset/image_vqa.py ImageVQADataset.build_prompt (TextVQA_VAL)",
            text=short_answer,
        ),
    ),
    card_text=_card_text("TextVQA"),
    hub_task_type="visual-question-answering",
    score=score,
)

VQAV2 = Task(
    name="vqav2",
    title="VQAv2",
    formatter="vqa",
    metrics=(VQA_ACCURACY,),
    max_new_tokens=16,  # lmms-eval's vqav2 generation_kwargs
    presets=(
        RECIPE_PROMPT,
        # VLMEvalKit has no VQAv2 dataset, so no preset of its own here.
        PromptPreset(
            "lmms_eval",
            source="lmms-eval lmms_eval/tasks/vqav2/_default_template_vqav2_yaml (default post_prompt)",
            text=short_answer,
        ),
    ),
    card_text=_card_text("VQAv2"),
    hub_task_type="visual-question-answering",
    score=score,
)
