"""The dataset registry: named datasets, each with its source, how its rows become messages, and its splits.

A registry is a YAML mapping of name -> entry. The package ships one (`data/registry.yaml`: ChartQA, RLAIF-V and the
evaluation data of every task in `vlm_recipes.tasks`); a recipe's `dataset_registry` adds its own entries (an entry of
the same name replaces the built-in one). A new column layout needs an entry, not code:

    my_charts:
      source: data/charts/questions.csv         # Hub id, local folder, or JSONL/JSON/parquet/CSV files (globs work)
      image_root: data/charts/images            # relative image paths resolve against it (default: the files' folder)
      columns: {image: file, question: prompt, answer: reply, system: instructions}
      weight: 1.0                               # default sampling weight in a mixture

Either `formatter` (a name in `data.formatters`) or `columns` says how rows read. `columns` maps the formatter's own
column names to the source's: `image`/`images`, `question`, `answer`/`answers`, `messages` (with `role_key`,
`content_key` and `roles`, the source's names for user/assistant/system), `system` (a per-row system prompt),
`prompt`, `chosen`/`rejected` (preference data). Without `formatter`, the columns named pick one: messages ->
`conversations`, chosen/rejected -> `rlaif_v` (with `question`) or `preference`, question + answer -> `vqa`.
"""

import json
from dataclasses import dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from vlm_recipes.data.formatters import FormatError, FormatterSpec, get_formatter
from vlm_recipes.errors import RecipeError


BUILTIN_REGISTRY = "built-in registry (vlm_recipes/data/registry.yaml)"
# The formatter's own column names a `columns` mapping may name, and what each becomes in the formatter's row.
CANONICAL_COLUMNS = {
    "image": "image",
    "images": "images",
    "question": "question",
    "answer": "answers",
    "answers": "answers",
    "messages": "messages",
    "system": None,  # passed to the formatter as the row's system prompt
    "prompt": "prompt",
    "chosen": "chosen",
    "rejected": "rejected",
}
CANONICAL_ROLES = ("user", "assistant", "system")
SPLIT_KEYS = ("train", "test")
DATA_FILE_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")


@dataclass(frozen=True)
class MessagesLayout:
    """How the turns of a messages column are written: the keys of a turn and the source's names for each role."""

    role_key: str = "role"
    content_key: str = "content"
    roles: dict[str, str] = field(default_factory=lambda: {role: role for role in CANONICAL_ROLES})

    def turns(self, value: Any, column: str) -> list[dict[str, Any]]:
        """The turns as `{"role", "content"}` with the canonical role names; JSON text (a CSV cell) is parsed."""
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as error:
                raise FormatError(f"is text that is not a JSON list of turns ({error.msg})", column=column) from None
        if not isinstance(value, list):
            raise FormatError(f"should be a list of turns, got {type(value).__name__}", column=column)
        by_source_name = {source: role for role, source in self.roles.items()}
        turns = []
        for index, turn in enumerate(value):
            if not isinstance(turn, dict):
                raise FormatError(f"turn {index} should be a mapping", column=column, reason="malformed turn")
            role = by_source_name.get(str(turn.get(self.role_key)))
            if role is None:
                raise FormatError(
                    f"turn {index} has {self.role_key} {turn.get(self.role_key)!r}; the registry's roles name "
                    f"{', '.join(repr(name) for name in by_source_name)}",
                    column=column,
                    reason="unknown role",
                )
            turns.append({"role": role, "content": turn.get(self.content_key)})
        return turns


@dataclass(frozen=True)
class DatasetEntry:
    """One registered dataset. `where` names the registry file and entry for messages."""

    name: str
    source: str
    where: str
    config: str | None = None
    formatter: str | None = None
    columns: dict[str, str] = field(default_factory=dict)
    messages: MessagesLayout | None = None
    image_root: str | None = None
    splits: dict[str, str | None] = field(default_factory=lambda: {"train": "train", "test": None})
    weight: float = 1.0
    description: str = ""

    @property
    def train_split(self) -> str | None:
        return self.splits.get("train")

    @property
    def test_split(self) -> str | None:
        return self.splits.get("test")

    def formatter_name(self, default: str) -> str:
        """The formatter this entry's rows read with: its own, the one its `columns` imply, else `default`."""
        if self.formatter:
            return self.formatter
        named = set(self.columns)
        if "messages" in named:
            return "conversations"
        if {"chosen", "rejected"} <= named:
            return "rlaif_v" if "question" in named else "preference"
        if "question" in named and named & {"answer", "answers"}:
            return "vqa"
        return default

    def formatter_spec(self, task: str, default: str) -> FormatterSpec:
        """The formatter, wrapped so that it reads this entry's columns (`columns`, `messages`) and checks their
        presence under the source's names."""
        name = self.formatter_name(default)
        try:
            spec = get_formatter(name, task)
        except RecipeError as error:
            raise RecipeError(f"{self.where}: {error}") from None
        if not self.columns and self.messages is None:
            return spec
        source_of = {
            CANONICAL_COLUMNS[ours]: theirs for ours, theirs in self.columns.items() if CANONICAL_COLUMNS[ours]
        }
        required = tuple(tuple(source_of.get(column, column) for column in group) for group in spec.required_columns)
        mapping, system_column, layout = dict(source_of), self.columns.get("system"), self.messages
        inner = spec.function

        def read_mapped(row: dict[str, Any], **options: Any) -> dict[str, Any]:
            mapped = {ours: row.get(theirs) for ours, theirs in mapping.items()}
            for column, value in row.items():
                if column not in mapping.values():
                    mapped.setdefault(column, value)
            if layout is not None:
                column = "messages" if mapped.get("messages") is not None else "conversations"
                if mapped.get(column) is not None:
                    mapped[column] = layout.turns(mapped[column], source_of.get(column, column))
            if system_column and isinstance(row.get(system_column), str) and row[system_column].strip():
                options = {**options, "system_prompt": row[system_column].strip()}
            try:
                return inner(mapped, **options)
            except FormatError as error:
                # The message names the source's column, not the formatter's name for it.
                if error.column in mapping:
                    error.column = mapping[error.column]
                raise

        return FormatterSpec(
            name=f"{name} (columns of '{self.name}')",
            function=read_mapped,
            required_columns=required,
            task=spec.task,
            description=spec.description,
        )


ENTRY_FIELDS = tuple(f.name for f in fields(DatasetEntry) if f.name not in ("name", "where"))


def _text(value: Any, where: str, key: str, *, required: bool = False) -> str | None:
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value.strip():
        raise RecipeError(f"{where}: field '{key}' should be non-empty text, got {value!r:.60}.")
    return value


def _mapping(value: Any, where: str, key: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise RecipeError(f"{where}: field '{key}' should be a mapping, got {value!r:.60}.")
    return value


def _messages_layout(value: Any, where: str) -> MessagesLayout | None:
    if value is None:
        return None
    value = _mapping(value, where, "messages")
    known = ("column", "role_key", "content_key", "roles")
    unknown = sorted(set(value) - set(known))
    if unknown:
        raise RecipeError(f"{where}: field 'messages.{unknown[0]}' is unknown; it takes {', '.join(known)}.")
    roles = _mapping(value.get("roles"), where, "messages.roles")
    wrong = sorted(set(roles) - set(CANONICAL_ROLES))
    if wrong:
        raise RecipeError(
            f"{where}: field 'messages.roles' maps {wrong[0]!r}; its keys are {', '.join(CANONICAL_ROLES)} (ours), "
            "its values the source's names for them."
        )
    return MessagesLayout(
        role_key=_text(value.get("role_key", "role"), where, "messages.role_key"),
        content_key=_text(value.get("content_key", "content"), where, "messages.content_key"),
        roles={role: str(roles.get(role, role)) for role in CANONICAL_ROLES},
    )


def parse_entry(name: str, value: Any, where: str, base_folder: Path | None = None) -> DatasetEntry:
    """One registry entry, every field checked (`where`: the registry file and entry, for messages). Relative local
    paths (`source`, `image_root`) resolve against `base_folder` (the registry file's folder) when they exist there."""
    if not isinstance(value, dict):
        raise RecipeError(f"{where}: should be a mapping of field: value, got {value!r:.60}.")
    unknown = sorted(set(value) - set(ENTRY_FIELDS))
    if unknown:
        raise RecipeError(f"{where}: unknown field '{unknown[0]}'. Its fields: {', '.join(ENTRY_FIELDS)}.")
    source = _text(value.get("source"), where, "source", required=True)
    columns = _mapping(value.get("columns"), where, "columns")
    for ours, theirs in columns.items():
        if ours not in CANONICAL_COLUMNS:
            raise RecipeError(
                f"{where}: field 'columns' maps {ours!r}; it maps {', '.join(CANONICAL_COLUMNS)} to the source's "
                "column names."
            )
        _text(theirs, where, f"columns.{ours}", required=True)
    layout = _messages_layout(value.get("messages"), where)
    if layout is not None and "messages" not in columns:
        columns = {**columns, "messages": _mapping(value["messages"], where, "messages").get("column", "messages")}
    elif layout is None and "messages" in columns:
        layout = MessagesLayout()  # role/content turns; a CSV cell's JSON text is parsed
    splits = _mapping(value.get("splits"), where, "splits")
    wrong = sorted(set(splits) - set(SPLIT_KEYS))
    if wrong:
        raise RecipeError(f"{where}: field 'splits' names {wrong[0]!r}; it takes train and test (the source's names).")
    weight = check_weight(value.get("weight", 1.0), where)
    formatter = _text(value.get("formatter"), where, "formatter")
    if formatter is not None:
        get_formatter(formatter)  # an unknown formatter is named now, before any data
    source = _local(source, base_folder)
    if base_folder is not None and Path(source).suffix.lower() in DATA_FILE_SUFFIXES and "*" not in source:
        if not Path(source).expanduser().is_file():
            raise RecipeError(
                f"{where}: field 'source' names {source}: no such file (a relative path is read from the registry's "
                f"folder, {base_folder})."
            )
    return DatasetEntry(
        name=name,
        source=source,
        where=where,
        config=_text(value.get("config"), where, "config"),
        formatter=formatter,
        columns=dict(columns),
        messages=layout,
        image_root=_local(_text(value.get("image_root"), where, "image_root"), base_folder),
        splits={"train": splits.get("train", "train"), "test": splits.get("test")},
        weight=weight,
        description=str(value.get("description") or ""),
    )


def check_weight(weight: Any, where: str) -> float:
    """A sampling weight: a positive number (relative to the other sources'), else one error naming `where`."""
    if isinstance(weight, bool) or not isinstance(weight, int | float) or not weight > 0:
        raise RecipeError(f"{where}: field 'weight' should be a positive number, got {weight!r}.")
    return float(weight)


def _local(path: str | None, base_folder: Path | None) -> str | None:
    """A relative path that exists beside the registry file, made absolute; anything else (a Hub id) as it is."""
    if path is None or base_folder is None or Path(path).expanduser().is_absolute():
        return path
    beside = base_folder / path
    if beside.exists() or any(char in path for char in "*?[") and beside.parent.exists():
        return str(beside)
    return path


def _read_registry(text: str, label: str, base_folder: Path | None) -> dict[str, DatasetEntry]:
    try:
        content = yaml.safe_load(text) or {}
    except yaml.YAMLError as error:
        raise RecipeError(f"{label} is not valid YAML: {' '.join(str(error).split())}") from None
    if not isinstance(content, dict):
        raise RecipeError(f"{label} should be a YAML mapping of dataset name: entry.")
    return {
        str(name): parse_entry(str(name), value, f"{label}, entry '{name}'", base_folder)
        for name, value in content.items()
    }


def builtin_registry() -> dict[str, DatasetEntry]:
    text = resources.files("vlm_recipes.data").joinpath("registry.yaml").read_text(encoding="utf-8")
    return _read_registry(text, BUILTIN_REGISTRY, None)


def load_registry(path: str | None) -> dict[str, DatasetEntry]:
    """The built-in entries, with those of the registry file at `path` (if any) over them."""
    entries = builtin_registry()
    if path:
        file = Path(path).expanduser()
        if not file.is_file():
            raise RecipeError(f"dataset_registry: {path} is not a file (a YAML registry of datasets).")
        entries.update(_read_registry(file.read_text(encoding="utf-8"), str(path), file.parent.resolve()))
    return entries
