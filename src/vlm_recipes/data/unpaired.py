"""KTO's unpaired rows: `{"images", "prompt", "completion", "label"}`, one answer per row, `label` true when it is
desirable.

A user's own unpaired rows come from the `unpaired` formatter as they are. Preference pairs (RLAIF-V, or the
`preference` formatter's rows) are split after the data checks, so that each pair is checked once and its bad rows are
counted once: the chosen answer becomes a desirable row and the rejected one an undesirable row, both with the pair's
prompt and images. TRL's KTO trainer takes the rows in order (its KL estimate pairs each row with its neighbour's
completion), so the split rows are shuffled with the recipe's seed: the two halves of a pair do not sit side by side.
"""

from typing import Any

from datasets import Dataset


def _split_pairs(batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
    """A batch of preference rows -> twice as many unpaired rows (chosen: desirable, rejected: undesirable)."""
    out: dict[str, list[Any]] = {"prompt": [], "completion": [], "label": []}
    carried = [column for column in batch if column not in ("prompt", "chosen", "rejected")]
    out.update({column: [] for column in carried})
    for index, prompt in enumerate(batch["prompt"]):
        for column, label in (("chosen", True), ("rejected", False)):
            out["prompt"].append(prompt)
            out["completion"].append(batch[column][index])
            out["label"].append(label)
            for name in carried:
                out[name].append(batch[name][index])
    return out


def unpair(dataset: Dataset | None, seed: int) -> Dataset | None:
    """`dataset` as unpaired rows: preference pairs split in two, then shuffled with `seed`; unpaired rows unchanged.
    None stays None."""
    if dataset is None or "chosen" not in dataset.column_names:
        return dataset
    split = dataset.map(_split_pairs, batched=True, remove_columns=dataset.column_names, desc="Splitting pairs")
    return split.shuffle(seed=seed).flatten_indices()


def label_counts(dataset: Dataset) -> tuple[int, int]:
    """(desirable rows, undesirable rows)."""
    labels = dataset["label"]
    desirable = sum(bool(label) for label in labels)
    return desirable, len(labels) - desirable
