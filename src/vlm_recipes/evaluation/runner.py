"""Generate answers for evaluation rows and score them: the one evaluation the command and the training callback share.

Under `accelerate launch` the rows are split over the processes and the predictions gathered, so every process gets the
same scores as one process would on the same rows.
"""

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from vlm_recipes.evaluation.generate import generate_answers, question_of, reference_answers
from vlm_recipes.evaluation.metrics import aggregate, score_row


@dataclass
class EvaluationOutcome:
    scores: dict[str, float]  # metric -> mean over rows, plus "rows"
    records: list[dict[str, Any]]  # per row: question, labels, prediction, correct, exact_match


def _without_images(rows: Sequence[dict[str, Any]]) -> Sequence[dict[str, Any]]:
    """The rows without their images (a `datasets.Dataset` would decode every image again to read the text)."""
    if hasattr(rows, "select_columns") and "images" in rows.column_names:
        return rows.select_columns([name for name in rows.column_names if name != "images"])
    return rows


def _generate_sharded(model: Any, processor: Any, rows: Sequence[dict[str, Any]], **options: Any) -> list[str]:
    from accelerate import PartialState
    from accelerate.utils import gather_object

    state = PartialState()
    indices = list(range(len(rows)))
    if state.num_processes == 1:
        return generate_answers(model, processor, rows, **options)
    # Equal shares (the last row repeated where needed) so that sharded models step through generation together.
    with state.split_between_processes(indices, apply_padding=True) as mine:
        mine = list(mine)
    answers = generate_answers(
        model,
        processor,
        [rows[i] for i in mine],
        **{**options, "progress": options.get("progress", True) and state.is_main_process},
    )
    by_index = dict(gather_object(list(zip(mine, answers))))
    return [by_index[i] for i in indices]


def evaluate_rows(model: Any, processor: Any, rows: Sequence[dict[str, Any]], **generation: Any) -> EvaluationOutcome:
    """Greedy answers for `rows` (formatted rows with `messages`, `images` and optionally `answers`), scored.
    `generation` takes the options of `generate_answers` (batch_size, max_new_tokens, progress, description)."""
    predictions = _generate_sharded(model, processor, rows, **generation)
    texts = _without_images(rows)
    records, row_scores = [], []
    for index, prediction in enumerate(predictions):
        row = texts[index]
        labels = reference_answers(row)
        scores = score_row(prediction, labels)
        row_scores.append(scores)
        records.append(
            {
                "index": index,
                "question": question_of(row["messages"]),
                "labels": labels,
                "prediction": prediction,
                "correct": scores["relaxed_accuracy"],
                "exact_match": scores["exact_match"],
            }
        )
    return EvaluationOutcome(scores=aggregate(row_scores), records=records)
