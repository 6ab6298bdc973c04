"""The `vlm-recipes` command line: one table of subcommands, each running its module's entry function with the rest of
the command line; `--help` answered from the package's stored help without importing torch or the trainers."""

import ast
import importlib.util
import subprocess
import sys
import time
import types

import pytest
from conftest import REPO_ROOT, SRC

from vlm_recipes import cli


HEAVY = ("torch", "transformers", "trl", "peft", "accelerate", "datasets")


def run_cli(*args: str) -> tuple[subprocess.CompletedProcess, float, list[str]]:
    """`vlm-recipes ARGS` in a fresh interpreter; also returns the seconds it took and the heavy libraries it
    imported."""
    code = (
        "import sys\n"
        "from vlm_recipes import cli\n"
        "try:\n"
        f"    code = cli.main({list(args)!r})\n"
        "except SystemExit as stop:\n"
        "    code = stop.code\n"
        f"heavy = sorted({{m.split('.')[0] for m in sys.modules}} & {set(HEAVY)!r})\n"
        "print('HEAVY:' + ','.join(heavy), file=sys.stderr)\n"
        "sys.exit(code)\n"
    )
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env={"PYTHONPATH": str(SRC), "PATH": ""}
    )
    seconds = time.perf_counter() - start
    heavy = result.stderr.rsplit("HEAVY:", 1)[-1].strip().split(",") if "HEAVY:" in result.stderr else ["?"]
    return result, seconds, [name for name in heavy if name]


def test_the_console_script_is_the_cli():
    pyproject = (REPO_ROOT / "pyproject.toml").read_text(encoding="utf-8")  # (tomllib needs Python 3.11)
    scripts = pyproject.split("[project.scripts]\n", 1)[1].split("\n\n", 1)[0].splitlines()
    assert 'vlm-recipes = "vlm_recipes.cli:main"' in scripts
    package_data = pyproject.split("[tool.setuptools.package-data]\n", 1)[1].split("\n", 1)[0]
    assert '"help/*.txt"' in package_data  # the stored help ships with the wheel


@pytest.mark.parametrize("name", list(cli.COMMANDS))
def test_every_command_names_a_module_with_its_entry_function(name):
    command = cli.COMMANDS[name]
    spec = importlib.util.find_spec(command.module)
    assert spec is not None, command.module
    tree = ast.parse(open(spec.origin, encoding="utf-8").read())
    functions = {node.name: node for node in tree.body if isinstance(node, ast.FunctionDef)}
    assert command.function in functions, f"{command.module} has no {command.function}()"
    assert functions[command.function].args.args, f"{command.module}.{command.function} takes no argv"


def test_overview_and_each_commands_help_print_without_importing_torch_or_the_trainers():
    result, seconds, heavy = run_cli("--help")
    assert result.returncode == 0 and heavy == []
    for name, command in cli.COMMANDS.items():
        assert f"  {name}" in result.stdout and command.module in result.stdout
    assert "accelerate launch" in result.stdout
    result, seconds, heavy = run_cli("sft", "--help")
    assert result.returncode == 0, result.stderr
    assert heavy == [], f"`vlm-recipes sft --help` imported {heavy}"
    assert result.stdout == cli.stored_help("sft")
    assert seconds < 10  # measured 0.3 s on an idle 2-core machine; the bound only catches a heavy import path


def test_recipe_help_is_grouped_with_the_package_parts_first_and_defaults_shown():
    text = cli.stored_help("sft")
    headings = [line for line in text.splitlines() if line and not line.startswith(" ") and line.endswith("):")]
    assert [heading.split(" ")[0] for heading in headings] == [
        "data",
        "model",
        "tuning",
        "run",
        "reliability",
        "speed",
        "evaluation",
        "training",
    ]
    assert "training (TRL's SFTConfig):" in headings
    assert "python -m vlm_recipes.sft" in text and "accelerate launch" in text
    block = text.split("  --assistant_only_loss {true,false}\n", 1)[1].split("\n  --", 1)[0]
    assert "(default: true (TRL: false))" in " ".join(block.split())  # our default over TRL's, beside it
    evaluate = cli.stored_help("evaluate")
    assert evaluate.index("command (EvaluateCommandArguments):") < evaluate.index("data (DataArguments):")
    assert "(no description)" not in cli.stored_help("evaluate").split("training (TRL's")[0]


def test_option_commands_describe_every_option_and_use_one_boolean_style():
    for name in ("chat", "merge", "push", "launch-check", "tiny"):
        text = cli.stored_help(name)
        assert text.startswith(f"usage: vlm-recipes {name}")
        assert "[{true,false}]" in text or name == "launch-check"
    chat = cli.stored_help("chat")
    assert "--question QUESTION" in chat and "Answer this one question" in chat
    assert "(default: 128)" in chat


def test_launch_check_help_prints_help_instead_of_running(capsys, monkeypatch):
    from vlm_recipes import launch_check

    monkeypatch.setattr(launch_check, "PartialState", lambda **_: pytest.fail("the check ran"))
    with pytest.raises(SystemExit) as stop:
        launch_check.main(["--help"])
    assert stop.value.code == 0
    assert "usage: vlm-recipes launch-check" in capsys.readouterr().out


def test_a_command_runs_its_module_with_the_rest_of_the_command_line(monkeypatch):
    received = []
    module = types.ModuleType("fake_entry_point")
    module.main = received.append
    monkeypatch.setitem(sys.modules, "fake_entry_point", module)
    monkeypatch.setitem(cli.COMMANDS, "fake", cli.Command("fake_entry_point", "A command added in one line."))
    assert cli.main(["fake", "recipe.yaml", "--max_steps", "3"]) == 0
    assert received == [["recipe.yaml", "--max_steps", "3"]]
    assert "fake" in cli.overview()


def test_an_unknown_command_is_one_line_and_exit_code_2(capsys):
    assert cli.main(["sfft"]) == 2
    err = capsys.readouterr().err
    assert "unknown command 'sfft'" in err and "sft" in err and len(err.strip().splitlines()) == 1
