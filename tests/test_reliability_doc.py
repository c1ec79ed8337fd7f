"""docs/reliability.md stays true: at least 40 hostile-input classes, and every test it cites
exists (file, and function where one is named)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "reliability.md"
# `path/test_x.py::test_name` or `path/test_x.py` or `::test_name` (same file as the last path)
_REF = re.compile(r"`((?:[\w/*]+/)?test_[\w*]+\.py)?(?:::(\w+))?`")


def _rows() -> list[list[str]]:
    rows = []
    for line in DOC.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0].isdigit():
            rows.append(cells)
    return rows


def _functions(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}


def test_table_has_forty_distinct_classes():
    rows = _rows()
    assert len(rows) >= 40
    assert [int(r[0]) for r in rows] == list(range(1, len(rows) + 1))
    assert len({r[2] for r in rows}) == len(rows)  # each row a distinct attack


def test_every_cited_test_exists():
    checked = 0
    for row in _rows():
        last: list[Path] = []
        refs = _REF.findall(row[-1])
        assert refs, f"row {row[0]} cites no test"
        for file, func in refs:
            if file:
                last = sorted((REPO / "tests").glob(file))
                assert last, f"row {row[0]}: no test file {file}"
            if func:
                assert last, f"row {row[0]}: ::{func} without a file"
                assert any(func in _functions(p) for p in last), f"row {row[0]}: no {func}"
                checked += 1
    assert checked >= 60
