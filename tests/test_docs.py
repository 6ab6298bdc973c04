"""The documentation: the generated field reference matches the code, every internal link (README and docs/, anchors
included) resolves, and the MkDocs site builds with --strict."""

import os
import re
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest

from vlm_recipes import docs_reference


REPO_ROOT = Path(__file__).resolve().parents[1]
DOCS = REPO_ROOT / "docs"
README = REPO_ROOT / "README.md"

FENCE = re.compile(r"^(```|~~~).*?^\1", re.MULTILINE | re.DOTALL)
CODE_SPAN = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"!?\[[^\]\n]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*$", re.MULTILINE)
EXPLICIT_ID = re.compile(r"\{\s*#([\w-]+)[^}]*\}\s*$")
HTML_ID = re.compile(r"<[a-zA-Z][^>]*\sid=\"([^\"]+)\"")


def _without_code(text: str) -> str:
    return CODE_SPAN.sub("", FENCE.sub("", text))


def anchors(path: Path) -> set[str]:
    """The ids a page's headings and HTML elements get when MkDocs renders it (toc's slugify, `{#id}`, `id="..."`)."""
    from markdown.extensions.toc import slugify, unique

    text = FENCE.sub("", path.read_text(encoding="utf-8"))
    ids: set[str] = set(HTML_ID.findall(text))
    for _, title in HEADING.findall(text):
        explicit = EXPLICIT_ID.search(title)
        if explicit:
            ids.add(explicit.group(1))
            continue
        plain = re.sub(r"[`*_]", "", re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", title))
        ids.add(unique(slugify(plain, "-"), ids))
    return ids


def broken_links(path: Path) -> list[str]:
    """Each relative link of a Markdown file whose target file or anchor does not exist, as 'file: target (why)'."""
    problems = []
    for target in LINK.findall(_without_code(path.read_text(encoding="utf-8"))):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto:, ...
            continue
        file_part, _, anchor = target.partition("#")
        linked = (path.parent / file_part).resolve() if file_part else path
        if not linked.exists():
            problems.append(f"{path.name}: {target} (no such file)")
        elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
            problems.append(f"{path.name}: {target} (no anchor '{anchor}' in {linked.name})")
    return problems


def test_reference_page_is_generated_from_the_current_code():
    page = (DOCS / "reference.md").read_text(encoding="utf-8")
    assert page == docs_reference.render(), (
        "docs/reference.md is out of date: run `python -m vlm_recipes.docs_reference` and commit it."
    )


def test_reference_command_writes_the_page_and_check_reports_a_stale_one(tmp_path, capsys):
    page = tmp_path / "reference.md"
    page.write_text("# an old page\n", encoding="utf-8")
    assert docs_reference.main(["--output", str(page), "--check"]) == 1
    assert page.read_text(encoding="utf-8") == "# an old page\n"  # --check writes nothing
    assert "out of date" in capsys.readouterr().err
    assert docs_reference.main(["--output", str(page)]) == 0
    assert page.read_text(encoding="utf-8") == docs_reference.render()
    assert docs_reference.main(["--output", str(page), "--check"]) == 0


def test_reference_lists_every_recipe_field_of_every_command_once():
    page = docs_reference.render()
    for parts in docs_reference.COMMAND_PARTS.values():
        for cls in parts.values():
            for f in fields(cls):
                if f.init:
                    assert page.count(f'id="field-{f.name}"') == 1, f"{cls.__name__}.{f.name}"


def test_reference_shows_the_defaults_the_entry_points_apply_over_trl():
    rows = {
        line.split("`")[1]: line for line in docs_reference.render().splitlines() if line.startswith('| <span id="')
    }
    # SFT and DPO: no max_length (TRL's 1024 cuts image tokens); SFT only: loss on the answers; DPO reads RLAIF-V rows.
    assert "| `null` (TRL: `1024`) | `null` (TRL: `1024`) |" in rows["max_length"]
    assert "| `true` (TRL: `false`) | (no such field) |" in rows["assistant_only_loss"]
    assert "| `chartqa`; dpo: `rlaif_v` |" in rows["formatter"]
    assert "| `2e-05` | `1e-06` |" in rows["learning_rate"]  # TRL's own per-method defaults, each in its column


def test_reference_help_text_cannot_break_the_table():
    from vlm_recipes.configs import ReliabilityArguments

    check_data = next(f for f in fields(ReliabilityArguments) if f.name == "check_data")
    cell = docs_reference.help_text(check_data)
    assert "`<image>`" in cell  # inline code kept as written
    assert docs_reference.type_name(int | None) == "`int` or `None`"  # no pipe to split the row


def test_the_link_checker_finds_missing_files_and_anchors(tmp_path):
    (tmp_path / "target.md").write_text('# A title\n\n## Second part {#second}\n\n<span id="field-x"></span>\n')
    page = tmp_path / "page.md"
    page.write_text(
        "[ok](target.md#a-title) [ok](target.md#second) [ok](target.md#field-x) [ok](#here) `[code](nothing.md)`\n"
        "## Here\n[bad](missing.md) [bad](target.md#nowhere) [web](https://example.com/x.md)\n"
    )
    assert broken_links(page) == [
        "page.md: missing.md (no such file)",
        "page.md: target.md#nowhere (no anchor 'nowhere' in target.md)",
    ]


def test_every_internal_link_of_the_readme_and_the_docs_resolves():
    pages = [README, *sorted(DOCS.glob("*.md"))]
    assert len(pages) > 10
    problems = [problem for page in pages for problem in broken_links(page)]
    assert problems == []


def test_every_docs_page_is_in_the_site_navigation():
    import yaml

    config = yaml.safe_load((REPO_ROOT / "mkdocs.yml").read_text(encoding="utf-8"))
    in_nav = {next(iter(entry.values())) for entry in config["nav"]}
    assert in_nav == {page.name for page in DOCS.glob("*.md")}


def test_readme_stays_a_front_page():
    readme = README.read_text(encoding="utf-8")
    assert len(readme) <= 12_500, f"README.md has {len(readme):,} characters: move detail into a docs/ page"
    assert "make demo" in readme and "make test" in readme
    assert "source .venv/bin/activate" in readme


@pytest.mark.e2e
def test_site_builds_with_strict_link_checks(tmp_path):
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "site" / "reference" / "index.html").is_file()
    assert 'id="field-max_length"' in (tmp_path / "site" / "reference" / "index.html").read_text(encoding="utf-8")
