"""The package's layering holds: every import under ``longvila_jax/`` goes down the layers of
``docs/architecture.md``, and no two modules import each other at any depth.

Imports are read with ``ast`` from the source, top-level and function-level alike (an import
inside a function is still a dependency; hiding one there does not break a cycle).
"""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "longvila_jax"
# Package -> the packages it may import (itself included). Modules directly under
# longvila_jax/ (the CLIs, the demo, the public API) are the application layer: anything goes.
ALLOWED = {
    "core": {"core"},
    "config": {"core", "config"},
    "parallel": {"core", "config", "parallel"},
    "models": {"core", "config", "parallel", "models"},
    "data": {"core", "config", "data"},
    "ckpt": {"core", "config", "parallel", "models", "ckpt"},
    "train": {"core", "config", "parallel", "models", "data", "ckpt", "train"},
    "plan": {"core", "config", "parallel", "models", "data", "ckpt", "train", "plan"},
    "infer": {"core", "config", "parallel", "models", "data", "ckpt", "infer"},
    "backends": {"core", "config", "parallel", "models", "data", "ckpt", "infer", "backends"},
    "eval": {"core", "config", "parallel", "models", "data", "ckpt", "infer", "backends", "eval"},
    "longvideo": {
        "core",
        "config",
        "parallel",
        "models",
        "data",
        "ckpt",
        "infer",
        "backends",
        "longvideo",
    },
    "serve": {"core", "config", "parallel", "models", "data", "ckpt", "infer", "serve"},
}


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PKG.rglob("*.py")):
        parts = ("longvila_jax", *path.relative_to(PKG).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The project module ``name`` refers to (a module, or the package holding a name)."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def imports(module: str, modules: dict[str, Path] = MODULES) -> list[tuple[str, int]]:
    """(imported project module, line) for every import statement of ``module``."""
    tree = ast.parse(modules[module].read_text())
    package = module if modules[module].name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*up, base] if base else up)
            names = [f"{base}.{a.name}" for a in node.names] + [base]
        else:
            continue
        for name in names:
            if name.startswith("longvila_jax"):
                target = _resolve(name, modules)
                if target and target != module:
                    found.append((target, node.lineno))
    return sorted(set(found))


def layer(module: str) -> str | None:
    parts = module.split(".")
    if parts[-1] == "__main__":  # a package's CLI is the application layer (architecture.md)
        return None
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in ALLOWED) else None


def violations(modules: dict[str, Path]) -> list[str]:
    bad = []
    for module in modules:
        src = layer(module)
        if src is None:
            continue
        for target, line in imports(module, modules):
            dst = layer(target)
            if dst is not None and dst not in ALLOWED[src]:
                bad.append(f"{modules[module]}:{line}: {src} -> {target}")
    return bad


def test_every_import_goes_down_the_layers():
    bad = violations(MODULES)
    assert not bad, "imports against the layering:\n" + "\n".join(bad)


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index, low, on, stack, out = {}, {}, set(), [], []
    counter = 0
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on.add(root)
        while work:
            v, it = work[-1]
            for w in it:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                    break
                if w in on:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    comp = []
                    while True:
                        w = stack.pop()
                        on.discard(w)
                        comp.append(w)
                        if w == v:
                            break
                    if len(comp) > 1:
                        out.append(sorted(comp))
    return out


def cycles(modules: dict[str, Path]) -> list[list[str]]:
    return _cycles({m: {t for t, _ in imports(m, modules)} for m in modules})


def test_no_import_cycles():
    found = cycles(MODULES)
    assert not found, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in found)


def test_the_checks_catch_planted_violations(tmp_path):
    # A function-level upward import and a two-module cycle, planted beside real modules.
    planted = dict(MODULES)
    up = tmp_path / "up.py"
    up.write_text("def f():\n    from longvila_jax.train import loop\n")
    planted["longvila_jax.config.planted_up"] = up
    a, b = tmp_path / "a.py", tmp_path / "b.py"
    a.write_text("from longvila_jax.data import planted_b\n")
    b.write_text("import longvila_jax.data.planted_a\n")
    planted["longvila_jax.data.planted_a"], planted["longvila_jax.data.planted_b"] = a, b
    assert f"{up}:2: config -> longvila_jax.train.loop" in violations(planted)
    assert ["longvila_jax.data.planted_a", "longvila_jax.data.planted_b"] in cycles(planted)
