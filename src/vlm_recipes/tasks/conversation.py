"""A user's own conversations (JSONL with images): the final answer of each conversation is the reference.

- `exact_match`: the generated answer equals the reference character for character (surrounding whitespace aside);
- `normalized_match`: SQuAD v1.1's exact match: equal after lower-casing, removing punctuation and the articles
  a/an/the, and collapsing whitespace (the official evaluate-v1.1.py `normalize_answer`);
- `token_f1`: SQuAD v1.1's F1 over the words of the two normalised texts (a bag of words: overlap counted with
  multiplicity; 0 when nothing overlaps), for longer answers where an exact match is rare.
Each is the best over a row's references (one per row for a conversation).
"""

from collections import Counter
from typing import Any

from vlm_recipes.tasks.base import RECIPE_PROMPT, Metric, RowScore, Task, best, reference_answers
from vlm_recipes.tasks.text import squad_normalize


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD v1.1's F1 of the normalised words of `prediction` against those of `reference`."""
    predicted, expected = squad_normalize(prediction).split(), squad_normalize(reference).split()
    overlap = sum((Counter(predicted) & Counter(expected)).values())
    if overlap == 0:
        return 0.0
    precision, recall = overlap / len(predicted), overlap / len(expected)
    return 2 * precision * recall / (precision + recall)


def score(prediction: str, row: dict[str, Any]) -> RowScore:
    prediction = prediction.strip()
    references = reference_answers(row)
    return RowScore(
        {
            "exact_match": float(any(prediction == reference.strip() for reference in references)),
            "normalized_match": float(
                any(squad_normalize(prediction) == squad_normalize(reference) for reference in references)
            ),
            "token_f1": best([token_f1(prediction, reference) for reference in references]),
        }
    )


CONVERSATION = Task(
    name="conversation",
    title="Conversations",
    formatter="conversations",
    metrics=(
        Metric(
            "token_f1",
            "SQuAD v1.1 F1 of the answer's words against the reference's (normalised: case, punctuation, articles)",
            "F1 as SQuAD-style reading comprehension reports it; on your own data, runs of this package",
        ),
        Metric(
            "normalized_match",
            "SQuAD v1.1 exact match: equal after lower-casing and removing punctuation and articles",
            "SQuAD-style exact match; on your own data, runs of this package",
        ),
        Metric(
            "exact_match",
            "the answer equals the reference character for character",
            "runs of this package on the same data",
        ),
    ),
    max_new_tokens=128,  # free-form answers; raise it for longer ones
    presets=(RECIPE_PROMPT,),  # a user's own data has no published prompt
    card_text=(
        "Answers to held-out conversations scored against each conversation's final answer: SQuAD v1.1 token F1 and "
        "exact match after normalisation (case, punctuation, articles), and exact match character for character."
    ),
    hub_task_type="image-text-to-text",
    score=score,
)
