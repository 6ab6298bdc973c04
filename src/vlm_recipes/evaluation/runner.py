"""Generate answers for evaluation rows and score them with their task: the one evaluation the command and the training
callback share.

Rows are put to the model in the set's prompt preset, sorted by prompt length (text and image tokens) so that each
left-padded batch holds prompts of similar length, longest first (a batch that does not fit in memory fails at once).
Under `accelerate launch` the sorted rows are dealt out to the processes in turn, so every process gets rows of every
length, and the predictions are gathered: every process gets the same scores as one process would on the same rows.
"""

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from vlm_recipes.evaluation.generate import generate_answers, prompt_lengths
from vlm_recipes.tasks import PromptPreset, Task
from vlm_recipes.tasks.base import question_of, reference_answers


@dataclass
class EvaluationOutcome:
    scores: dict[str, float]  # metric -> mean over rows, plus "rows"
    records: list[dict[str, Any]]  # per row: question, labels, prediction, each metric's value, task details
    seconds: float  # generation time (all processes, wall clock)

    @property
    def rows_per_second(self) -> float:
        return self.scores["rows"] / self.seconds if self.seconds > 0 else 0.0


def _without_images(rows: Sequence[dict[str, Any]]) -> Sequence[dict[str, Any]]:
    """The rows without their images (a `datasets.Dataset` would decode every image again to read the text)."""
    if hasattr(rows, "select_columns") and "images" in rows.column_names:
        return rows.select_columns([name for name in rows.column_names if name != "images"])
    return rows


def generation_order(lengths: Sequence[int], processes: int, process: int) -> list[int]:
    """The row indices one process generates, longest prompt first: the rows sorted by length, dealt out in turn, and
    the shorter shares padded with their last row so that sharded models step through generation together."""
    order = sorted(range(len(lengths)), key=lambda index: -lengths[index])
    mine = order[process::processes]
    share = -(-len(order) // processes)
    return mine + mine[-1:] * (share - len(mine)) if mine else order[-1:] * share


def _generate_sorted(
    model: Any, processor: Any, rows: Sequence[dict[str, Any]], preset: PromptPreset, **options: Any
) -> list[str]:
    from accelerate import PartialState
    from accelerate.utils import gather_object

    state = PartialState()
    lengths = prompt_lengths(processor, rows, preset.messages)
    mine = generation_order(lengths, state.num_processes, state.process_index)
    answers = generate_answers(
        model,
        processor,
        [rows[index] for index in mine],
        prompt=preset.messages,
        **{**options, "progress": options.get("progress", True) and state.is_main_process},
    )
    pairs = list(zip(mine, answers))
    by_index = dict(gather_object(pairs) if state.num_processes > 1 else pairs)
    return [by_index[index] for index in range(len(rows))]


def evaluate_rows(
    model: Any, processor: Any, rows: Sequence[dict[str, Any]], task: Task, preset: PromptPreset, **generation: Any
) -> EvaluationOutcome:
    """Greedy answers for `rows` (formatted rows) asked in `preset`, scored with `task`'s metrics. `generation` takes
    the options of `generate_answers` (batch_size, max_new_tokens, progress, description)."""
    started = time.perf_counter()
    predictions = _generate_sorted(model, processor, rows, preset, **generation)
    seconds = time.perf_counter() - started
    texts = _without_images(rows)
    records, scores = [], []
    for index, prediction in enumerate(predictions):
        row = texts[index]
        score = task.score(prediction, row)
        scores.append(score)
        records.append(
            {
                "index": index,
                "question": question_of(row),
                "labels": reference_answers(row),
                "prediction": prediction,
                **score.values,
                **score.details,
            }
        )
    return EvaluationOutcome(scores=task.aggregate(scores), records=records, seconds=seconds)
