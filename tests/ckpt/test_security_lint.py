"""Static guard: the library never unpickles, never runs remote code, never evals.

Scenario 13 of reliability.md: a lint test that fails on ``pickle.load``, ``torch.load``,
``trust_remote_code=True`` and ``eval``/``exec`` anywhere in ``longvila_jax/``.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "longvila_jax"
BANNED_CALLS = {"eval", "exec", "__import__"}
# np.load is allowed: it refuses pickled object arrays unless allow_pickle=True is passed.
BANNED_ATTRS = {
    ("pickle", "load"),
    ("pickle", "loads"),
    ("torch", "load"),
    ("dill", "load"),
    ("marshal", "loads"),
    ("joblib", "load"),
}


def _violations(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), str(path))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            if isinstance(f, ast.Name) and f.id in BANNED_CALLS:
                out.append(f"{path}:{node.lineno} {f.id}()")
            if (
                isinstance(f, ast.Attribute)
                and isinstance(f.value, ast.Name)
                and (f.value.id, f.attr) in BANNED_ATTRS
            ):
                out.append(f"{path}:{node.lineno} {f.value.id}.{f.attr}()")
            for kw in node.keywords:
                if kw.arg == "allow_pickle" and not (
                    isinstance(kw.value, ast.Constant) and kw.value.value is False
                ):
                    out.append(f"{path}:{node.lineno} allow_pickle not literally False")
                if kw.arg == "trust_remote_code" and not (
                    isinstance(kw.value, ast.Constant) and kw.value.value is False
                ):
                    out.append(f"{path}:{node.lineno} trust_remote_code not literally False")
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names]
            mod = getattr(node, "module", None) or ""
            if "pickle" in names or mod == "pickle" or "cloudpickle" in names:
                out.append(f"{path}:{node.lineno} imports pickle")
    return out


def test_library_has_no_unsafe_deserialisation():
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 10
    bad = [v for f in files for v in _violations(f)]
    assert bad == []


def test_lint_catches_what_it_should(tmp_path):
    sample = tmp_path / "bad.py"
    sample.write_text(
        "import pickle\nimport torch\npickle.load(f)\ntorch.load(p)\neval('1')\n"
        "AutoModel.from_pretrained(p, trust_remote_code=True)\nnp.load(p, allow_pickle=True)\n"
    )
    assert len(_violations(sample)) == 6
