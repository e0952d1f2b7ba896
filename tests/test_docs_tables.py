"""The Markdown tables of README.md, docs/ and benchmarks/ render as tables (issue 26: a stray blank line
split the preset table in two, and `smoke` was listed twice)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", ROOT / "benchmarks" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
_SEPARATOR = re.compile(r"\|(\s*:?-{3,}:?\s*\|)+")  # GitHub's delimiter row: | --- | ---: |


def cells(line: str) -> list[str]:
    """The cells of a table row: split on pipes that are not escaped (``\\|`` belongs to a cell)."""
    return [cell.strip() for cell in re.split(r"(?<!\\)\|", line.strip())[1:-1]]


def tables(text: str) -> list[list[tuple[int, str]]]:
    """Runs of consecutive lines starting with ``|`` outside fenced code, each as (line number, line)."""
    found: list[list[tuple[int, str]]] = []
    run: list[tuple[int, str]] = []
    fenced = False
    for number, line in enumerate(text.splitlines(), 1):
        fenced ^= line.lstrip().startswith("```")
        if not fenced and line.lstrip().startswith("|"):
            run.append((number, line))
            continue
        if run:
            found.append(run)
        run = []
    return [*found, run] if run else found


@pytest.mark.parametrize("path", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_table_has_a_header_a_delimiter_and_rows_as_wide(path: Path) -> None:
    for table in tables(path.read_text(encoding="utf-8")):
        where = f"{path.name}:{table[0][0]}"
        delimiter = len(table) >= 2 and _SEPARATOR.fullmatch(table[1][1].strip())
        assert delimiter, f"{where}: no | --- | row under the header"
        width = len(cells(table[0][1]))
        uneven = [f"line {n}: {len(cells(line))} cells" for n, line in table if len(cells(line)) != width]
        assert not uneven, f"{where}: the header has {width} cells; {uneven}"


def test_the_preset_table_lists_every_preset_once() -> None:
    """Against configs/ itself: each preset file is one row (a row may name several, `a`, `b`)."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    preset_table = next(t for t in tables(readme) if cells(t[0][1]) == ["preset", "what for"])
    named = [name for _, line in preset_table[2:] for name in re.findall(r"`([\w.-]+)`", cells(line)[0])]
    presets = sorted(p.stem for p in (ROOT / "configs").glob("*.yaml"))
    assert sorted(named) == presets, "every preset once, and only presets"


def test_the_checker_catches_the_issue_26_table() -> None:
    broken = "| preset | what for |\n| --- | --- |\n| `smoke` | a |\n\n| `smoke` | b |\n| `a100` | c | d |\n"
    found = tables(broken)
    assert len(found) == 2 and not _SEPARATOR.fullmatch(found[1][1][1])
    assert [len(cells(line)) for _, line in found[1]] == [2, 3]
