"""Mixtures and held-out splits: which rows of which source train, decided with a seed and nothing else.

A recipe's `datasets:` lists registered names or inline entries (`data.registry`), each optionally with `weight` (its
sampling probability, relative to the others') and `max_samples` (a cap on its rows):

    datasets:
      - chartqa                                    # the registry's entry, its default weight
      - {name: my_charts, weight: 3}               # drawn three times as often as a weight-1 source
      - {name: extra, source: extra.jsonl, max_samples: 500}   # inline; 500 rows, whole, outside the draw

`draw_mixture` interleaves the weighted sources: each row of the mixture comes from a source drawn with probability
weight / sum of weights, the source's next row in a seeded shuffle, until a drawn source has no rows left (so no row
repeats, and each source's share follows its weight). Entries with `max_samples` and no `weight` join whole.
`held_out_indices` carves a seeded evaluation split from a source without one (`train_split_ratio`, `eval_split_size`).
"""

import hashlib
import json
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from vlm_recipes.data.registry import ENTRY_FIELDS, DatasetEntry, check_weight, parse_entry
from vlm_recipes.errors import RecipeError


MIXTURE_FIELDS = ("name", "max_samples", "streaming", *ENTRY_FIELDS)


@dataclass(frozen=True)
class MixtureSource:
    """One source of a recipe's mixture: its registry entry, and how it joins (drawn by weight, or whole)."""

    entry: DatasetEntry
    weighted: bool  # drawn with probability weight / sum; False: all its rows (up to max_samples) join
    max_samples: int | None
    streaming: bool = False  # read lazily, row by row (`data.streaming`)

    @property
    def name(self) -> str:
        return self.entry.name


def _as_mapping(item: Any, position: int) -> dict[str, Any]:
    if isinstance(item, str):
        text = item.strip()
        if not text.startswith("{"):
            return {"name": text}
        try:
            item = json.loads(text)
        except json.JSONDecodeError as error:
            raise RecipeError(
                f"datasets entry {position} is not a name or a JSON object ({error.msg}): {item!r:.80}"
            ) from None
    if not isinstance(item, Mapping) or not isinstance(item.get("name"), str):
        raise RecipeError(f"datasets entry {position} should be a registered name or a mapping with a `name`.")
    return dict(item)


def resolve_mixture(items: list[Any], registry: dict[str, DatasetEntry], registry_label: str) -> list[MixtureSource]:
    """The recipe's `datasets:` as sources, each checked: names against the registry (an unknown one lists them),
    inline fields as a registry entry's, weights positive, max_samples whole. Before any data loads."""
    sources = []
    for position, item in enumerate(items, start=1):
        values = _as_mapping(item, position)
        name = values["name"]
        where = f"datasets entry {position} ('{name}')"
        unknown = sorted(set(values) - set(MIXTURE_FIELDS))
        if unknown:
            raise RecipeError(f"{where}: unknown field '{unknown[0]}'. Its fields: {', '.join(MIXTURE_FIELDS)}.")
        inline = {
            key: value for key, value in values.items() if key not in ("name", "max_samples", "weight", "streaming")
        }
        if name in registry and not inline:
            entry = registry[name]
        elif name in registry:
            base = registry[name]
            entry = parse_entry(name, {**_entry_fields(base), **inline}, where)
        elif "source" in values:
            entry = parse_entry(name, {key: value for key, value in values.items() if key in ENTRY_FIELDS}, where)
        else:
            raise RecipeError(
                f"{where}: no dataset '{name}' in {registry_label}, and the entry gives no `source`. "
                f"Registered: {', '.join(sorted(registry))}."
            )
        if entry.train_split is None:
            raise RecipeError(
                f"{where}: '{name}' has no training split ({entry.where} sets `splits.train: null`); it can be "
                "an evaluation set (`eval_datasets`), not training data."
            )
        max_samples = values.get("max_samples")
        if max_samples is not None and (
            isinstance(max_samples, bool) or not isinstance(max_samples, int) or max_samples < 1
        ):
            raise RecipeError(f"{where}: `max_samples` should be a whole number of at least 1, got {max_samples!r}.")
        if "weight" in values:
            entry = replace(entry, weight=check_weight(values["weight"], where))
        weighted = "weight" in values or max_samples is None
        streaming = values.get("streaming", False)
        if not isinstance(streaming, bool):
            raise RecipeError(f"{where}: `streaming` should be true or false, got {streaming!r}.")
        sources.append(MixtureSource(entry=entry, weighted=weighted, max_samples=max_samples, streaming=streaming))
    names = [source.name for source in sources]
    duplicate = next((name for name in names if names.count(name) > 1), None)
    if duplicate:
        raise RecipeError(f"datasets names '{duplicate}' twice; each source needs its own name.")
    return sources


def _entry_fields(entry: DatasetEntry) -> dict[str, Any]:
    """A parsed entry back as registry fields (to lay a recipe's inline fields over it)."""
    values: dict[str, Any] = {
        "source": entry.source,
        "config": entry.config,
        "formatter": entry.formatter,
        "columns": {key: value for key, value in entry.columns.items() if key != "messages" or entry.messages is None},
        "image_root": entry.image_root,
        "splits": dict(entry.splits),
        "weight": entry.weight,
    }
    if entry.messages is not None:
        values["messages"] = {
            "column": entry.columns.get("messages", "messages"),
            "role_key": entry.messages.role_key,
            "content_key": entry.messages.content_key,
            "roles": dict(entry.messages.roles),
        }
    return {key: value for key, value in values.items() if value is not None}


def draw_mixture(sizes: list[int], weights: list[float], seed: int) -> list[tuple[int, int]]:
    """(source, row) pairs in training order: each from a source drawn with probability weight / sum of weights, the
    source's next row in its seeded shuffle, until a drawn source has no row left. Same seed, same rows, same order."""
    rng = np.random.default_rng(seed)
    orders = [rng.permutation(size) for size in sizes]
    if not sizes:
        return []
    probabilities = np.asarray(weights, dtype=float) / float(sum(weights))
    draws = rng.choice(len(sizes), size=sum(sizes) + 1, p=probabilities)
    # The row each draw takes from its source; the mixture stops at the first draw past its source's last row.
    taken = np.zeros(len(draws), dtype=np.int64)
    for source in range(len(sizes)):
        mask = draws == source
        taken[mask] = np.arange(int(mask.sum()))
    exhausted = np.flatnonzero(taken >= np.asarray(sizes)[draws])
    stop = int(exhausted[0]) if len(exhausted) else len(draws)
    return [(int(source), int(orders[source][row])) for source, row in zip(draws[:stop], taken[:stop], strict=True)]


def held_out_indices(rows: int, size: float, seed: int, name: str = "") -> tuple[list[int], list[int]]:
    """(train indices, evaluation indices) of a split of `rows` rows: `size` < 1 is the evaluation fraction (rounded
    up), >= 1 a row count; drawn with `seed` and the source's `name` (two sources of one size hold out different
    rows), so every run holds out the same rows. Both lists sorted."""
    count = int(size) if size >= 1 else int(np.ceil(rows * size))
    if not 0 < count < rows:
        raise RecipeError(
            f"Holding out {size} of {rows} rows for evaluation leaves {'no evaluation' if count <= 0 else 'no training'} "
            "rows; set `train_split_ratio` / `eval_split_size` so both splits keep rows."
        )
    evaluation = np.sort(np.random.default_rng([seed, zlib.crc32(name.encode())]).permutation(rows)[:count])
    keep = np.ones(rows, dtype=bool)
    keep[evaluation] = False
    return np.flatnonzero(keep).tolist(), evaluation.tolist()


def held_out_record(source: str, total: int, evaluation: list[int], seed: int, size: float) -> dict[str, Any]:
    """What data_report.json says about a held-out split: enough to see it is the same rows every run."""
    return {
        "held_out_of": source,
        "eval_split": size if size >= 1 else round(size, 6),
        "seed": seed,
        "rows": total,
        "eval_rows": len(evaluation),
        "train_rows": total - len(evaluation),
        "eval_row_indices_sha256": hashlib.sha256(json.dumps(evaluation).encode()).hexdigest(),
        "first_eval_row_indices": evaluation[:10],
    }
