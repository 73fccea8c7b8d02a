"""The README stays a manual, and what the docs point at exists: every relative link, every option, every command.

Options are read from where they are declared: the plugin's `pytest_addoption` and the `quantbench` parser
(`harness.cli.build_parser`), so an option renamed or dropped in code fails here until the docs follow.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import pytest

from harness import cli, plugin

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
CLI_PAGE = ROOT / "docs" / "cli.md"
MAX_README_LINES = 300
# the manual and its reference pages (docs/cli.md among them); the evidence pages quote the commands of past runs
MANUAL_PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]

# options of pytest and its plugins that the docs name, with the module that registers each
OTHER_TOOLS_OPTIONS = {
    "--junitxml": "_pytest",
    "--benchmark-disable": "pytest_benchmark",
    "--benchmark-json": "pytest_benchmark",
    "--benchmark-autosave": "pytest_benchmark",
    "--dist": "xdist",
}

_FENCE = re.compile(r"^\s*(```|~~~)")
_INLINE_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+[\"'][^)]*[\"'])?\s*\)")
_REFERENCE_LINK = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$")
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")
_OPTION = re.compile(r"(?<![\w-])--[a-z][a-z0-9]*(?:-[a-z0-9]+)*")
_COMMAND = re.compile(r"(?:`|^\s*)quantbench ([a-z][a-z-]*)", re.MULTILINE)


def doc_pages() -> list[Path]:
    """The README and every page under docs/."""
    return [README, *sorted((ROOT / "docs").rglob("*.md"))]


def _prose_lines(text: str) -> list[tuple[int, str]]:
    """(line number, line) of `text` outside fenced code blocks, where a link is a link."""
    lines, fenced = [], False
    for number, line in enumerate(text.splitlines(), 1):
        if _FENCE.match(line):
            fenced = not fenced
        elif not fenced:
            lines.append((number, line))
    return lines


def broken_links(page: Path) -> list[str]:
    """The relative links of a markdown page whose target does not exist (anchors ignored), as `page:line: target`.

    Links with a scheme (https:, mailto:) and links to an anchor of the page itself are not checked; a path that
    starts with `/` is taken from the repository's root, as GitHub does.
    """
    broken = []
    for number, line in _prose_lines(page.read_text(encoding="utf-8")):
        targets = _INLINE_LINK.findall(line) + _REFERENCE_LINK.findall(line)
        for target in targets:
            if _SCHEME.match(target) or target.startswith("#"):
                continue
            path = unquote(target.split("#", 1)[0].split("?", 1)[0])
            resolved = ROOT / path.lstrip("/") if path.startswith("/") else page.parent / path
            if not resolved.exists():
                broken.append(f"{page.relative_to(ROOT) if page.is_relative_to(ROOT) else page}:{number}: {target}")
    return broken


def mentioned_options(text: str) -> set[str]:
    """Every `--option` a page names, in prose and in code."""
    return set(_OPTION.findall(text))


class _OptionRecorder:
    """Stands in for pytest's parser and its option groups: records the option names `pytest_addoption` declares."""

    def __init__(self) -> None:
        self.names: set[str] = set()

    def getgroup(self, name: str, description: str = "", after: str | None = None) -> _OptionRecorder:
        return self

    def addoption(self, *names: str, **attrs: Any) -> None:
        self.names.update(names)

    def addini(self, *args: Any, **kwargs: Any) -> None:
        pass


def plugin_options() -> set[str]:
    """The command-line options harness/plugin.py registers with pytest."""
    recorder = _OptionRecorder()
    plugin.pytest_addoption(recorder)  # type: ignore[arg-type]
    return recorder.names


def parser_options(parser: argparse.ArgumentParser) -> set[str]:
    """The options of an argparse parser and of all its subcommands."""
    names: set[str] = set()
    for action in parser._actions:
        names.update(action.option_strings)
        if isinstance(action, argparse._SubParsersAction):
            for subparser in action.choices.values():
                names |= parser_options(subparser)
    return names


def subcommands(parser: argparse.ArgumentParser) -> set[str]:
    """The subcommand names of an argparse parser."""
    return {name for action in parser._actions if isinstance(action, argparse._SubParsersAction)
            for name in action.choices}


def unknown_options(text: str) -> list[str]:
    """The `--options` named in `text` that neither the plugin, nor `quantbench`, nor OTHER_TOOLS_OPTIONS has."""
    known = plugin_options() | parser_options(cli.build_parser()) | OTHER_TOOLS_OPTIONS.keys()
    return sorted(mentioned_options(text) - known)


def test_the_readme_is_a_manual_of_at_most_300_lines() -> None:
    lines = len(README.read_text(encoding="utf-8").splitlines())
    assert lines <= MAX_README_LINES, (f"README.md has {lines} lines, more than {MAX_README_LINES}: move reference "
                                       "material to a page under docs/ and link it")


@pytest.mark.parametrize("page", doc_pages(), ids=lambda page: str(page.relative_to(ROOT)))
def test_every_relative_link_resolves(page: Path) -> None:
    assert broken_links(page) == []


def test_the_link_checker_finds_a_broken_link(tmp_path: Path) -> None:
    (tmp_path / "there.md").write_text("x\n")
    page = tmp_path / "page.md"
    page.write_text("[ok](there.md) and [ok too](there.md#part) and [web](https://example.org/none)\n"
                    "[self](#section), [gone](missing.md#part), ![picture](img/none.png)\n"
                    "```\n[in code](not-checked.md)\n```\n"
                    "[ref]: ./also-missing.md\n")
    found = broken_links(page)
    assert [line.split(":", 1)[1] for line in found] == ["2: missing.md#part", "2: img/none.png",
                                                         "6: ./also-missing.md"]


@pytest.mark.parametrize("page", MANUAL_PAGES, ids=lambda page: str(page.relative_to(ROOT)))
def test_every_option_the_docs_name_exists(page: Path) -> None:
    assert unknown_options(page.read_text(encoding="utf-8")) == [], (
        f"{page.relative_to(ROOT)} names options that harness/plugin.py and harness/cli.py do not declare")


def test_the_option_checker_finds_an_option_nobody_declares() -> None:
    text = "Run `pytest --update-baselines --no-such-option` or `quantbench gate --failures-only --gate-harder`."
    assert unknown_options(text) == ["--gate-harder", "--no-such-option"]


def test_the_options_are_read_from_the_plugin_and_the_cli() -> None:
    """The collectors see what each front end declares (an empty set would let every check pass)."""
    assert {"--update-baselines", "--strict-baselines", "--tolerance", "--processes"} <= plugin_options()
    assert {"--baselines-dir", "--pool", "--failures-only", "--write"} <= parser_options(cli.build_parser())
    assert "--failures-only" not in plugin_options()


@pytest.mark.parametrize("option", sorted(OTHER_TOOLS_OPTIONS))
def test_the_other_tools_options_exist(option: str, pytestconfig: pytest.Config) -> None:
    """The options of pytest and its plugins that the docs name are registered in this session."""
    pytest.importorskip(OTHER_TOOLS_OPTIONS[option])
    pytestconfig.getoption(option)  # raises ValueError for an option nobody registered


@pytest.mark.parametrize("page", [README, CLI_PAGE], ids=lambda page: str(page.relative_to(ROOT)))
def test_every_quantbench_command_the_docs_name_exists(page: Path) -> None:
    named = set(_COMMAND.findall(page.read_text(encoding="utf-8")))
    assert named, f"{page.relative_to(ROOT)} names no quantbench command"
    assert sorted(named - subcommands(cli.build_parser())) == []


REAL_MODEL_PAGE = ROOT / "docs" / "real-model.md"


def test_the_real_model_page_is_what_quantbench_real_model_writes_from_the_committed_baselines() -> None:
    """docs/real-model.md is generated, never typed: regenerate it with the command its first lines name."""
    from harness.baselines import BaselineStore
    from harness.report import real_model_page

    expected = real_model_page(BaselineStore(ROOT / "baselines"), "cpu-intel-xeon-amx-2c", "smollm2-135m")
    assert REAL_MODEL_PAGE.read_text(encoding="utf-8") == expected, (
        "docs/real-model.md differs from the committed baselines: quantbench real-model cpu-intel-xeon-amx-2c "
        "smollm2-135m --out docs/real-model.md")


def test_the_readme_real_model_table_is_what_quantbench_real_model_writes(tmp_path) -> None:
    """The README's accuracy table is generated from the committed baselines too, and its command rewrites only
    the block between its markers."""
    from harness.baselines import BaselineStore
    from harness.cli import main
    from harness.report import README_BLOCK, real_model_summary, with_readme_summary

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    summary = real_model_summary(BaselineStore(ROOT / "baselines"), "cpu-intel-xeon-amx-2c", "smollm2-135m")
    assert with_readme_summary(readme, summary) == readme, (
        "README.md's real-model table differs from the committed baselines: quantbench real-model "
        "cpu-intel-xeon-amx-2c smollm2-135m --readme README.md")
    assert "| fp32 | " in summary and "| bf16 | " in summary
    copy = tmp_path / "README.md"
    copy.write_text(f"# t\n\n{README_BLOCK[0]}\nstale\n{README_BLOCK[1]}\n\nafter\n", encoding="utf-8")
    assert main(["--baselines-dir", str(ROOT / "baselines"), "real-model", "cpu-intel-xeon-amx-2c", "smollm2-135m",
                 "--readme", str(copy)]) == 0
    assert copy.read_text(encoding="utf-8") == f"# t\n\n{README_BLOCK[0]}\n{summary}{README_BLOCK[1]}\n\nafter\n"
    copy.write_text("# no markers\n", encoding="utf-8")
    assert main(["--baselines-dir", str(ROOT / "baselines"), "real-model", "cpu-intel-xeon-amx-2c", "smollm2-135m",
                 "--readme", str(copy)]) == 2


def test_the_real_model_page_has_a_row_per_method_with_its_accuracy() -> None:
    """Every method of the committed baseline file is a row, and the reference's own KL divergence is zero."""
    import json

    stored = json.loads((ROOT / "baselines" / "cpu-intel-xeon-amx-2c" / "smollm2-135m.json").read_text())
    methods = {cell["method"] for cell in stored["cells"].values() if cell["batch_size"] is None}
    rows = {line.split(" | ")[0].lstrip("| ") for line in REAL_MODEL_PAGE.read_text().splitlines()
            if line.startswith("| ") and not line.startswith("| method")}
    assert rows == methods and "fp32" in rows
    fp32 = next(line for line in REAL_MODEL_PAGE.read_text().splitlines() if line.startswith("| fp32 |"))
    assert fp32.split(" | ")[4] == "0"  # KLD mean of the reference against itself
