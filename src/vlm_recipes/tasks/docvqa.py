"""DocVQA and InfographicVQA: questions about document pages and infographics, scored with ANLS.

ANLS (average normalized Levenshtein similarity; Biten et al., 2019, eq. 1) as the official DocVQA / InfographicVQA
evaluation script computes it (`infographicsvqa_eval.py` of the Robust Reading Competition; Qwen-VL's
eval_mm/infographicsvqa_eval.py and lmms-eval's `anls` in lmms_eval/api/metrics.py copy it). For each reference answer:
- both texts are lower-cased, stripped and their whitespace runs collapsed to one space;
- the edit distance of those texts is divided by the longer of the two ORIGINAL texts' lengths (`len(text.upper())`,
  as the script measures them);
- the row's score is 1 minus the smallest such normalised distance over its answers, and 0 when that is below the
  threshold 0.5 (a similarity of exactly 0.5 keeps its 0.5).
The task's number is the mean over rows.
"""

from collections.abc import Sequence
from typing import Any

from vlm_recipes.tasks.base import RECIPE_PROMPT, Metric, PromptPreset, RowScore, Task, reference_answers
from vlm_recipes.tasks.base import short_answer_prompt as short_answer
from vlm_recipes.tasks.text import collapse_whitespace, levenshtein


ANLS_THRESHOLD = 0.5


def normalized_distance(answer: str, prediction: str) -> float:
    """The official script's normalised Levenshtein distance of one answer and one prediction."""
    distance = levenshtein(
        collapse_whitespace(answer.strip().lower()), collapse_whitespace(prediction.strip().lower())
    )
    length = max(len(answer.upper()), len(prediction.upper()))
    return 0.0 if length == 0 else distance / length


def anls(prediction: str, answers: Sequence[str], threshold: float = ANLS_THRESHOLD) -> float:
    """One row's ANLS: the best similarity over `answers`, 0 below `threshold` (and 0 for a row without answers)."""
    if not answers:
        return 0.0
    similarity = 1 - min(normalized_distance(answer, prediction) for answer in answers)
    return 0.0 if similarity < threshold else similarity


def score(prediction: str, row: dict[str, Any]) -> RowScore:
    return RowScore({"anls": anls(prediction.strip(), reference_answers(row))})


ANLS_METRIC = Metric(
    "anls",
    "1 - the normalised edit distance to the closest reference answer, 0 when below 0.5 (the official DocVQA / "
    "InfographicVQA script)",
    "the DocVQA and InfographicVQA leaderboards (Robust Reading Competition), lmms-eval's anls and VLMEvalKit's "
    "DocVQA/InfoVQA scores (×100 there) when the prompt preset is theirs and the split the same",
)

# lmms-eval, lmms_eval/tasks/docvqa/_default_template_docvqa_yaml and infovqa/_default_template_infovqa_yaml: default
# pre_prompt "" and the short-answer post_prompt, around the question. VLMEvalKit, vlmeval/dataset/image_vqa.py:
# `ImageVQADataset.build_prompt` (DocVQA_VAL, InfoVQA_VAL) appends the same instruction.


def _presets(vlmevalkit_dataset: str, lmms_eval_template: str) -> tuple[PromptPreset, ...]:
    return (
        RECIPE_PROMPT,
        PromptPreset("lmms_eval", source=f"lmms-eval {lmms_eval_template} (default post_prompt)", text=short_answer),
        PromptPreset(
            "vlmevalkit",
            source=f"VLMEvalKit vlmeval/dataset/image_vqa.py ImageVQADataset.build_prompt ({vlmevalkit_dataset})",
            text=short_answer,
        ),
    )


def _card_text(title: str) -> str:
    return (
        f"{title} ANLS as the official evaluation script computes it (normalised Levenshtein similarity to the closest "
        "reference answer, 0 below 0.5), the metric of the leaderboard, lmms-eval and VLMEvalKit."
    )


DOCVQA = Task(
    name="docvqa",
    title="DocVQA",
    formatter="vqa",
    metrics=(ANLS_METRIC,),
    max_new_tokens=128,  # lmms-eval's docvqa generation_kwargs
    presets=_presets("DocVQA_VAL", "lmms_eval/tasks/docvqa/_default_template_docvqa_yaml"),
    card_text=_card_text("DocVQA"),
    hub_task_type="document-question-answering",
    score=score,
)

INFOVQA = Task(
    name="infovqa",
    title="InfographicVQA",
    formatter="vqa",
    metrics=(ANLS_METRIC,),
    max_new_tokens=32,  # lmms-eval's infovqa generation_kwargs
    presets=_presets("InfoVQA_VAL", "lmms_eval/tasks/infovqa/_default_template_infovqa_yaml"),
    card_text=_card_text("InfographicVQA"),
    hub_task_type="document-question-answering",
    score=score,
)
