"""Lists every distinct failure of the fuzz strategies (a pytest run stops at the first ones).

    PYTHONPATH=tests .venv/bin/python -m helpers.fuzz_collect [targets] [examples] [extra seeds]
    PYTHONPATH=tests .venv/bin/python -m helpers.fuzz_collect stage_yaml,records 2000 1,2

Runs each target's strategy for ``examples`` examples (the derandomized ones, then one run per
extra seed) without stopping, groups the failures by exception type and innermost project
frame (or by the failed property), then shrinks one example per group with ``find``.
"""

from __future__ import annotations

import collections
import importlib
import os
import re
import sys
import tempfile
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from hypothesis import HealthCheck, Phase, find, given, seed, settings  # noqa: E402
from hypothesis.errors import NoSuchExample, Unsatisfiable  # noqa: E402

# The fuzz tests sit beside the packages they test: with tests/ on the path (as pytest has it),
# their folders import as namespace packages.
# name: (module, strategy, check(ctx, case), setup(tmp) -> ctx or None for the tmp dir)
TARGETS = {
    "st_file": ("ckpt.test_fuzz_safetensors", "safetensors_cases", "check_file", "setup"),
    "st_index": ("ckpt.test_fuzz_safetensors", "index_cases", "check_index", "setup"),
    "vila": ("ckpt.test_fuzz_hf_config", "vila_cases", "check_vila", "setup"),
    "fields": ("ckpt.test_fuzz_hf_config", "field_cases", "check_fields", None),
    "model_yaml": ("config.test_fuzz_model_yaml", "model_yaml_cases", "check_model_yaml", None),
    "stage_yaml": ("config.test_fuzz_stage_yaml", "stage_yaml_cases", "check_stage_yaml", None),
    "records": ("data.test_fuzz_records", "record_cases", "check_record", "setup"),
    "integrity": ("core.test_fuzz_integrity", "manifest_cases", "check_manifest", "setup"),
}
QUIET = settings(database=None, deadline=None, suppress_health_check=list(HealthCheck))


def signature(e: BaseException) -> tuple:
    frames = traceback.extract_tb(e.__traceback__)
    ours = [f for f in frames if "/longvila_jax/" in f.filename]
    where = f"{os.path.relpath(ours[-1].filename)}:{ours[-1].lineno}" if ours else "-"
    if isinstance(e, AssertionError):  # a failed property: group by its (normalized) message
        text = re.sub(r"'[^']*'|\"[^\"]*\"", "Q", str(e).split("\n")[0])
        return ("AssertionError", re.sub(r"\d+", "N", text)[:160])
    return (type(e).__name__, where)


def target(name: str):
    module, strategy, check, setup = TARGETS[name]
    m = importlib.import_module(module)
    tmp = Path(tempfile.mkdtemp(prefix=f"fuzz_{name}_"))
    ctx = getattr(m, setup)(tmp) if setup else tmp
    fn = getattr(m, check)
    run = (lambda case: fn(case)) if name == "fields" else (lambda case: fn(ctx, case))

    def probe(case):
        try:
            run(case)
        except Exception as e:  # noqa: BLE001
            return e
        return None

    return getattr(m, strategy)(), probe


def collect(name: str, n: int, seeds: list[int | None]) -> None:
    if name == "stage_yaml":
        os.chdir(REPO)  # stage files name the model and data YAML relative to the repository
    strategy, probe = target(name)
    found: dict[tuple, tuple[int, object]] = {}
    hits: collections.Counter = collections.Counter()
    for s in seeds:

        @settings(QUIET, max_examples=n, phases=[Phase.generate], derandomize=s is None)
        @given(case=strategy)
        def body(case):
            e = probe(case)
            if e is not None:
                key = signature(e)
                hits[key] += 1
                size = len(repr(case))
                if key not in found or size < found[key][0]:
                    found[key] = (size, case)

        t = time.time()
        (body if s is None else seed(s)(body))()
        print(f"== {name} (seed {s}): {n} examples in {time.time() - t:.1f} s", flush=True)
    for key, (size, case) in sorted(found.items(), key=lambda kv: -hits[kv[0]]):
        try:
            small = find(
                strategy,
                lambda c, k=key: (e := probe(c)) is not None and signature(e) == k,
                settings=settings(QUIET, max_examples=3000),
            )
            case = small if len(repr(small)) < size else case
        except (NoSuchExample, Unsatisfiable):
            pass
        e = probe(case)
        print(f"--- {name} [{hits[key]} hits] {key}")
        print(f"    {type(e).__name__}: {str(e)[:300]!r}")
        print(f"    example: {repr(case)[:700]}")
        for f in traceback.extract_tb(e.__traceback__)[-4:]:
            print(f"      {os.path.relpath(f.filename)}:{f.lineno} in {f.name}: {f.line}")
        sys.stdout.flush()


def main(argv: list[str]) -> None:
    names = argv[0].split(",") if argv else list(TARGETS)
    n = int(argv[1]) if len(argv) > 1 else 2000
    seeds = [None] + ([int(s) for s in argv[2].split(",")] if len(argv) > 2 else [])
    for name in names:
        collect(name, n, seeds)


if __name__ == "__main__":
    main(sys.argv[1:])
