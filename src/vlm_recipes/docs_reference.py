"""Write docs/reference.md, the recipe field reference, and every command's `--help` text (`help/<command>.txt` in the
package, which `vlm-recipes COMMAND --help` prints without importing the trainers), from the dataclasses and parsers
the entry points use.

    python -m vlm_recipes.docs_reference [--output docs/reference.md] [--check]

Every field a recipe (or the command line) can set is listed once, by recipe part, with its type, default and help
text: the package's own dataclasses (`vlm_recipes.configs`, the evaluate and preflight options) and TRL's
`ModelConfig`, `SFTConfig` and `DPOConfig`. `--check` writes nothing and exits with 1 when the file is out of date
(tests/test_docs.py does the same), so neither the page nor the help can drift from the code.
"""

import argparse
import dataclasses
import enum
import importlib
import re
import sys
import textwrap
import typing
from pathlib import Path
from typing import Any

import trl

from vlm_recipes import dpo, evaluate, grpo, kto, preflight, sft
from vlm_recipes.cli import COMMANDS, help_file
from vlm_recipes.training.speed import MAX_DEFAULT_WORKERS, SPEED_DEFAULTS


REFERENCE_PAGE = Path("docs/reference.md")  # relative to the repository root, where `make docs` runs

# The recipe parts of each command, in the order its `--help` lists them. Preflight also takes every part of the
# entry point the recipe is for (its `# entry point:` line), so only its own options are named here.
COMMAND_PARTS = {
    "vlm_recipes.sft": sft.SFTRecipe.parts(),
    "vlm_recipes.dpo": dpo.DPORecipe.parts(),
    "vlm_recipes.grpo": grpo.GRPORecipe.parts(),
    "vlm_recipes.kto": kto.KTORecipe.parts(),
    "vlm_recipes.evaluate": evaluate.EvaluateRecipe.parts(),
    "vlm_recipes.preflight": {"preflight": preflight.PreflightArguments},
}

# Where the entry points set their own defaults over TRL's (when the recipe does not set the field).
DEFAULTS_OVER_TRL = {
    "vlm_recipes.sft": {**sft.VISION_SFT_DEFAULTS, **SPEED_DEFAULTS},
    "vlm_recipes.dpo": {**dpo.VISION_DPO_DEFAULTS, **dpo.PREFERENCE_DATA_DEFAULTS, **SPEED_DEFAULTS},
    "vlm_recipes.kto": {**kto.VISION_KTO_DEFAULTS, **kto.UNPAIRED_DATA_DEFAULTS},
}

# The training methods, each with its TRL config in the `training` table's columns (evaluate reuses SFT's).
TRAINING_METHODS = {
    "vlm_recipes.sft": "SFT",
    "vlm_recipes.dpo": "DPO",
    "vlm_recipes.grpo": "GRPO",
    "vlm_recipes.kto": "KTO",
}

TRAINING_PART = "training"  # SFTConfig for SFT, DPOConfig for DPO, ...: one table with a default column for each


def _init_fields(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls) if f.init}


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def yaml_value(value: Any) -> str:
    """A default as a recipe writes it, in code format."""
    if value is dataclasses.MISSING:
        return "(required)"
    if isinstance(value, enum.Enum):
        value = value.value
    if value is None:
        text = "null"
    elif isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, (list, tuple)):
        text = "[" + ", ".join(yaml_value(item).strip("`") for item in value) + "]"
    elif isinstance(value, dict):
        text = "{" + ", ".join(f"{key}: {yaml_value(item).strip('`')}" for key, item in value.items()) + "}"
    elif value == "":
        text = '""'
    else:
        text = str(value)
    return f"`{text}`"


def type_name(annotation: Any) -> str:
    """`int`; `str` or `None`; `SchedulerType` or `str`: module paths dropped, no pipes (they split table cells)."""
    text = annotation.__name__ if isinstance(annotation, type) else str(annotation)
    text = re.sub(r"\b(?:[A-Za-z_]\w*\.)+([A-Za-z_]\w*)", r"\1", text).replace("NoneType", "None")
    alternatives = [f"`{part.strip()}`" for part in text.split(" | ")]
    return alternatives[0] if len(alternatives) == 1 else ", ".join(alternatives[:-1]) + " or " + alternatives[-1]


def help_text(f: dataclasses.Field) -> str:
    """The field's help as one table cell: inline code kept, Markdown and HTML specials outside it escaped."""
    text = " ".join(str(f.metadata.get("help", "")).split())
    choices = f.metadata.get("choices")
    if choices and not all(str(choice) in text for choice in choices):
        text += " One of: " + ", ".join(f"`{choice}`" for choice in choices) + "."
    pieces = re.split(r"(`[^`]*`)", text)
    for index in range(0, len(pieces), 2):  # the even pieces are outside inline code
        piece = pieces[index].replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
        pieces[index] = re.sub(r"([*_\[\]\\])", r"\\\1", piece)
    return "".join(pieces).replace("|", "\\|")


def _anchor(name: str) -> str:
    # One id per field, so that other pages can link to reference.md#field-NAME.
    return f'<span id="field-{name}"></span>`{name}`'


def _doc(cls: type) -> str:
    return " ".join((cls.__doc__ or "").split())


def _default_cell(f: dataclasses.Field, commands: list[str]) -> str:
    """What a recipe that leaves the field out gets from `commands`, beside the dataclass default where they differ."""
    declared = yaml_value(_default(f))
    overrides = {
        command: yaml_value(DEFAULTS_OVER_TRL[command][f.name])
        for command in commands
        if f.name in DEFAULTS_OVER_TRL.get(command, {})
    }
    if not overrides:
        return declared
    if len(commands) == 1:  # a column of its own command
        return f"{overrides[commands[0]]} (TRL: {declared})"
    return declared + "".join(f"; {command.rsplit('.', 1)[-1]}: {value}" for command, value in overrides.items())


def _declared_types(cls: type) -> dict[str, Any]:
    """Each field's annotation as written in the class. `HfArgumentParser` rewrites `Field.type` in place (it drops
    `| None`), so reading `f.type` would make the page depend on whether a parser was built earlier in the process."""
    try:
        return typing.get_type_hints(cls)
    except Exception:  # an annotation that cannot be resolved: fall back to the (possibly rewritten) field types
        return {f.name: f.type for f in dataclasses.fields(cls)}


def _field_table(cls: type, anchored: set[str]) -> list[str]:
    lines = ["| field | type | default | help |", "| --- | --- | --- | --- |"]
    declared = _declared_types(cls)
    for name, f in _init_fields(cls).items():
        default = _default_cell(f, list(DEFAULTS_OVER_TRL))
        lines.append(
            f"| {_name_cell(name, anchored)} | {type_name(declared.get(name, f.type))} | {default} | {help_text(f)} |"
        )
    return lines


def _name_cell(name: str, anchored: set[str]) -> str:
    """The field's name, with its anchor where the page first lists it (GRPO's `max_length` is a reward setting, the
    other methods' a TRL one: one anchor)."""
    if name in anchored:
        return f"`{name}`"
    anchored.add(name)
    return _anchor(name)


def _per_method(texts: dict[str, str]) -> str:
    """One text when every method has the same, else each distinct text after the methods that have it."""
    by_text: dict[str, list[str]] = {}
    for method, text in texts.items():
        by_text.setdefault(text, []).append(method)
    if len(by_text) == 1:
        return next(iter(by_text))
    return "<br>".join(f"{', '.join(methods)}: {text}" for text, methods in by_text.items())


def _training_table(configs: dict[str, type], anchored: set[str]) -> list[str]:
    """`configs`: command -> its TRL config class, in column order."""
    fields_of = {command: _init_fields(config) for command, config in configs.items()}
    types_of = {command: _declared_types(config) for command, config in configs.items()}
    names = list(dict.fromkeys(name for fields in fields_of.values() for name in fields))
    methods = [TRAINING_METHODS[command] for command in configs]
    lines = [
        "| field | type | " + " | ".join(f"{method} default" for method in methods) + " | help |",
        "| --- | --- | " + " | ".join("---" for _ in methods) + " | --- |",
    ]
    for name in names:
        present = {command: fields[name] for command, fields in fields_of.items() if name in fields}
        defaults = [
            _default_cell(present[command], [command]) if command in present else "(no such field)"
            for command in configs
        ]
        types = _per_method(
            {TRAINING_METHODS[c]: type_name(types_of[c].get(name, f.type)) for c, f in present.items()}
        )
        text = _per_method({TRAINING_METHODS[c]: help_text(f) for c, f in present.items()})
        lines.append(f"| {_name_cell(name, anchored)} | {types} | {' | '.join(defaults)} | {text} |")
    return lines


def _parts_in_order() -> dict[str, list[type]]:
    """Recipe part name -> its dataclasses, each once, in the order the commands first name them."""
    parts: dict[str, list[type]] = {}
    for command_parts in COMMAND_PARTS.values():
        for part, cls in command_parts.items():
            classes = parts.setdefault(part, [])
            if cls not in classes:
                classes.append(cls)
    return parts


def _part_title(part: str, classes: list[type]) -> str:
    names = " and ".join(f"`{cls.__name__}`" for cls in classes)
    return f"## {part}\n\n{names}"


def render() -> str:
    """The whole reference page."""
    parts = _parts_in_order()
    lines = [
        "# Recipe field reference",
        "",
        "<!-- Generated by `python -m vlm_recipes.docs_reference` from the dataclasses; do not edit by hand. -->",
        "",
        "Every field below can go in a recipe YAML file (`field: value`, at the top level: the parts only group this "
        "page) or on the command line (`--field value`), where it wins over the file. An unknown field stops the run "
        "with the closest known name. `python -m vlm_recipes.sft --help` prints the same list for one command. "
        "Generated from the dataclasses the entry points parse (TRL "
        f"{trl.__version__}); [Recipes](recipes.md) explains how a recipe is put together.",
        "",
        "## Commands and their parts",
        "",
        "| command | recipe parts |",
        "| --- | --- |",
    ]
    for command, command_parts in COMMAND_PARTS.items():
        links = ", ".join(f"[{part}](#{part})" for part in command_parts)
        if command == "vlm_recipes.preflight":
            links = f"the parts of the recipe's entry point (sft, dpo, grpo or kto, with [reliability](#reliability)), {links}"
        lines.append(f"| `python -m {command}` | {links} |")
    lines += [
        "",
        "## Defaults that differ from TRL's",
        "",
        "Applied when neither the recipe nor the command line sets the field; the tables below show them beside the "
        "dataclass default.",
        "",
        "| command | field | default here |",
        "| --- | --- | --- |",
    ]
    for command, defaults in DEFAULTS_OVER_TRL.items():
        for name, value in defaults.items():
            lines.append(f"| `python -m {command}` | [`{name}`](#field-{name}) | {yaml_value(value)} |")
    lines += [
        "",
        "Without a GPU (or another accelerator), `use_cpu` is set to `true` unless the recipe sets it. On a GPU "
        "machine, `dataloader_num_workers` defaults to one less than the CPU cores per GPU, at most "
        f"{MAX_DEFAULT_WORKERS}.",
    ]
    anchored: set[str] = set()
    for part, classes in parts.items():
        lines += ["", _part_title(part, classes), ""]
        if part == TRAINING_PART:
            configs = {command: COMMAND_PARTS[command][TRAINING_PART] for command in TRAINING_METHODS}
            lines += [
                "TRL's training arguments: `SFTConfig` for `vlm_recipes.sft` and `vlm_recipes.evaluate`, `DPOConfig` "
                "for `vlm_recipes.dpo`, `GRPOConfig` for `vlm_recipes.grpo`, `KTOConfig` for `vlm_recipes.kto`; all "
                "extend transformers' `TrainingArguments`.",
                "",
                *_training_table(configs, anchored),
            ]
            continue
        for cls in classes:
            lines += [_doc(cls), "", *_field_table(cls, anchored)]
    return "\n".join(lines) + "\n"


HELP_DIR = Path(__file__).parent / "help"  # the package's stored `--help` texts


def option_parser(command: str) -> argparse.ArgumentParser:
    """The parser of a command that takes options rather than a recipe (chat, merge, push, launch-check, tiny): its
    module's `build_parser`, found through the command table (the tiny-model builder lives in `testing`, which no
    product module imports)."""
    return importlib.import_module(COMMANDS[command].module).build_parser()


HELP_WIDTH = 100


def _plain(text: str) -> str:
    return " ".join(str(text).split())


def _help_option(name: str, f: dataclasses.Field, declared: Any, default: str) -> list[str]:
    """One field as `--name TYPE` and its wrapped help with choices and default."""
    choices = f.metadata.get("choices")
    kind = "{true,false}" if declared is bool or str(declared) == "bool | None" else type_name(declared)
    kind = "{" + ",".join(map(str, choices)) + "}" if choices else kind.replace("`", "")
    text = _plain(f.metadata.get("help", "")) or "(no description)"
    text = f"{text} (default: {default})"
    body = textwrap.fill(text, HELP_WIDTH, initial_indent=" " * 6, subsequent_indent=" " * 6)
    return [f"  --{name} {kind}", body]


def _help_default(f: dataclasses.Field, command: str) -> str:
    return _default_cell(f, [command]).replace("`", "")


def _recipe_help(name: str, module: str, parts: dict[str, type]) -> str:
    """A recipe command's `--help`: usage, the three ways to run it, then every field by recipe part, the package's
    own parts first and TRL's training arguments last."""
    doc = sys.modules[module].__doc__ or ""
    lines = [
        f"usage: vlm-recipes {name} RECIPE.yaml [--FIELD VALUE ...]",
        f"       python -m {module} RECIPE.yaml [--FIELD VALUE ...]",
        f"       accelerate launch [--config_file CONFIG] -m {module} RECIPE.yaml [--FIELD VALUE ...]",
        "",
        _plain(doc.splitlines()[0]),
        "",
        *textwrap.wrap(
            "A recipe file sets fields as `field: value`; any field can also be given on the command line, which wins "
            "over the file. Booleans: `--field` alone is true, `--field false` false. docs/reference.md has the same "
            "fields as tables.",
            HELP_WIDTH,
        ),
    ]
    if module == "vlm_recipes.preflight":
        lines += textwrap.wrap(
            "Preflight also takes every field of the recipe's entry point (its `# entry point:` line, else SFT): "
            "see `vlm-recipes sft --help` and `vlm-recipes dpo --help`.",
            HELP_WIDTH,
        )
    ordered = sorted(parts.items(), key=lambda item: (item[0] == TRAINING_PART, item[0] != "command"))
    for part, cls in ordered:
        declared = _declared_types(cls)
        source = f"TRL's {cls.__name__}" if part == TRAINING_PART else cls.__name__
        summary = _plain((cls.__doc__ or "").strip().split("\n\n")[0])  # TRL's class docs go on for pages
        lines += [
            "",
            f"{part} ({source}):",
            *textwrap.wrap(summary, HELP_WIDTH, initial_indent="  ", subsequent_indent="  "),
        ]
        for field_name, f in _init_fields(cls).items():
            if field_name.startswith("_"):
                continue
            lines += _help_option(field_name, f, declared.get(field_name, f.type), _help_default(f, module))
    return "\n".join(lines) + "\n"


def render_help() -> dict[str, str]:
    """Help file name -> its text, for every command with stored help."""
    texts = {}
    for name, command in COMMANDS.items():
        if command.module in COMMAND_PARTS:
            parts = COMMAND_PARTS[command.module]
            if command.module == "vlm_recipes.preflight":
                parts = {"command": preflight.PreflightArguments}
            texts[help_file(name)] = _recipe_help(name, command.module, parts)
        else:
            texts[help_file(name)] = option_parser(name).format_help()
    return texts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vlm_recipes.docs_reference", description=__doc__.splitlines()[0])
    parser.add_argument("--output", default=str(REFERENCE_PAGE), help="Where to write the page.")
    parser.add_argument("--help_dir", default=str(HELP_DIR), help="Where to write the commands' help files.")
    parser.add_argument("--check", action="store_true", help="Write nothing; exit 1 when the page is out of date.")
    args = parser.parse_args(argv)
    page, output = render(), Path(args.output)
    files = {output: page, **{Path(args.help_dir) / name: text for name, text in render_help().items()}}
    if args.check:
        stale = [
            path for path, text in files.items() if not path.is_file() or path.read_text(encoding="utf-8") != text
        ]
        for path in stale:
            print(f"{path} is out of date: run `python -m vlm_recipes.docs_reference`.", file=sys.stderr)
        if stale:
            return 1
        print(f"{output} and the commands' help are up to date.")
        return 0
    for path, text in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    print(f"Wrote {output} ({page.count(chr(10))} lines) and {len(files) - 1} help files in {args.help_dir}.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
