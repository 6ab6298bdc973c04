"""Parse a YAML recipe plus command-line overrides into an entry point's typed recipe.

`python -m vlm_recipes.sft recipes/chartqa.yaml --learning_rate 1e-4` works like TRL's own scripts
(`TrlParser.parse_args_and_config`), with four additions: the recipe path may be given without `--config`, an unknown
field gets one clear message naming it (with the closest known field), a renamed field names its new name
(`configs.RENAMED_FIELDS`), and YAML strings such as `2e-4`, which YAML 1.1 does not read as numbers, are converted with
the field's own type.

Each entry point declares its recipe as a dataclass whose fields are its parts, each a dataclass the parser fills:

    @dataclass
    class SFTRecipe(TrainingRecipe):
        training: SFTConfig
        evaluation: EvaluationArguments

    recipe = parse_recipe(SFTRecipe, argv)   # recipe.training.learning_rate, recipe.data.dataset_name, ...
"""

import argparse
import difflib
import importlib
import os
import typing
from dataclasses import dataclass, fields
from enum import Enum
from pathlib import Path
from typing import Any

import yaml
from transformers import TrainingArguments

from vlm_recipes.cli import HELP_FLAGS, print_stored_help_and_exit
from vlm_recipes.configs import (
    RENAMED_FIELDS,
    DataArguments,
    ModelArguments,
    ReliabilityArguments,
    RunArguments,
    SpeedArguments,
    TuningArguments,
)
from vlm_recipes.console import print_main
from vlm_recipes.errors import RecipeError


@dataclass
class Recipe:
    """Base of every entry point's recipe: besides its parts (the fields a subclass adds), where it came from and what
    the recipe file and the command line set (saved with the outputs)."""

    source: str | None  # the recipe file
    settings: dict[str, Any]  # field -> value, for every field the file or the command line set
    entry_point: str | None  # the module that ran it, e.g. "vlm_recipes.dpo"

    @classmethod
    def parts(cls) -> dict[str, type]:
        """The recipe's parts, by name, in order: each a dataclass the parser fills."""
        hints = typing.get_type_hints(cls)
        base = {f.name for f in fields(Recipe)}
        return {f.name: hints[f.name] for f in fields(cls) if f.name not in base}

    def set_defaults(self, part: Any, defaults: dict[str, Any]) -> None:
        """Set the fields of `part` (one of this recipe's parts) that neither the recipe file nor the command line set:
        an entry point's defaults over TRL's."""
        for name, value in defaults.items():
            if name not in self.settings:
                setattr(part, name, value)


@dataclass
class TrainingRecipe(Recipe):
    """The parts every training entry point's recipe has; each narrows `training` to its TRL config."""

    data: DataArguments
    model: ModelArguments
    tuning: TuningArguments
    run: RunArguments
    training: TrainingArguments
    reliability: ReliabilityArguments
    speed: SpeedArguments

    def length_limit(self) -> tuple[int | None, int]:
        """(the `max_length` the data checks hold each row to, the tokens each row must leave free within it): TRL's
        `max_length` and nothing by default; GRPO's prompts leave room for `max_completion_length`."""
        return getattr(self.training, "max_length", None), 0


def _split_recipe_path(argv: list[str]) -> tuple[str | None, list[str]]:
    if "--config" in argv:
        index = argv.index("--config")
        if index + 1 >= len(argv):
            raise RecipeError("`--config` needs a recipe path.")
        return argv[index + 1], argv[:index] + argv[index + 2 :]
    if argv and not argv[0].startswith("-") and argv[0].endswith((".yaml", ".yml")):
        return argv[0], argv[1:]
    return None, argv


def _load_recipe_file(path: str) -> dict[str, Any]:
    if not Path(path).is_file():
        raise RecipeError(f"Recipe file not found: {path}")
    try:
        with open(path, encoding="utf-8") as handle:
            content = yaml.safe_load(handle) or {}
    except yaml.YAMLError as error:
        raise RecipeError(f"{path} is not valid YAML: {error}") from None
    if not isinstance(content, dict):
        raise RecipeError(f"{path} must be a YAML mapping of field: value.")
    return content


def _unknown_field_message(name: str, known: list[str], where: str) -> str:
    if name in RENAMED_FIELDS and RENAMED_FIELDS[name][0] in known:
        new_name, meaning = RENAMED_FIELDS[name]
        return f"{where}: the field '{name}' is now '{new_name}' ({meaning}). Rename it."
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.75)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    return f"{where}: unknown field {name!r}.{hint} `--help` lists every field."


def _expected(action) -> str:
    """What a field takes, in words, for messages."""
    if action.choices:
        return "one of " + ", ".join(str(choice) for choice in action.choices)
    names = {int: "a whole number", float: "a number", str: "text"}
    if action.type in names:
        return names[action.type]
    if getattr(action.type, "__name__", "") == "string_to_bool":
        return "true or false"
    return f"a value of the field's type ({action.help or 'see --help'})"


# Fields that take a path to a JSON file or the mapping itself: transformers opens any other value as a file (an
# integer as a file descriptor).
CONFIG_FILE_FIELDS = frozenset({"accelerator_config", "deepspeed", "fsdp_config"})


def _coerce(action, value: Any, where: str) -> Any:
    """A recipe file's value with the field's own type, or one error naming the file, the field, the value and what the
    field takes. argparse checks command-line values, but not values set as defaults, which is how a file's reach it."""
    if value is None or action.nargs in ("+", "*"):
        return value
    wrong = RecipeError(f"{where}: field '{action.dest}' is {value!r}, which is not {_expected(action)}.")
    if action.dest in CONFIG_FILE_FIELDS and not isinstance(value, str | dict):
        raise RecipeError(
            f"{where}: field '{action.dest}' is {value!r}, which is not a path to a JSON file or a mapping."
        )
    if isinstance(value, str) and callable(action.type) and action.type is not str:
        # YAML 1.1 reads `2e-4` as a string; argparse's own type converts it the way the command line would.
        try:
            value = action.type(value)
        except (TypeError, ValueError, argparse.ArgumentTypeError):
            raise wrong from None
    elif action.type in (int, float):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise wrong
        if action.type is int:
            if not float(value).is_integer():
                raise wrong
            value = int(value)
    if action.choices and getattr(value, "value", value) not in action.choices and value not in action.choices:
        raise wrong
    return value


def _one_line_error(message: str) -> None:
    raise RecipeError(f"command line: {message}. `--help` lists every field and what it takes.")


def _cli_field_names(argv: list[str]) -> list[str]:
    return [arg[2:].split("=", 1)[0] for arg in argv if arg.startswith("--")]


def _has_accelerator() -> bool:
    import torch

    return (
        torch.cuda.is_available()
        or torch.backends.mps.is_available()
        or (hasattr(torch, "xpu") and torch.xpu.is_available())
    )


RecipeType = typing.TypeVar("RecipeType", bound=Recipe)


def recipe_class_of(entry_point: str) -> type[TrainingRecipe] | None:
    """The recipe class a training entry point parses: the `TrainingRecipe` subclass its module defines."""
    try:
        module = importlib.import_module(entry_point)
    except ImportError:
        return None
    return next(
        (
            value
            for value in vars(module).values()
            if isinstance(value, type) and issubclass(value, TrainingRecipe) and value.__module__ == module.__name__
        ),
        None,
    )


def method_fields(recipe_text: str, known: set[str]) -> set[str]:
    """The fields of the recipe file's own entry point (its `# entry point:` line) that a parser knowing `known` does
    not: a training method's own parts (GRPO's rewards, DPO's beta, where a policy starts, ...)."""
    recipe_class = recipe_class_of(entry_point_of(recipe_text))
    if recipe_class is None:
        return set()
    return {f.name for part in recipe_class.parts().values() for f in fields(part)} - known


def parse_recipe(
    recipe_class: type[RecipeType],
    argv: list[str] | None = None,
    prog: str | None = None,
    ignore_method_fields: bool = False,
) -> RecipeType:
    """Parse `argv` (default `sys.argv[1:]`: a recipe path and field overrides) into `recipe_class`, one instance of
    each of its parts.

    `ignore_method_fields`: a command that reads the data, model and evaluation parts of any training run's recipe
    (`evaluate` on `RUN/recipe.yaml`) skips the fields that belong to the file's own method only, saying so in one line;
    any other unknown field is still an error."""
    import sys

    from trl import TrlParser

    parts = recipe_class.parts()
    argv = list(sys.argv[1:] if argv is None else argv)
    if prog and any(flag in argv for flag in HELP_FLAGS):  # the grouped help the package stores, as the CLI prints it
        print_stored_help_and_exit(prog.removeprefix("python -m ").strip())
    parser = TrlParser(list(parts.values()), prog=prog)
    parser.error = _one_line_error  # a wrong command-line value: one message, not the usage of every field
    actions = {action.dest: action for action in parser._actions if action.dest != "help"}
    known = sorted(actions)

    recipe_path, argv = _split_recipe_path(argv)
    settings: dict[str, Any] = {}
    if recipe_path is not None:
        content = _load_recipe_file(recipe_path)
        env = content.pop("env", None) or {}
        if not isinstance(env, dict):
            raise RecipeError(f"{recipe_path}: `env` should be a mapping of variable: value, got {env!r:.60}.")
        for key, value in env.items():
            os.environ[str(key)] = str(value)
        if ignore_method_fields:
            text = Path(recipe_path).read_text(encoding="utf-8")
            skipped = [key for key in content if key in method_fields(text, set(actions))]
            if skipped:
                content = {key: value for key, value in content.items() if key not in skipped}
                print_main(
                    f"{recipe_path}: a {entry_point_of(text).removeprefix('vlm_recipes.')} recipe; its method's own "
                    f"fields are not used here: {', '.join(skipped)}"
                )
        for key, value in content.items():
            if key not in actions:
                raise RecipeError(_unknown_field_message(key, known, recipe_path))
            settings[key] = _coerce(actions[key], value, recipe_path)
        parser.set_defaults_with_config(**settings)

    for name in _cli_field_names(argv):
        if name not in actions and name != "help":  # argparse answers `--help` itself
            raise RecipeError(_unknown_field_message(name, known, "command line"))
    if (
        "use_cpu" in actions
        and "use_cpu" not in settings
        and "use_cpu" not in _cli_field_names(argv)
        and not _has_accelerator()
    ):
        # TRL trains in bf16 by default, which TrainingArguments refuses without a GPU unless told to use the CPU.
        parser.set_defaults_with_config(use_cpu=True)
    try:
        instances = parser.parse_args_into_dataclasses(args=argv)
    except (ValueError, TypeError, OSError) as error:  # the dataclasses' own checks (a config file not found, ...)
        raise RecipeError(f"{recipe_path or 'command line'}: {' '.join(str(error).split())}") from None

    for name in _cli_field_names(argv):
        for instance in instances:
            if name in {f.name for f in fields(instance)}:
                settings[name] = getattr(instance, name)
    entry_point = prog.removeprefix("python -m ").strip() if prog else None
    return recipe_class(
        source=recipe_path, settings=settings, entry_point=entry_point, **dict(zip(parts, instances, strict=True))
    )


ENTRY_POINT_COMMENT = "# entry point:"  # first line of a recipe that another entry point than SFT runs


def entry_point_of(recipe_text: str, default: str = "vlm_recipes.sft") -> str:
    """The module a recipe file is for: its `# entry point: ...` comment line, or SFT."""
    for line in recipe_text.splitlines():
        if line.startswith(ENTRY_POINT_COMMENT):
            return line.removeprefix(ENTRY_POINT_COMMENT).strip()
    return default


# Fields that hold credentials (`max_new_tokens`, `pad_token` and the like are settings, and are kept).
SECRET_FIELDS = frozenset({"hub_token", "token", "wandb_api_key"})


def save_recipe(recipe: Recipe, path: str | Path) -> None:
    """Write the recipe as run (file plus overrides) next to the outputs. Fields that hold secrets are left out."""
    safe = {key: value for key, value in recipe.settings.items() if key not in SECRET_FIELDS}
    with open(path, "w", encoding="utf-8") as handle:
        if recipe.entry_point:
            handle.write(f"{ENTRY_POINT_COMMENT} {recipe.entry_point}\n")
        if recipe.source:
            handle.write(f"# recipe: {recipe.source}, with command-line overrides applied\n")
        yaml.safe_dump(_plain(safe), handle, sort_keys=False)


def _plain(value: Any) -> Any:
    if isinstance(value, Enum):  # `--eval_strategy steps` on the command line parses to an enum (a str subclass)
        return _plain(value.value)
    if isinstance(value, dict):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(item) for item in value]
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    return str(value)
