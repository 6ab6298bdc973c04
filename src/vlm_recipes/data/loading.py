"""Load a dataset (Hub id, local dataset folder, or a JSONL file of conversations), pick its splits, and format it.

`load_datasets(data_args, seed, need_eval)` is the one call the entry points make. It returns the train and eval
splits in TRL's vision format (see `vlm_recipes.data.formatters`) with `images` cast to a lazily decoded image feature.
"""

import json
import logging
from pathlib import Path
from typing import Any

from datasets import Dataset, DatasetDict, Image, List, Sequence, Value, load_dataset, load_from_disk
from datasets.exceptions import DataFilesNotFoundError, DatasetNotFoundError

from vlm_recipes.configs import DataArguments
from vlm_recipes.data.formatters import FormatError, FormatterSpec, find_matching_formatters, get_formatter
from vlm_recipes.data.report import DataReport, SplitReport
from vlm_recipes.errors import DataError, RecipeError


logger = logging.getLogger(__name__)

JSON_SUFFIXES = (".jsonl", ".json")
# Each formatted row says where it came from ("line 18", "row 17"), so later checks name the source row. TRL's vision
# trainer drops the column with the other non-model columns.
SOURCE_ROW = "source_row"


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
    """The folder the data lives in: a JSONL file's folder, or a local dataset folder; None for a Hub dataset."""
    path = Path(data_args.dataset_name or "").expanduser()
    if data_args.dataset_name and path.is_file():
        return path.parent
    return path if data_args.dataset_name and path.is_dir() else None


def _load_splits(data_args: DataArguments) -> tuple[dict[str, Any], str, Path | None]:
    """(splits, a name for messages, the folder relative image paths resolve against)."""
    name = data_args.dataset_name
    if not name:
        raise RecipeError("The recipe sets no `dataset_name` (a Hub dataset id, a local folder or a JSONL file).")
    path = Path(name).expanduser()
    if path.is_file() and path.suffix in JSON_SUFFIXES:
        image_root = Path(data_args.image_dir).expanduser() if data_args.image_dir else path.parent
        return {"train": read_jsonl(path)}, str(path), image_root
    image_root = Path(data_args.image_dir).expanduser() if data_args.image_dir else (path if path.is_dir() else None)
    if path.is_dir() and ((path / "dataset_dict.json").exists() or (path / "dataset_info.json").exists()):
        loaded = load_from_disk(str(path))
        return (loaded if isinstance(loaded, DatasetDict) else {"train": loaded}), str(path), image_root
    if path.exists() and not path.is_dir():
        raise RecipeError(f"{path}: expected a .jsonl/.json file, a dataset folder, or a Hub dataset id.")
    try:
        return load_dataset(name, data_args.dataset_config), name, image_root
    except (DatasetNotFoundError, DataFilesNotFoundError, FileNotFoundError, ConnectionError) as error:
        raise RecipeError(
            f"Could not load dataset '{name}': {error}. Check the name or path; without network access only local "
            "folders and files work (set HF_HUB_OFFLINE=1 to use the local cache)."
        ) from None


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


def _format_rows(
    rows: list[dict[str, Any]],
    spec: FormatterSpec,
    options: dict[str, Any],
    report: SplitReport,
    split: str,
    data_report: DataReport,
) -> Dataset:
    formatted = []
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
    return Dataset.from_list(formatted)


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
) -> Dataset:
    """Check a split's columns against the formatter, then format every row; rows it rejects are counted and skipped."""
    spec = get_formatter(data_args.formatter, task)
    columns = (
        rows.column_names if isinstance(rows, Dataset) else sorted({key for row in rows for key in row} - {"_line"})
    )
    _check_columns(columns, spec, source, task)
    options = {"system_prompt": data_args.system_prompt, "image_root": image_root}
    report = data_report.split(split, source, len(rows))
    if isinstance(rows, Dataset):
        formatted = _format_dataset(rows, spec, options, report, split, data_report, num_proc)
    else:
        formatted = _format_rows([dict(row) for row in rows], spec, options, report, split, data_report)
    return _cast_images(formatted)


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

    The caller publishes the report (`DataReport.publish`), which stops the run when too many rows were rejected.
    `format_train=False` (evaluation only) returns None for the train split and skips formatting it.
    """
    get_formatter(data_args.formatter, task)  # an unknown formatter fails before any data loads
    splits, source, image_root = _load_splits(data_args)
    # Evaluation alone needs no train split (DocVQA's Hub dataset has none), unless the evaluation rows are held out of it.
    needs_train = format_train or bool(data_args.eval_split_size)
    train = _pick_split(splits, data_args.dataset_train_split, source) if needs_train else None

    test_split = data_args.dataset_test_split
    evaluation = None
    if data_args.eval_split_size:
        size = data_args.eval_split_size
        size = int(size) if size >= 1 else size
        if isinstance(train, Dataset):
            parts = train.train_test_split(test_size=size, seed=seed)
            train, evaluation = parts["train"], parts["test"]
        else:
            held_out = Dataset.from_list([{"i": i} for i in range(len(train))]).train_test_split(
                test_size=size, seed=seed
            )
            evaluation = [train[i] for i in held_out["test"]["i"]]
            train = [train[i] for i in held_out["train"]["i"]]
    elif test_split and test_split.lower() != "none" and test_split in splits:
        evaluation = splits[test_split]
    elif need_eval:
        raise RecipeError(
            f"Evaluation is on, but {source} has no split '{test_split}' (splits: {', '.join(sorted(splits))}). "
            "Set `dataset_test_split` to one of them, or `eval_split_size` to hold out part of the train split."
        )

    report = DataReport(data_folder(data_args), data_args.image_dir)
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
    logger.info(
        "Data: %d training rows, %s evaluation rows from %s",
        len(train) if train is not None else 0,
        len(evaluation) if evaluation else 0,
        source,
    )
    return train, evaluation, report
