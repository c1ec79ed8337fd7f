"""The test tree itself stays collectable: pytest's default ``rootdir`` import mode imports
every test file as a top-level module named after its basename (test folders have no
``__init__.py``), so two ``test_x.py`` files in different folders make collection fail on a
clean clone (it did once: ``tests/infer/test_prompts.py`` and ``tests/longvideo/test_prompts.py``).
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def duplicate_basenames(root: Path) -> dict[str, list[str]]:
    """Basename -> the test files (relative to ``root``) that share it, for shared names only."""
    seen: dict[str, list[str]] = defaultdict(list)
    for path in sorted(root.rglob("test_*.py")):
        if "__pycache__" not in path.parts:
            seen[path.name].append(str(path.relative_to(root)))
    return {name: paths for name, paths in seen.items() if len(paths) > 1}


def test_test_file_basenames_are_unique():
    dupes = duplicate_basenames(TESTS)
    assert not dupes, "test files sharing a basename (pytest cannot import both): " + str(dupes)


def test_the_check_catches_a_planted_duplicate(tmp_path):
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "test_same.py").write_text("")
    (tmp_path / "a" / "test_other.py").write_text("")
    assert duplicate_basenames(tmp_path) == {"test_same.py": ["a/test_same.py", "b/test_same.py"]}
