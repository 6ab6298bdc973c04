"""Write docs/reference.md, the recipe field reference, from the dataclasses the entry points parse.

    python -m vlm_recipes.docs_reference [--output docs/reference.md] [--check]

Every field a recipe (or the command line) can set is listed once, by recipe part, with its type, default and help
text: the package's own dataclasses (`vlm_recipes.configs`, the evaluate and preflight options) and TRL's
`ModelConfig`, `SFTConfig` and `DPOConfig`. `--check` writes nothing and exits with 1 when the file is out of date
(tests/test_docs.py does the same), so the page cannot drift from the code.
"""

import argparse
import dataclasses
import enum
import re
import sys
import typing
from pathlib import Path
from typing import Any

import trl

from vlm_recipes import dpo, evaluate, preflight, sft
from vlm_recipes.training.speed import MAX_DEFAULT_WORKERS, SPEED_DEFAULTS


REFERENCE_PAGE = Path("docs/reference.md")  # relative to the repository root, where `make docs` runs

# The recipe parts of each command, in the order its `--help` lists them. Preflight also takes every part of the
# entry point the recipe is for (its `# entry point:` line), so only its own options are named here.
COMMAND_PARTS = {
    "vlm_recipes.sft": sft.SFTRecipe.parts(),
    "vlm_recipes.dpo": dpo.DPORecipe.parts(),
    "vlm_recipes.evaluate": evaluate.EvaluateRecipe.parts(),
    "vlm_recipes.preflight": {"preflight": preflight.PreflightArguments},
}

# Where the entry points set their own defaults over TRL's (when the recipe does not set the field).
DEFAULTS_OVER_TRL = {
    "vlm_recipes.sft": {**sft.VISION_SFT_DEFAULTS, **SPEED_DEFAULTS},
    "vlm_recipes.dpo": {**dpo.VISION_DPO_DEFAULTS, **dpo.PREFERENCE_DATA_DEFAULTS, **SPEED_DEFAULTS},
}

TRAINING_PART = "training"  # SFTConfig for SFT, DPOConfig for DPO: one table with a default column for each


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


def _field_table(cls: type) -> list[str]:
    lines = ["| field | type | default | help |", "| --- | --- | --- | --- |"]
    declared = _declared_types(cls)
    for name, f in _init_fields(cls).items():
        default = _default_cell(f, list(DEFAULTS_OVER_TRL))
        lines.append(f"| {_anchor(name)} | {type_name(declared.get(name, f.type))} | {default} | {help_text(f)} |")
    return lines


def _per_method(sft_text: str, dpo_text: str) -> str:
    return sft_text if sft_text == dpo_text else f"SFT: {sft_text}<br>DPO: {dpo_text}"


def _training_table(sft_config: type, dpo_config: type) -> list[str]:
    sft_fields, dpo_fields = _init_fields(sft_config), _init_fields(dpo_config)
    sft_types, dpo_types = _declared_types(sft_config), _declared_types(dpo_config)
    names = list(sft_fields) + [name for name in dpo_fields if name not in sft_fields]
    lines = ["| field | type | SFT default | DPO default | help |", "| --- | --- | --- | --- | --- |"]
    for name in names:
        in_sft, in_dpo = sft_fields.get(name), dpo_fields.get(name)
        sft_default = _default_cell(in_sft, ["vlm_recipes.sft"]) if in_sft else "(no such field)"
        dpo_default = _default_cell(in_dpo, ["vlm_recipes.dpo"]) if in_dpo else "(no such field)"
        if in_sft and in_dpo:
            types = _per_method(
                type_name(sft_types.get(name, in_sft.type)), type_name(dpo_types.get(name, in_dpo.type))
            )
            text = _per_method(help_text(in_sft), help_text(in_dpo))
        else:
            types = type_name(sft_types.get(name, in_sft.type) if in_sft else dpo_types.get(name, in_dpo.type))
            text = help_text(in_sft or in_dpo)
        lines.append(f"| {_anchor(name)} | {types} | {sft_default} | {dpo_default} | {text} |")
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
            links = f"the parts of the recipe's entry point (sft or dpo, with [reliability](#reliability)), {links}"
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
    for part, classes in parts.items():
        lines += ["", _part_title(part, classes), ""]
        if part == TRAINING_PART:
            sft_config, dpo_config = classes
            lines += [
                "TRL's training arguments: `SFTConfig` for `vlm_recipes.sft` and `vlm_recipes.evaluate`, `DPOConfig` "
                "for `vlm_recipes.dpo`; both extend transformers' `TrainingArguments`.",
                "",
                *_training_table(sft_config, dpo_config),
            ]
            continue
        for cls in classes:
            lines += [_doc(cls), "", *_field_table(cls)]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vlm_recipes.docs_reference", description=__doc__.splitlines()[0])
    parser.add_argument("--output", default=str(REFERENCE_PAGE), help="Where to write the page.")
    parser.add_argument("--check", action="store_true", help="Write nothing; exit 1 when the page is out of date.")
    args = parser.parse_args(argv)
    page, output = render(), Path(args.output)
    if args.check:
        current = output.read_text(encoding="utf-8") if output.is_file() else ""
        if current != page:
            print(f"{output} is out of date: run `python -m vlm_recipes.docs_reference`.", file=sys.stderr)
            return 1
        print(f"{output} is up to date.")
        return 0
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(page, encoding="utf-8")
    print(f"Wrote {output} ({page.count(chr(10))} lines).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
