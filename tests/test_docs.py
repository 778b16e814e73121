"""The docs and the code in step, without Ray or TensorFlow: flags, tables, links, the README's length.

Every long option of every subcommand is named in backticks on its command's page
(PAGES below); every flag a docs table names in its first cell exists in the parser;
README.md stays a front door (at most README_MAX_LINES lines); every relative link in
README.md and docs/*.md reaches an existing file, and its #anchor a heading there.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from happysad.cli import build_parser

# The page that documents each subcommand's flags. A new subcommand needs a line here.
PAGES = {
    "train": "docs/training.md",
    "evaluate": "docs/training.md",
    "explain": "docs/training.md",
    "export": "docs/training.md",
    "make-data": "docs/training.md",
    "score": "docs/scoring.md",
    "predict": "docs/scoring.md",
    "report": "docs/scoring.md",
    "label": "docs/scoring.md",
}
# Options every subcommand has, documented once in README.md instead of on each page.
COMMON = ("--help", "--verbose")
README_MAX_LINES = 200

ROOT = Path(__file__).resolve().parent.parent
DOCS = sorted((ROOT / "docs").glob("*.md"))
FENCE = re.compile(r"^ {0,3}(```|~~~).*?^ {0,3}\1[^\n]*$", re.M | re.S)
CODE_SPAN = re.compile(r"(?<!`)`([^`]+)`(?!`)")
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$", re.M)
FLAG = re.compile(r"(?<![\w-])--[a-z0-9][a-z0-9-]*")


def _subcommands() -> dict:
    parser = build_parser()
    return dict(parser._subparsers._group_actions[0].choices)


def _long_options(command_parser) -> list[str]:
    return [o for action in command_parser._actions for o in action.option_strings if o.startswith("--")]


def _prose(path: Path) -> str:
    """The Markdown outside fenced code blocks (examples are not documentation of a flag)."""
    return FENCE.sub("", path.read_text(encoding="utf-8"))


def _code_spans(path: Path) -> list[str]:
    # A span may wrap across lines within a paragraph: `--cache\nauto`.
    return [span.strip() for span in CODE_SPAN.findall(_prose(path).replace("\n", " "))]


def _rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def test_every_subcommand_has_a_page():
    missing = sorted(set(_subcommands()) - set(PAGES))
    assert not missing, f"subcommands with no docs page in PAGES (tests/test_docs.py): {missing}"
    for command, page in PAGES.items():
        assert (ROOT / page).is_file(), f"{command}: its page {page} does not exist"


@pytest.mark.parametrize("command", sorted(PAGES))
def test_every_flag_is_documented_on_its_page(command):
    parser = _subcommands().get(command)
    assert parser is not None, f"PAGES names {command!r}, which happysad/cli.py no longer has"
    page = ROOT / PAGES[command]
    spans = _code_spans(page)
    missing = [
        flag
        for flag in _long_options(parser)
        if flag not in COMMON and not any(re.match(re.escape(flag) + r"(?![\w-])", s) for s in spans)
    ]
    assert not missing, "\n".join(
        f"happysad {command} {flag}: not documented in {PAGES[command]}; name it there in backticks "
        f"(a table row '| `{flag} ...` | default | meaning |', or a sentence), from its help in happysad/cli.py"
        for flag in missing
    )


def test_common_options_are_documented_in_the_readme():
    spans = _code_spans(ROOT / "README.md")
    for flag in COMMON:
        assert flag in spans, f"{flag} (every subcommand has it) is not named in backticks in README.md"


def _table_flags(path: Path) -> list[tuple[int, str]]:
    """(line number, flag) for each flag in the first cell of a table row that starts with a flag."""
    found = []
    in_fence = False
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if re.match(r" {0,3}(```|~~~)", line):
            in_fence = not in_fence
            continue
        if in_fence or not re.match(r"\|\s*`--", line):
            continue
        first_cell = re.split(r"(?<!\\)\|", line)[1]
        for span in CODE_SPAN.findall(first_cell):
            found += [(number, flag) for flag in FLAG.findall(span)]
    return found


@pytest.mark.parametrize("page", DOCS, ids=_rel)
def test_every_flag_in_a_table_exists(page):
    commands = _subcommands()
    options = {command: set(_long_options(parser)) for command, parser in commands.items()}
    # On a command's page a row must name one of that page's commands' flags; elsewhere, any command's.
    own = [command for command, p in PAGES.items() if p == _rel(page)] or list(commands)
    wrong = [
        f"{_rel(page)}:{number}: {flag} is in a flag table, but no subcommand of "
        f"{', '.join(sorted(own))} has it (happysad/cli.py)"
        for number, flag in _table_flags(page)
        if not any(flag in options.get(command, ()) for command in own)
    ]
    assert not wrong, "\n".join(wrong)


def test_readme_is_a_front_door():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, (
        f"README.md has {len(lines)} lines, more than {README_MAX_LINES}: move detail to a page under docs/"
    )
    # CI runs "the README's test command" (.ci/run): it must stay in the README.
    assert "make test" in "\n".join(lines), "README.md no longer names `make test`, the command CI runs"


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading: its text
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    anchors, seen = set(), {}
    for _, text in HEADING.findall(_prose(path)):
        slug = _slug(text)
        anchors.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
        seen[slug] = seen.get(slug, 0) + 1
    return anchors


def _links(path: Path) -> list[str]:
    # Code spans are not links (`x[i](y)`); a link's text may hold one: [`score`](scoring.md).
    return LINK.findall(CODE_SPAN.sub("code", _prose(path)))


@pytest.mark.parametrize("page", [ROOT / "README.md", *DOCS], ids=_rel)
def test_every_relative_link_resolves(page):
    broken = []
    for target in _links(page):
        if re.match(r"[a-z][a-z0-9+.-]*:", target, re.I):  # https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        destination = (page.parent / file_part).resolve() if file_part else page
        if not destination.exists():
            broken.append(f"{_rel(page)}: ({target}): {file_part} does not exist")
        elif anchor and destination.suffix == ".md" and anchor not in _anchors(destination):
            broken.append(f"{_rel(page)}: ({target}): no heading in {_rel(destination)} has the anchor #{anchor}")
    assert not broken, "\n".join(broken)
