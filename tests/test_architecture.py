"""The package's modules import each other in one direction: no import cycles (function-level imports included), and no
lower layer importing a higher one. Read from the source with `ast`; nothing is imported."""

import ast
from pathlib import Path

import pytest
from conftest import SRC


PACKAGE = "vlm_recipes"

# Lowest first. A module may import modules of its own layer (without a cycle) and of the layers below. Every module of
# the package belongs to exactly one layer: a new module is placed here.
LAYERS = {
    # recipe fields, parsing, errors, console, processes, the run folder's names, the libraries' private parts
    "foundation": (
        "vlm_recipes",
        "vlm_recipes.cli",  # the `vlm-recipes` command: the table of subcommands, stored help, option style
        "vlm_recipes.compat",
        "vlm_recipes.configs",
        "vlm_recipes.console",
        "vlm_recipes.errors",
        "vlm_recipes.processes",
        "vlm_recipes.recipe",
        "vlm_recipes.run_folder",
    ),
    "data": ("vlm_recipes.data",),
    "modeling": ("vlm_recipes.modeling", "vlm_recipes.tasks", "vlm_recipes.evaluation"),
    "training": ("vlm_recipes.training", "vlm_recipes.hub"),
    "entry points": (
        "vlm_recipes.sft",
        "vlm_recipes.dpo",
        "vlm_recipes.grpo",
        "vlm_recipes.kto",
        "vlm_recipes.evaluate",
        "vlm_recipes.preflight",
        "vlm_recipes.merge",
        "vlm_recipes.chat",
        "vlm_recipes.chat_ui",  # `chat --ui`: the chat session in a Gradio page
        "vlm_recipes.push",
        "vlm_recipes.launch_check",
        "vlm_recipes.docs_reference",  # writes docs/reference.md from the entry points' recipes
    ),
    "testing": ("vlm_recipes.testing",),  # tiny models for tests, demos and benchmarks: nothing imports it
}


def module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_imports(root: Path, package: str = PACKAGE) -> dict[str, set[str]]:
    """Module -> the package's modules it imports anywhere in its source (module level or inside functions)."""
    files = {module_name(path, root): path for path in (root / package).rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for module, path in files.items():
        is_package = path.name == "__init__.py"
        imported = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
            if isinstance(node, ast.Import):
                imported.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the module's own package upwards
                    anchor = module.split(".") if is_package else module.split(".")[:-1]
                    anchor = anchor[: len(anchor) - node.level + 1]
                    base = ".".join([*anchor, *filter(None, [node.module])])
                for alias in node.names:  # `from package import module` imports that module
                    imported.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in files else base)
        graph[module] = {name for name in imported if name in files and name != module}
    return graph


def layer_of(module: str) -> int:
    found = [
        (index, prefix)
        for index, prefixes in enumerate(LAYERS.values())
        for prefix in prefixes
        if module == prefix or (prefix != PACKAGE and module.startswith(prefix + "."))
    ]
    assert found, f"{module} belongs to no layer: place it in LAYERS in tests/test_architecture.py"
    return max(found, key=lambda item: len(item[1]))[0]  # the most specific prefix


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    names = list(LAYERS)
    return sorted(
        f"{module} ({names[layer_of(module)]}) imports {target} ({names[layer_of(target)]})"
        for module, targets in graph.items()
        for target in targets
        if layer_of(target) > layer_of(module)
    )


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None."""
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = "open"
        stack.append(module)
        for target in sorted(graph.get(module, ())):
            if state.get(target) == "open":
                return stack[stack.index(target) :] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        stack.pop()
        state[module] = "done"
        return None

    for module in sorted(graph):
        if module not in state and (cycle := visit(module)):
            return cycle
    return None


@pytest.fixture(scope="module")
def graph():
    return package_imports(SRC)


def test_every_module_has_a_layer(graph):
    for module in graph:
        layer_of(module)


def test_no_import_cycles(graph):
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_lower_layer_imports_a_higher_one(graph):
    violations = upward_imports(graph)
    assert not violations, "\n".join(violations)


def test_no_product_module_imports_the_testing_package(graph):
    assert not [module for module, targets in graph.items() if "vlm_recipes.testing.tiny_models" in targets]


def test_the_checks_see_function_level_imports_cycles_and_upward_imports(tmp_path):
    """A planted package: data imports training inside a function, training imports data back."""
    package = tmp_path / PACKAGE
    (package / "data").mkdir(parents=True)
    (package / "training").mkdir()
    for init in (package / "__init__.py", package / "data" / "__init__.py", package / "training" / "__init__.py"):
        init.write_text("")
    (package / "data" / "checks.py").write_text("def f():\n    from vlm_recipes.training import run\n")
    (package / "training" / "run.py").write_text("from vlm_recipes.data.checks import f\nfrom . import guards\n")
    (package / "training" / "guards.py").write_text("import vlm_recipes.errors\n")
    planted = package_imports(tmp_path)
    assert planted["vlm_recipes.data.checks"] == {"vlm_recipes.training.run"}
    assert planted["vlm_recipes.training.run"] == {"vlm_recipes.data.checks", "vlm_recipes.training.guards"}
    assert find_cycle(planted) == ["vlm_recipes.data.checks", "vlm_recipes.training.run", "vlm_recipes.data.checks"]
    assert upward_imports(planted) == ["vlm_recipes.data.checks (data) imports vlm_recipes.training.run (training)"]
