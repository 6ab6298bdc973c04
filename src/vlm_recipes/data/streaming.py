"""Streamed training data (`streaming: true`): rows formatted and checked when the trainer reaches them.

For data larger than memory or disk. Each source is read lazily (datasets' streaming mode; a JSONL file line by line,
so messages name its lines), each row formatted with the source's formatter and checked with `data.checks`' per-row
logic (`check_streamed_row`: the same checks, escapes and fixes as for a whole split) on the fly. A mixture's sources
are interleaved by weight with datasets' `interleave_datasets(probabilities=..., seed=...)`, stopping at the first
source that runs out; `max_samples` takes a source's first rows.

- Bad rows are skipped and counted in a running report (`StreamReport`): each position of the stream counted once, so
  a second pass (a new epoch, the trainer's peek at the first row, a resumed run's skip) does not count it again. It is
  written to `data_report.json` at each save and at the end of training. The stop above `max_bad_fraction` applies per
  split once `STOP_AFTER_ROWS` rows of it have been read, and at the end of the stream whatever its length.
- Length grouping happens within the shuffle buffer: `shuffle_buffer_size` checked rows are held, shuffled (seeded),
  sorted by true token count and cut into global batches, whose order is shuffled again. Without length grouping the
  buffer is only shuffled. Every pass yields the same order, so a resumed run's skip of the consumed batches
  (transformers' own: it re-reads and re-checks them without training) lands where the run stopped.
- Under several processes each process reads the whole stream, checks every row into its own running report (the
  same counts everywhere, so the `max_bad_fraction` stop comes on the same row in every process; the main process
  writes it) and keeps its share of each global batch: TRL's SFT and DPO trainers turn accelerate's batch dispatching
  off for a stream, so accelerate wraps it in an `IterableDatasetShard`, which fills a pass's last, short global batch
  with rows of its first (tests/test_streaming.py builds both processes' loaders).
- Evaluation rows are not streamed: the source's test split (its first `max_eval_samples` rows, or all), or with
  `eval_split_size: N` (a row count) the first N rows of the training stream, which training then skips. They are
  read into memory, formatted and checked like any in-memory split.
"""

import itertools
import json
import logging
import pickle
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from datasets import Dataset, Features, Value, interleave_datasets, load_dataset, load_from_disk

from vlm_recipes.compat import iterable_of_rows
from vlm_recipes.configs import DataArguments
from vlm_recipes.data.checks import CheckPolicy, check_streamed_row, report_verdict
from vlm_recipes.data.formatters import FormatError, FormatterSpec, formatter_for_task, get_formatter
from vlm_recipes.data.lengths import TokenCounter
from vlm_recipes.data.loading import (
    DATA_FILE_KINDS,
    DATA_SOURCE,
    JSON_SUFFIXES,
    SOURCE_ROW,
    _check_columns,
    _concatenate,
    _data_files,
    _tagged,
    _without_decoding,
    format_split,
    load_source,
    mixture_sources,
    source_folder,
)
from vlm_recipes.data.report import DataReport
from vlm_recipes.errors import DataError, RecipeError


logger = logging.getLogger(__name__)

STOP_AFTER_ROWS = 200  # a split's bad fraction stops the run only once this many of its rows were read (or at its end)
# A source's rows travel to the interleaving as one pickled column: datasets infers a stream's features from its first
# row, which a rejected row (no messages) or another source's layout would make wrong for the rest.
PAYLOAD = Features({"payload": Value("binary")})


def streams(data_args: DataArguments) -> bool:
    """Whether the recipe streams its training data (`streaming`, or `streaming: true` on a mixture entry)."""
    if data_args.streaming:
        return True
    return bool(data_args.datasets) and any(source.streaming for source in mixture_sources(data_args))


def check_streaming_settings(data_args: DataArguments, training_args: Any) -> None:
    """What a streamed run needs, checked before any data or weights: a stream has no length, so the training length is
    `max_steps` and held-out rows are a count; the running report lives in the process that reads the stream."""
    if not streams(data_args):
        return
    if training_args.max_steps is None or training_args.max_steps <= 0:
        raise RecipeError(
            "streaming: a stream has no known length, so the run needs a positive `max_steps` (the number of "
            "optimizer steps to train)."
        )
    if data_args.train_split_ratio is not None or (
        data_args.eval_split_size is not None and data_args.eval_split_size < 1
    ):
        raise RecipeError(
            "streaming: a fraction of a stream cannot be held out (its length is unknown); give `eval_split_size` as "
            "a number of rows (the stream's first rows), or a test split."
        )
    if getattr(training_args, "dataloader_num_workers", 0):
        raise RecipeError(
            f"streaming: dataloader_num_workers {training_args.dataloader_num_workers} would check rows in worker "
            "processes, whose bad-row counts never reach data_report.json; leave it at 0."
        )
    if data_args.shuffle_buffer_size < 1:
        raise RecipeError(f"shuffle_buffer_size: {data_args.shuffle_buffer_size} should be at least 1.")


# ---------------------------------------------------------------------------------------------------------------------
# Rows of one source, lazily


RowReader = Callable[[], Iterator[dict[str, Any]]]  # a fresh pass over a split's raw rows, each with its `_line`


def _jsonl_lines(path: Path) -> Iterator[dict[str, Any]]:
    """A JSONL file's rows, line by line; a line that is not a JSON object becomes a row the formatter rejects."""
    with open(path, encoding="utf-8", errors="replace") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                row = {"_unreadable": f"is not valid JSON ({error.msg})"}
            yield dict(row, _line=number) if isinstance(row, dict) else {"_unreadable": "is not a JSON object"}


def _numbered(dataset: Any) -> RowReader:
    """Rows of a datasets split (in memory or streamed), images left encoded, numbered from 0."""
    features = getattr(dataset, "features", None) or {}
    for column, feature in features.items():
        lazy = _without_decoding(feature)
        if lazy != feature:
            dataset = dataset.cast_column(column, lazy)
    return lambda: (dict(row, _line=index) for index, row in enumerate(dataset))


def open_splits(
    source: str, config: str | None, image_dir: str | None, streaming: bool
) -> tuple[dict[str, RowReader], str, Path | None]:
    """(split -> a reader of its raw rows, a name for messages, the image root) of a source; with `streaming` nothing is
    read now but the split names (a JSONL file's lines are read as the stream reaches them)."""
    if not streaming:
        splits, label, image_root = load_source(source, config, image_dir)
        readers = {
            name: (lambda rows=rows: (dict(row) for row in rows)) if isinstance(rows, list) else _numbered(rows)
            for name, rows in splits.items()
        }
        return readers, label, image_root
    files = _data_files(source)
    folder = source_folder(source)
    image_root = Path(image_dir).expanduser() if image_dir else folder
    if len(files) == 1 and files[0].suffix.lower() in JSON_SUFFIXES and files[0].suffix.lower() == ".jsonl":
        return {"train": lambda: _jsonl_lines(files[0])}, str(files[0]), image_root
    path = Path(source).expanduser()
    if files:
        kind = DATA_FILE_KINDS[files[0].suffix.lower()]
        loaded = {"train": load_dataset(kind, data_files=[str(file) for file in files], split="train", streaming=True)}
    elif path.is_dir() and ((path / "dataset_dict.json").exists() or (path / "dataset_info.json").exists()):
        on_disk = load_from_disk(str(path))
        on_disk = on_disk if isinstance(on_disk, dict) else {"train": on_disk}
        loaded = {name: split.to_iterable_dataset() for name, split in on_disk.items()}
    else:
        try:
            loaded = dict(load_dataset(source, config, streaming=True))
        except (FileNotFoundError, ConnectionError, ValueError) as error:
            raise RecipeError(f"Could not stream dataset '{source}': {' '.join(str(error).split())}") from None
    return {name: _numbered(split) for name, split in loaded.items()}, source, image_root


@dataclass
class StreamSource:
    """One source of the stream: where its rows come from and how they become conversations."""

    name: str | None  # the mixture entry's name; None for a recipe's single `dataset_name`
    label: str  # what it reads, for messages
    train: RowReader
    test: RowReader | None
    spec: FormatterSpec
    image_root: Path | None
    weight: float = 1.0
    max_samples: int | None = None

    @property
    def split(self) -> str:
        return f"train:{self.name}" if self.name else "train"


def _sources(data_args: DataArguments, task: str) -> list[StreamSource]:
    if not data_args.datasets:
        get_formatter(data_args.formatter, task)
        readers, label, image_root = open_splits(
            data_args.dataset_name, data_args.dataset_config, data_args.image_dir, streaming=True
        )
        if data_args.dataset_train_split not in readers:
            raise RecipeError(
                f"{label} has no split '{data_args.dataset_train_split}'. Its splits: {sorted(readers)}."
            )
        test = data_args.dataset_test_split
        return [
            StreamSource(
                None,
                label,
                readers[data_args.dataset_train_split],
                readers.get(test) if test and test.lower() != "none" else None,
                formatter_for_task(data_args.formatter, task),
                image_root,
            )
        ]
    sources = []
    for source in mixture_sources(data_args):
        entry = source.entry
        readers, label, image_root = open_splits(
            entry.source,
            entry.config,
            entry.image_root or data_args.image_dir,
            data_args.streaming or source.streaming,
        )
        if entry.train_split not in readers:
            raise RecipeError(
                f"{entry.where}: {label} has no split '{entry.train_split}' (its splits: {sorted(readers)})."
            )
        sources.append(
            StreamSource(
                entry.name,
                label,
                readers[entry.train_split],
                readers.get(entry.test_split) if entry.test_split else None,
                entry.formatter_spec(task, data_args.formatter),
                image_root,
                weight=entry.weight,
                max_samples=source.max_samples,
            )
        )
    return sources


def _payloads(source: StreamSource, options: dict[str, Any], skip: int) -> Iterator[dict[str, bytes]]:
    """The source's rows formatted, each as one pickled payload (split, where, the row or why it was rejected)."""
    rows = itertools.islice(source.train(), skip, None if source.max_samples is None else skip + source.max_samples)
    for index, raw in enumerate(rows, start=skip):
        number = raw.pop("_line", index)
        where = f"line {number}" if source.label.endswith(".jsonl") else f"row {number}"
        payload: dict[str, Any] = {"split": source.split, "where": where, "number": number, "source": source.name}
        try:
            if "_unreadable" in raw:
                raise FormatError(raw["_unreadable"], reason="unreadable line")
            payload["row"] = {**source.spec.function(raw, **options), SOURCE_ROW: where}
            if source.name:
                payload["row"][DATA_SOURCE] = source.name
        except FormatError as error:
            payload["problem"] = {"reason": error.reason, "message": str(error), "column": error.column}
        yield {"payload": pickle.dumps(payload)}


# ---------------------------------------------------------------------------------------------------------------------
# The running report, and the checked, grouped stream


@dataclass
class StreamReport:
    """The data report of a stream as it is read: each stream position counted once; written by `write`."""

    report: DataReport
    max_bad_fraction: float
    path: Path | None = None  # data_report.json, once the output folder is ready (main process only)
    positions_read: int = 0
    finished: bool = False  # the whole stream has been read once
    stop_after_rows: int = STOP_AFTER_ROWS
    mixture: dict[str, dict[str, Any]] = field(default_factory=dict)

    def write(self) -> None:
        if self.path is not None:
            self.report.write(self.path)

    def stop_if_too_many_rejected(self) -> None:
        """The `max_bad_fraction` stop, for splits with enough rows read (all of them at the end of the stream)."""
        for name, split in self.report.splits.items():
            if name.startswith("eval"):
                continue
            if (self.finished or split.rows >= self.stop_after_rows) and split.bad_fraction > self.max_bad_fraction:
                self.write()
                self.report.stop_if_too_many_rejected(self.max_bad_fraction, f"after {split.rows} rows of the stream")


def _grouped(buffer: list[tuple[int, dict]], rng: np.random.Generator, global_batch: int | None) -> list[dict]:
    """A full buffer in training order: shuffled; with `global_batch`, sorted by tokens, cut into global batches whose
    order is shuffled (so each batch holds rows of similar length)."""
    order = [buffer[index] for index in rng.permutation(len(buffer))]
    if global_batch is None:
        return [row for _, row in order]
    order.sort(key=lambda item: -item[0])
    batches = [order[start : start + global_batch] for start in range(0, len(order), global_batch)]
    return [row for index in rng.permutation(len(batches)) for _, row in batches[index]]


def checked_stream(
    mixed: Any,
    running: StreamReport,
    counter: TokenCounter | None,
    policy: CheckPolicy | None,
    *,
    seed: int,
    buffer_size: int,
    global_batch: int | None,
    skip_text_only: str | None = None,
) -> Any:
    """The training stream: `mixed`'s payloads unpacked, counted, checked (`counter` None: checks off), buffered and
    grouped. An IterableDataset of formatted rows with decoded images."""
    report = running.report

    def rows() -> Iterator[dict[str, Any]]:
        rng = np.random.default_rng([seed, 2])  # every pass the same order: a resumed run's skip lands right
        buffer: list[tuple[int, dict]] = []
        for position, item in enumerate(mixed, start=1):
            payload = pickle.loads(item["payload"])
            first_read = position > running.positions_read
            split = payload["split"]
            if first_read:
                running.positions_read = position
                report.splits[split].rows += 1
            row, verdict, escaped = payload.get("row"), None, []
            if row is None:
                verdict = {**payload["problem"], "notes": []}
            elif counter is not None:
                row, verdict, escaped = check_streamed_row(row, counter, policy)
            if row is not None and skip_text_only and not row.get("images"):
                row, verdict = None, {"reason": skip_text_only, "message": "has no image", "column": "images"}
            if first_read and verdict is not None:
                verdict.setdefault("notes", [])
                report_verdict(report, split, verdict, payload["where"], payload["number"], payload["source"], escaped)
            if first_read and row is not None and payload["source"]:
                running.mixture[payload["source"]]["train_rows"] += 1
            if first_read:
                running.stop_if_too_many_rejected()
            if row is None:
                continue
            buffer.append((verdict["tokens"] if verdict else 0, row))
            if len(buffer) >= buffer_size:
                yield from _grouped(buffer, rng, global_batch)
                buffer = []
        if not running.finished:
            running.finished = True
            running.stop_if_too_many_rejected()
        yield from _grouped(buffer, rng, global_batch)

    stream = iterable_of_rows(rows)
    stream.stream_report = running  # `training.run` writes it at each save and at the end
    return stream


def stream_datasets(
    data_args: DataArguments,
    *,
    seed: int,
    need_eval: bool,
    task: str,
    num_proc: int | None = None,
) -> tuple[Any, Dataset | None, StreamReport]:
    """(the mixed stream of formatted payloads, the evaluation rows in memory or None, the running report). The
    caller checks the evaluation rows like any split and wraps the stream with `checked_stream`."""
    sources = _sources(data_args, task)
    folders = [source_folder(source.label) for source in sources]
    report = DataReport(None, data_args.image_dir, more_folders=[folder for folder in folders if folder])
    running = StreamReport(report, data_args.max_bad_fraction)
    held = int(data_args.eval_split_size) if data_args.eval_split_size else 0
    options = {"system_prompt": data_args.system_prompt}
    streams_, evaluations = [], []
    for source in sources:
        first = next(source.train(), None)
        if first is None:
            raise DataError(f"{source.label} has no rows to stream")
        if "_unreadable" not in first:
            _check_columns(sorted(set(first) - {"_line"}), source.spec, source.label, task)
        if source.name:
            report.sources[source.name] = source.label
            running.mixture[source.name] = {
                "source": source.label,
                "weight": source.weight,
                "max_samples": source.max_samples,
                "streamed": True,
                "train_rows": 0,
            }
        report.split(source.split, source.label, 0)
        eval_rows = None
        if source.test is not None:
            eval_rows = list(itertools.islice(source.test(), data_args.max_eval_samples))
        elif held:
            eval_rows = list(itertools.islice(source.train(), held))
            report.held_out[source.name or "train"] = {
                "held_out_of": source.label,
                "eval_rows": len(eval_rows),
                "how": f"the first {held} rows of the stream, which training skips",
            }
        if eval_rows is not None:
            evaluation = format_split(
                eval_rows, data_args, source.label, source.image_root, task, report,
                f"eval:{source.name}" if source.name else "eval", num_proc, source.spec,
            )  # fmt: skip
            evaluations.append(_tagged(evaluation, source.name) if source.name else evaluation)
        skip = held if source.test is None else 0
        source_options = {**options, "image_root": source.image_root}
        streams_.append(iterable_of_rows(lambda s=source, o=source_options, k=skip: _payloads(s, o, k), PAYLOAD))
    if need_eval and not evaluations:
        raise RecipeError(
            "Evaluation is on, but the stream has no test split: give one (`dataset_test_split`, or `splits.test` in a "
            "registry entry), or `eval_split_size: N` to evaluate on the first N rows of the stream."
        )
    if len(streams_) == 1:
        mixed = streams_[0]
    else:
        weights = np.asarray([source.weight for source in sources], dtype=float)
        mixed = interleave_datasets(
            streams_, probabilities=(weights / weights.sum()).tolist(), seed=seed, stopping_strategy="first_exhausted"
        )
    if data_args.max_train_samples is not None:
        mixed = mixed.take(data_args.max_train_samples)
    report.mixture = running.mixture
    evaluation = _concatenate(evaluations) if evaluations else None
    logger.info(
        "Data: streaming training rows from %s; %d evaluation rows",
        ", ".join(source.label for source in sources),
        len(evaluation) if evaluation is not None else 0,
    )
    return mixed, evaluation, running
