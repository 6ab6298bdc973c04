"""`vlm-recipes COMMAND ...`: one command line for every entry point.

    vlm-recipes sft recipes/chartqa.yaml --max_steps 200     # = python -m vlm_recipes.sft recipes/chartqa.yaml ...
    vlm-recipes evaluate recipes/chartqa.yaml --adapter outputs/run
    vlm-recipes sft --help                                    # the command's options, grouped by recipe part

Each subcommand runs its module's `main(argv)` with the rest of the command line, exactly as `python -m MODULE` does
(and as `accelerate launch -m MODULE` does on several processes). `--help` prints the help stored with the package
(`help/<command>.txt`, written by `python -m vlm_recipes.docs_reference` from the same parsers and checked by the
tests), so that it prints at once instead of after importing torch and the trainers.

This module imports nothing heavier than the standard library: it is the first thing every command runs.
"""

import argparse
import importlib
import sys
from dataclasses import dataclass
from importlib import resources


@dataclass(frozen=True)
class Command:
    module: str  # the module `python -m` runs
    summary: str  # one line for `vlm-recipes --help`
    function: str = "main"  # its entry function, called with the remaining arguments


# Adding a command is one line here (and its help file, which `python -m vlm_recipes.docs_reference` writes).
COMMANDS = {
    "sft": Command("vlm_recipes.sft", "Supervised fine-tuning from a recipe (LoRA, QLoRA, full)."),
    "dpo": Command("vlm_recipes.dpo", "Preference tuning (DPO) from a recipe, from the base or an SFT adapter."),
    "grpo": Command("vlm_recipes.grpo", "Reinforcement learning (GRPO) with the task's metrics as rewards."),
    "kto": Command("vlm_recipes.kto", "Preference tuning on unpaired good/bad answers (KTO)."),
    "evaluate": Command("vlm_recipes.evaluate", "Score a model (and an adapter) on the recipe's evaluation sets."),
    "preflight": Command("vlm_recipes.preflight", "Check data, lengths and memory before a run; loads no weights."),
    "chat": Command(
        "vlm_recipes.chat", "Chat about images with a model, or base vs adapter; in a web page with --ui."
    ),
    "merge": Command("vlm_recipes.merge", "Merge an adapter into its 16/32-bit base and save a full model."),
    "push": Command("vlm_recipes.push", "Push an output folder with its model card to the Hugging Face Hub."),
    "launch-check": Command("vlm_recipes.launch_check", "Check that every process of a launch joins and can talk."),
    "tiny": Command(
        "vlm_recipes.testing.tiny_models", "Build a tiny random model folder (offline tests, demos).", "cli"
    ),
}

HELP_FLAGS = ("-h", "--help")


def help_file(command: str) -> str:
    """The file name of a command's stored help, in the package's `help/` folder."""
    return f"{command.replace('-', '_')}.txt"


def stored_help(command: str) -> str | None:
    """The command's help text as stored with the package, or None where there is none."""
    path = resources.files("vlm_recipes") / "help" / help_file(command)
    return path.read_text(encoding="utf-8") if path.is_file() else None


def command_of_module(module: str) -> str | None:
    """The subcommand that runs `module` (`vlm_recipes.sft` -> `sft`)."""
    return next((name for name, command in COMMANDS.items() if command.module == module), None)


def print_stored_help_and_exit(module: str) -> None:
    """`--help` of an entry point run as `python -m MODULE`: the same text as `vlm-recipes COMMAND --help`."""
    command = command_of_module(module)
    text = stored_help(command) if command else None
    if text is not None:
        print(text, end="", flush=True)
        sys.exit(0)


def _string_to_bool(text: str) -> bool:
    if text.lower() in {"true", "yes", "1"}:
        return True
    if text.lower() in {"false", "no", "0"}:
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def add_bool_option(parser: argparse.ArgumentParser, name: str, help: str, default: bool | None = False) -> None:
    """A boolean option in the recipes' style: `--name` alone is true, `--name true|false` says which."""
    parser.add_argument(
        name, type=_string_to_bool, nargs="?", const=True, default=default, metavar="{true,false}", help=help
    )


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Defaults shown, and a fixed width: the stored help does not depend on the terminal that wrote it."""

    def __init__(self, prog: str, **kwargs):
        super().__init__(prog, width=100, max_help_position=32)

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.required:  # no "(default: None)": the help says what happens
            return action.help
        return super()._get_help_string(action)


def command_parser(prog: str, description: str) -> argparse.ArgumentParser:
    """The parser of a command that takes options rather than a recipe."""
    return argparse.ArgumentParser(prog=prog, description=description, formatter_class=_HelpFormatter)


def overview() -> str:
    width = max(map(len, COMMANDS))
    lines = [
        "usage: vlm-recipes COMMAND [ARGS ...]",
        "",
        "Fine-tune vision-language models with TRL, from a YAML recipe.",
        "",
        "commands:",
        *(f"  {name:<{width}}  {command.summary}" for name, command in COMMANDS.items()),
        "",
        "`vlm-recipes COMMAND --help` lists a command's options. Every command is also `python -m MODULE`,",
        "and on several processes `accelerate launch [--config_file ...] -m MODULE`:",
        *(f"  {name:<{width}}  {command.module}" for name, command in COMMANDS.items()),
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in HELP_FLAGS:
        print(overview(), end="")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"error: unknown command {name!r}. Commands: {', '.join(COMMANDS)}.", file=sys.stderr)
        return 2
    if any(flag in rest for flag in HELP_FLAGS) and (text := stored_help(name)) is not None:
        print(text, end="")
        return 0
    command = COMMANDS[name]
    sys.argv = [f"vlm-recipes {name}", *rest]
    getattr(importlib.import_module(command.module), command.function)(rest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
