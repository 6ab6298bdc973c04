"""Load a dataset (Hub id, local dataset folder, or a JSONL file of conversations), pick its splits, and format it.

`load_datasets(data_args, seed, need_eval)` is the one call the entry points make. It returns the train and eval
splits in TRL's vision format (see `vlm_recipes.data.formatters`) with `images` cast to a lazily decoded image feature.
"""

import glob
import json
import logging
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
from datasets import (
    Dataset,
    DatasetDict,
    Image,
    List,
    Sequence,
    Value,
    concatenate_datasets,
    load_dataset,
    load_from_disk,
)
from datasets.exceptions import DataFilesNotFoundError, DatasetNotFoundError
from datasets.fingerprint import Hasher

from vlm_recipes.configs import DataArguments
from vlm_recipes.console import quiet_progress
from vlm_recipes.data.formatters import (
    FormatError,
    FormatterSpec,
    find_matching_formatters,
    formatter_for_task,
    get_formatter,
)
from vlm_recipes.data.mixture import MixtureSource, draw_mixture, held_out_indices, held_out_record, resolve_mixture
from vlm_recipes.data.registry import load_registry
from vlm_recipes.data.report import DataReport, SplitReport
from vlm_recipes.errors import DataError, RecipeError


logger = logging.getLogger(__name__)

JSON_SUFFIXES = (".jsonl", ".json")
# Data files a source may name (one, or a glob), by suffix -> the datasets builder that reads them.
DATA_FILE_KINDS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
# Each formatted row says where it came from ("line 18", "row 17"), so later checks name the source row. TRL's vision
# trainer drops the column with the other non-model columns.
SOURCE_ROW = "source_row"
# In a mixture, each row also names its source (the `datasets` entry); the data checks name it for a bad row.
DATA_SOURCE = "data_source"


def _utf8_text(path: Path) -> str:
    """The file's text; bytes that are not UTF-8 are an error naming the line and the byte."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        column = error.start - (data.rfind(b"\n", 0, error.start) + 1) + 1
        raise DataError(
            f"is not valid UTF-8 (byte 0x{data[error.start]:02x}, the line's byte {column}); JSON files must be UTF-8: "
            "save the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8`)",
            source=str(path),
            row=line,
            row_label="line",
        ) from None


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Rows of a JSONL file (or a JSON list); a line that is not UTF-8 or not a JSON object is an error naming it."""
    text = _utf8_text(path)
    if path.suffix == ".json" and text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as error:
            raise DataError(
                f"is not valid JSON ({error.msg})", source=str(path), row=error.lineno, row_label="line"
            ) from None
        lines = list(enumerate(rows, start=1))
        label = "item"
    else:
        lines, label = [], "line"
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                lines.append((number, json.loads(line)))
            except json.JSONDecodeError as error:
                raise DataError(
                    f"is not valid JSON ({error.msg})", source=str(path), row=number, row_label="line"
                ) from None
    for number, row in lines:
        if not isinstance(row, dict):
            raise DataError("should be a JSON object", source=str(path), row=number, row_label=label)
    return [dict(row, _line=number) for number, row in lines]


def data_folder(data_args: DataArguments) -> Path | None:
    """The folder the data lives in: a data file's folder, or a local dataset folder; None for a Hub dataset."""
    return source_folder(data_args.dataset_name)


def source_folder(source: str | None) -> Path | None:
    """The local folder of a source (a file's or a glob's folder, or the folder itself); None for a Hub id."""
    if not source:
        return None
    path = Path(source).expanduser()
    if path.is_file() or (_is_glob(source) and path.parent.is_dir()):
        return path.parent
    return path if path.is_dir() else None


def _is_glob(source: str) -> bool:
    return any(char in source for char in "*?[")


def _data_files(source: str) -> list[Path]:
    """The files a source names (one file, or a glob); [] when it names no data file."""
    path = Path(source).expanduser()
    if _is_glob(source):
        files = sorted(Path(found) for found in glob.glob(str(path), recursive=True))
        if not files:
            raise RecipeError(f"{source}: no file matches this pattern.")
    elif path.is_file():
        files = [path]
    else:
        return []
    kinds = [DATA_FILE_KINDS.get(file.suffix.lower()) for file in files]
    if None in kinds or len(set(kinds)) > 1:
        odd = next(file for file, kind in zip(files, kinds, strict=True) if kind is None or kind != kinds[0])
        raise RecipeError(
            f"{odd}: expected a .jsonl/.json file, parquet or CSV files (all of one kind), a dataset folder, or a Hub "
            "dataset id."
        )
    return files


def load_source(
    source: str | None, config: str | None = None, image_dir: str | None = None
) -> tuple[dict[str, Any], str, Path | None]:
    """(splits, a name for messages, the folder relative image paths resolve against) of a Hub id, a local dataset
    folder, or data files (JSONL/JSON, parquet, CSV; a glob matches several). A single JSON file keeps its line
    numbers for messages; several files, parquet and CSV number their rows."""
    if not source:
        raise RecipeError("The recipe sets no `dataset_name` (a Hub dataset id, a local folder or a data file).")
    path = Path(source).expanduser()
    files = _data_files(source)
    folder = source_folder(source)
    image_root = Path(image_dir).expanduser() if image_dir else folder
    if len(files) == 1 and files[0].suffix.lower() in JSON_SUFFIXES:
        return {"train": read_jsonl(files[0])}, str(files[0]), image_root
    if files:
        kind = DATA_FILE_KINDS[files[0].suffix.lower()]
        try:
            loaded = load_dataset(kind, data_files=[str(file) for file in files], split="train")
        except (ValueError, OSError) as error:  # pyarrow's parse errors are ValueErrors
            raise RecipeError(f"{source}: could not read the {kind} file(s): {' '.join(str(error).split())}") from None
        return {"train": loaded}, source, image_root
    if path.is_dir() and ((path / "dataset_dict.json").exists() or (path / "dataset_info.json").exists()):
        loaded = load_from_disk(str(path))
        return (loaded if isinstance(loaded, DatasetDict) else {"train": loaded}), str(path), image_root
    if path.exists() and not path.is_dir():
        raise RecipeError(f"{path}: expected a .jsonl/.json file, a dataset folder, or a Hub dataset id.")
    try:
        return load_dataset(source, config), source, image_root
    except (DatasetNotFoundError, DataFilesNotFoundError, FileNotFoundError, ConnectionError) as error:
        raise RecipeError(
            f"Could not load dataset '{source}': {error}. Check the name or path; without network access only local "
            "folders and files work (set HF_HUB_OFFLINE=1 to use the local cache)."
        ) from None


def _load_splits(data_args: DataArguments) -> tuple[dict[str, Any], str, Path | None]:
    """(splits, a name for messages, the folder relative image paths resolve against)."""
    return load_source(data_args.dataset_name, data_args.dataset_config, data_args.image_dir)


def _pick_split(splits: dict[str, Any], split: str, source: str) -> Any:
    if split not in splits:
        raise RecipeError(f"{source} has no split '{split}'. Its splits: {', '.join(sorted(splits))}.")
    return splits[split]


def _first(rows: Any, limit: int | None) -> Any:
    if limit is None or len(rows) <= limit:
        return rows
    return rows.select(range(limit)) if isinstance(rows, Dataset) else rows[:limit]


def _check_columns(columns: list[str], spec: FormatterSpec, source: str, task: str) -> None:
    for group in spec.required_columns:
        if not any(column in columns for column in group):
            wanted = " or ".join(f"'{column}'" for column in group)
            fitting = [name for name in find_matching_formatters(columns, task) if name != spec.name]
            hint = f" Formatters that fit its columns: {', '.join(fitting)}." if fitting else ""
            raise DataError(
                f"the '{spec.name}' formatter needs column {wanted}, which is missing "
                f"(columns: {', '.join(columns)}).{hint}",
                source=source,
                column=group[0],
            )


def _without_decoding(feature: Any) -> Any:
    if isinstance(feature, Image):
        return Image(decode=False)
    if isinstance(feature, List | Sequence):
        return type(feature)(_without_decoding(feature.feature))
    return feature


# Marks a dataset (in its `info.description`, which datasets carries through map, select, casts and concatenation)
# whose fingerprint is derived from its sources, not drawn at random: `data.checks` may cache results for it.
STABLE_FINGERPRINT = "vlm_recipes: fingerprint derived from the source files"


def has_stable_fingerprint(dataset: Dataset) -> bool:
    return STABLE_FINGERPRINT in (dataset.info.description or "")


def _file_stamp(path: Any) -> tuple[str, int, int] | None:
    """(resolved path, size, modification time) of a local file; None when it is not one."""
    try:
        stat = os.stat(path)
    except (OSError, TypeError, ValueError):
        return None
    return str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns


def _rows_fingerprint(source: str, lines: list[Any], formatted: list[dict[str, Any]], settings: Any) -> str | None:
    """A fingerprint of formatted rows from a local file: the file's and every image file's path, size and modification
    time, the rows taken (their line numbers) and `settings` (the recipe's data part, formatter, split, task); None for
    rows not read from a local file. Datasets built in memory otherwise get a random one, so other processes, and the
    next run, could not find the checks' cached results (`data.checks`)."""
    stamp = _file_stamp(source)
    if stamp is None:
        return None
    images = [
        _file_stamp(image) or image for row in formatted for image in row.get("images") or [] if isinstance(image, str)
    ]
    return Hasher.hash(("formatted rows v1", stamp, lines, images, settings))


def _format_rows(
    rows: list[dict[str, Any]],
    spec: FormatterSpec,
    options: dict[str, Any],
    report: SplitReport,
    split: str,
    data_report: DataReport,
    settings: Any = None,
) -> Dataset:
    formatted = []
    lines = [row.get("_line", index) for index, row in enumerate(rows)]
    for index, row in enumerate(rows):
        number = row.pop("_line", index)
        try:
            formatted.append({**spec.function(row, **options), SOURCE_ROW: f"line {number}"})
            if any(
                isinstance(image, str) and not data_report.inside_data_folders(image)
                for image in formatted[-1]["images"]
            ):
                data_report.outside_data_folder(split, f"line {number}")
        except FormatError as error:
            message = str(
                DataError(str(error), source=report.source, row=number, column=error.column, row_label="line")
            )
            data_report.reject(split, f"line {number}", error.reason, message)
    dataset = Dataset.from_list(formatted)
    fingerprint = _rows_fingerprint(report.source, lines, formatted, settings)
    if fingerprint is None:
        return dataset
    info = dataset.info.copy()
    info.description = STABLE_FINGERPRINT
    return Dataset(dataset.data, info=info, fingerprint=fingerprint)


def _format_dataset(
    dataset: Dataset,
    spec: FormatterSpec,
    options: dict[str, Any],
    report: SplitReport,
    split: str,
    data_report: DataReport,
    num_proc,
) -> Dataset:
    # Images stay encoded while formatting: nothing is decoded until the collator needs the pixels.
    for column, feature in dataset.features.items():
        lazy = _without_decoding(feature)
        if lazy != feature:
            dataset = dataset.cast_column(column, lazy)

    # First pass: which rows the formatter rejects, and why (a small two-column result). Second: format the rest.
    def check_row(row: dict[str, Any]) -> dict[str, Any]:
        try:
            spec.function(row, **options)
            return {"reason": None, "message": None, "column": None}
        except FormatError as error:
            return {"reason": error.reason, "message": str(error), "column": error.column}

    verdicts = dataset.map(
        check_row, remove_columns=dataset.column_names, num_proc=num_proc, desc=f"Checking rows for '{spec.name}'"
    )
    kept = []
    for index, (reason, message, column) in enumerate(
        zip(verdicts["reason"], verdicts["message"], verdicts["column"])
    ):
        if reason is None:
            kept.append(index)
        else:
            full = str(DataError(message, source=report.source, row=index, column=column))
            data_report.reject(split, f"row {index}", reason, full)
    if len(kept) < len(dataset):
        dataset = dataset.select(kept)

    return dataset.map(
        lambda row, index: {**spec.function(row, **options), SOURCE_ROW: f"row {kept[index]}"},
        with_indices=True,
        remove_columns=dataset.column_names,
        num_proc=num_proc,
        desc=f"Formatting with '{spec.name}'",
    )


def _cast_images(dataset: Dataset) -> Dataset:
    """Turn the formatted `images` column (paths or encoded bytes) into a lazily decoded list-of-images feature."""
    feature = dataset.features.get("images")
    inner = getattr(feature, "feature", None)
    if feature is None or isinstance(inner, Image) or (isinstance(inner, Value) and inner.dtype == "null"):
        return dataset  # already images, or no row has any image
    return dataset.cast_column("images", List(Image()))


def format_split(
    rows: Any,
    data_args: DataArguments,
    source: str,
    image_root: Path | None,
    task: str,
    data_report: DataReport,
    split: str,
    num_proc: int | None = None,
    spec: FormatterSpec | None = None,
) -> Dataset:
    """Check a split's columns against the formatter (the recipe's, or `spec`: a registry entry's), then format every
    row; rows it rejects are counted under `split` in the report and skipped."""
    spec = formatter_for_task(spec or data_args.formatter, task)
    columns = (
        rows.column_names if isinstance(rows, Dataset) else sorted({key for row in rows for key in row} - {"_line"})
    )
    _check_columns(columns, spec, source, task)
    options = {"system_prompt": data_args.system_prompt, "image_root": image_root}
    report = data_report.split(split, source, len(rows))
    if isinstance(rows, Dataset):
        formatted = _format_dataset(rows, spec, options, report, split, data_report, num_proc)
    else:
        settings = (asdict(data_args), spec.name, split, task, str(image_root))
        formatted = _format_rows([dict(row) for row in rows], spec, options, report, split, data_report, settings)
    return _cast_images(formatted)


def eval_split_size(data_args: DataArguments) -> float | None:
    """The evaluation rows to hold out of the train split (a fraction < 1 or a count), from `eval_split_size` or
    `train_split_ratio`; None when the recipe asks for none."""
    ratio, size = data_args.train_split_ratio, data_args.eval_split_size
    if ratio is not None and size is not None:
        raise RecipeError("Set `train_split_ratio` or `eval_split_size`, not both: they say the same thing.")
    if ratio is not None:
        if not 0 < ratio < 1:
            raise RecipeError(f"train_split_ratio: {ratio} should be between 0 and 1 (0.9 trains on 90%).")
        return round(1 - ratio, 12)
    if size is not None and not size > 0:
        raise RecipeError(f"eval_split_size: {size} should be a fraction (0-1) or a number of rows (>= 1).")
    return size


def _hold_out(rows: Any, size: float, seed: int, name: str, data_report: DataReport) -> tuple[Any, Any]:
    """(train rows, held-out evaluation rows) of `rows`, seeded; recorded in the report under `name`."""
    train_ids, eval_ids = held_out_indices(len(rows), size, seed, name)
    data_report.held_out[name] = held_out_record(name, len(rows), eval_ids, seed, size)
    if isinstance(rows, Dataset):
        return rows.select(train_ids), rows.select(eval_ids)
    return [rows[i] for i in train_ids], [rows[i] for i in eval_ids]


@quiet_progress()  # datasets' bars for split generation, formatting and casts off: the logged line says what it did
def load_datasets(
    data_args: DataArguments,
    *,
    seed: int = 42,
    need_eval: bool = False,
    task: str = "sft",
    num_proc: int | None = None,
    format_train: bool = True,
) -> tuple[Dataset | None, Dataset | None, DataReport]:
    """The formatted train split, the formatted evaluation split (or None), and the report of rejected rows.

    With `datasets` (a mixture of registered sources) the train split is their seeded interleaving and the evaluation
    split every source's evaluation rows (`_load_mixture`). The caller publishes the report (`DataReport.publish`),
    which stops the run when too many rows were rejected. `format_train=False` (evaluation only) returns None for the
    train split and skips formatting it.
    """
    held_out = eval_split_size(data_args)
    if data_args.datasets:
        return _load_mixture(data_args, held_out, seed=seed, need_eval=need_eval, task=task, num_proc=num_proc)
    get_formatter(data_args.formatter, task)  # an unknown formatter fails before any data loads
    splits, source, image_root = _load_splits(data_args)
    report = DataReport(data_folder(data_args), data_args.image_dir)
    # Evaluation alone needs no train split (DocVQA's Hub dataset has none), unless the evaluation rows are held out of it.
    needs_train = format_train or bool(held_out)
    train = _pick_split(splits, data_args.dataset_train_split, source) if needs_train else None

    test_split = data_args.dataset_test_split
    evaluation = None
    if held_out:
        train, evaluation = _hold_out(train, held_out, seed, "train", report)
    elif test_split and test_split.lower() != "none" and test_split in splits:
        evaluation = splits[test_split]
    elif need_eval:
        raise RecipeError(
            f"Evaluation is on, but {source} has no split '{test_split}' (splits: {', '.join(sorted(splits))}). "
            "Set `dataset_test_split` to one of them, or `train_split_ratio` / `eval_split_size` to hold out part of "
            "the train split."
        )

    if format_train:
        train = format_split(
            _first(train, data_args.max_train_samples), data_args, source, image_root, task, report, "train", num_proc
        )
    else:
        train = None
    if evaluation is not None:
        evaluation = format_split(
            _first(evaluation, data_args.max_eval_samples),
            data_args,
            source,
            image_root,
            task,
            report,
            "eval",
            num_proc,
        )
    counts = [f"{len(train)} training rows"] if format_train and train is not None else []
    counts += [f"{len(evaluation) if evaluation else 0} evaluation rows"]  # evaluation alone: no "0 training rows"
    logger.info("Data: %s from %s", ", ".join(counts), source)
    return train, evaluation, report


def mixture_sources(data_args: DataArguments) -> list[MixtureSource]:
    """The recipe's `datasets` resolved against the registry (built-in + `dataset_registry`), before any data."""
    registry = load_registry(data_args.dataset_registry)
    label = (
        f"the registry ({data_args.dataset_registry} and the built-in one)"
        if data_args.dataset_registry
        else ("the built-in registry")
    )
    if data_args.dataset_name:
        raise RecipeError(
            "The recipe sets both `dataset_name` and `datasets`; a mixture names every source in `datasets`."
        )
    return resolve_mixture(data_args.datasets or [], registry, label)


def _load_mixture(
    data_args: DataArguments, held_out: float | None, *, seed: int, need_eval: bool, task: str, num_proc: int | None
) -> tuple[Dataset, Dataset | None, DataReport]:
    """Each source loaded, split (its test split, else held out when asked) and formatted under its own report split
    (`train:<name>`, `eval:<name>`); the train rows drawn into one seeded mixture (`mixture.draw_mixture`), the
    evaluation rows of every source together. Rows carry their source's name (`DATA_SOURCE`)."""
    sources = mixture_sources(data_args)
    folders = [source_folder(source.entry.source) for source in sources]
    report = DataReport(None, data_args.image_dir, more_folders=[folder for folder in folders if folder])
    for source in sources:  # every source's formatter and columns known before any data loads
        source.entry.formatter_spec(task, data_args.formatter)
    trains, evaluations = [], []
    for source in sources:
        entry = source.entry
        spec = entry.formatter_spec(task, data_args.formatter)
        splits, label, image_root = load_source(entry.source, entry.config, entry.image_root or data_args.image_dir)
        report.sources[entry.name] = label
        train = _pick_split(splits, entry.train_split, f"{entry.where}: {label}")
        evaluation = None
        if entry.test_split and entry.test_split in splits:
            evaluation = splits[entry.test_split]
        elif entry.test_split:
            raise RecipeError(
                f"{entry.where}: {label} has no split '{entry.test_split}' (its splits: {', '.join(sorted(splits))})."
            )
        elif held_out:
            train, evaluation = _hold_out(train, held_out, seed, entry.name, report)
        train = _first_shuffled(train, source.max_samples, seed)
        formatted = format_split(
            train, data_args, label, image_root, task, report, f"train:{entry.name}", num_proc, spec
        )
        if len(formatted) == 0:  # drawing from it would end the mixture at its first draw
            split = report.splits[f"train:{entry.name}"]
            worst = max(split.rejections.values(), key=lambda rejection: rejection.count, default=None)
            why = f"; most common: {worst.reason} (e.g. {', '.join(worst.examples)}): {worst.message}" if worst else ""
            raise DataError(f"datasets entry '{entry.name}' has no usable training rows ({split.rows} read{why})")
        trains.append(_tagged(formatted, entry.name))
        if evaluation is not None:
            evaluation = format_split(
                _first(evaluation, data_args.max_eval_samples),
                data_args, label, image_root, task, report, f"eval:{entry.name}", num_proc, spec,
            )  # fmt: skip
            evaluations.append(_tagged(evaluation, entry.name))
    if need_eval and not evaluations:
        raise RecipeError(
            "Evaluation is on, but no source of `datasets` has evaluation rows: give a registry entry `splits.test`, "
            "or set `train_split_ratio` to hold out part of each source."
        )

    weighted = [index for index, source in enumerate(sources) if source.weighted]
    order = draw_mixture(
        [len(trains[index]) for index in weighted], [sources[index].entry.weight for index in weighted], seed
    )
    picks = [(weighted[source], row) for source, row in order]
    whole = [
        (index, row)
        for index, source in enumerate(sources)
        if not source.weighted
        for row in range(len(trains[index]))
    ]
    if whole:  # sources that join whole go to seeded places among the drawn rows (max_train_samples cuts all alike)
        picks = [
            (picks + whole)[position]
            for position in np.random.default_rng([seed, 1]).permutation(len(picks) + len(whole))
        ]
    combined = _concatenate(trains)
    offsets = np.cumsum([0] + [len(train) for train in trains])
    mixed = combined.select([int(offsets[source] + row) for source, row in picks])
    mixed = _first(mixed, data_args.max_train_samples)
    evaluation = _concatenate(evaluations) if evaluations else None
    names = ", ".join(source.name for source in sources)
    report.split("train", f"mixture of {names}", len(mixed))
    if evaluation is not None:
        report.split("eval", f"evaluation rows of {names}", len(evaluation))
    report.mixture = {
        source.name: {
            "source": report.sources[source.name],
            "weight": source.entry.weight if source.weighted else None,
            "max_samples": source.max_samples,
            "formatted_rows": len(trains[index]),
            "mixed_train_rows": sum(1 for picked, _ in picks[: len(mixed)] if picked == index),
        }
        for index, source in enumerate(sources)
    }
    logger.info("Data: %d training rows mixed from %s", len(mixed), names)
    return mixed, evaluation, report


def _first_shuffled(rows: Any, limit: int | None, seed: int) -> Any:
    """`limit` rows drawn with `seed` (all when None): a cap that keeps a source's variety, not its first rows."""
    if limit is None or len(rows) <= limit:
        return rows
    chosen = sorted(np.random.default_rng(seed).permutation(len(rows))[:limit].tolist())
    return rows.select(chosen) if isinstance(rows, Dataset) else [rows[i] for i in chosen]


def _tagged(dataset: Dataset, name: str) -> Dataset:
    return dataset.add_column(DATA_SOURCE, [name] * len(dataset))


def _concatenate(parts: list[Dataset]) -> Dataset:
    """Formatted splits of several sources as one: the columns they share, in the first one's features."""
    shared = [column for column in parts[0].column_names if all(column in part.column_names for part in parts)]
    parts = [part.select_columns(shared) for part in parts]
    features = parts[0].features
    aligned = []
    for part in parts:
        if part.features != features:
            try:
                part = part.cast(features)
            except (ValueError, TypeError) as error:
                raise RecipeError(
                    f"The formatted rows of the sources cannot be combined ({' '.join(str(error).split())[:200]}); "
                    "mix sources of one kind (all conversations, or all preference pairs)."
                ) from None
        aligned.append(part)
    return concatenate_datasets(aligned)
