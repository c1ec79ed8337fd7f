"""Manifest checker: ``python -m longvila_jax.data.check MANIFEST [--config data.yaml] ...``.

Runs every record of one manifest through the per-sample transform (media decoding, templates,
tokenisation, length checks; in order, no shuffling or packing) and prints JSON: samples ok,
skips per reason (``error:<Type>`` for unexpected exceptions) with a few example ids, text /
expanded tokens and frames per sample (min / median / max) and throughput. ``--fail-fast`` stops
at the first bad sample with an error naming it instead.

Exit status: 0 ok; 1 the skip rate exceeds the config's ``max_skip_rate`` (so it can gate a data
drop in CI) or the data cannot be checked (a missing or malformed manifest, a bad sample under
``--fail-fast``: one ``error: ...`` line on stderr); 2 a bad config or argument (one
``config error: ...`` line).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from longvila_jax.config.base import apply_overrides, load_yaml
from longvila_jax.config.data import DataConfig, DatasetSpec
from longvila_jax.core.errors import ConfigError, InputError
from longvila_jax.data.samples import SampleProcessor
from longvila_jax.data.skips import is_skip
from longvila_jax.data.sources import open_source

_EXAMPLES_PER_REASON = 5


def _summary(values: list[int]) -> dict[str, float] | None:
    if not values:
        return None
    a = np.asarray(values)
    return {"min": int(a.min()), "median": float(np.median(a)), "max": int(a.max())}


def check_manifest(cfg: DataConfig, spec: DatasetSpec, limit: int | None = None) -> dict[str, Any]:
    """Processes one manifest and returns the report (see the module docstring).

    Raises:
      ManifestError: the manifest cannot be read as a whole.
      SampleError: ``cfg.fail_fast`` is set and a sample is bad.
      TooLongSample: ``cfg.too_long_policy`` is ``error`` and a sample is too long.
    """
    cfg = dataclasses.replace(cfg, datasets=(spec,))
    root = Path(cfg.root)
    path = Path(spec.manifest) if Path(spec.manifest).is_absolute() else root / spec.manifest
    source = open_source(path, spec.name, spec.format, spec.records_per_item)
    proc = SampleProcessor(cfg)
    n = len(source) if limit is None else min(limit, len(source))
    skipped: collections.Counter[str] = collections.Counter()
    examples: dict[str, list[str]] = collections.defaultdict(list)
    text, expanded, frames = [], [], []
    t0 = time.perf_counter()
    for i in range(n):
        out = proc(source[i])
        if is_skip(out):
            skipped[out["skip_reason"]] += 1
            if len(examples[out["skip_reason"]]) < _EXAMPLES_PER_REASON:
                examples[out["skip_reason"]].append(f"{out['sample_id']}: {out['detail']}")
            continue
        k = len(out["frames"])
        text.append(len(out["input_ids"]))
        frames.append(k)
        expanded.append(len(out["input_ids"]) + k * (cfg.tokens_per_frame - 1))
    dt = time.perf_counter() - t0
    n_skip = sum(skipped.values())
    return {
        "manifest": str(path),
        "kind": spec.kind,
        "fingerprint": source.fingerprint,
        "samples": n,
        "samples_ok": n - n_skip,
        "skipped": dict(sorted(skipped.items())),
        "skip_examples": dict(sorted(examples.items())),
        "skip_rate": n_skip / n if n else 0.0,
        "text_tokens": _summary(text),
        "expanded_tokens": _summary(expanded),
        "frames": _summary(frames),
        "seconds": round(dt, 3),
        "samples_per_s": round(n / dt, 2) if dt > 0 else None,
        "frames_per_s": round(sum(frames) / dt, 2) if dt > 0 else None,
    }


def _infer_kind(cfg: DataConfig, manifest: str) -> str | None:
    for d in cfg.datasets:
        if Path(d.manifest).name == Path(manifest).name:
            return d.kind
    return None


def main(argv: list[str] | None = None) -> int:
    """Runs the check CLI; returns the exit status (see the module docstring)."""
    p = argparse.ArgumentParser(
        prog="python -m longvila_jax.data.check", description=__doc__.splitlines()[0]
    )
    p.add_argument("manifest", help="manifest path (relative to the data root or absolute)")
    p.add_argument("--config", type=Path, help="DataConfig YAML (tokenizer, sizes, template...)")
    p.add_argument("--kind", choices=["video", "image", "interleaved", "text", "coyo"])
    p.add_argument("--root", help="data root (overrides the config's root)")
    p.add_argument("--media-root", default="", help="media root, relative to the data root")
    p.add_argument("--limit", type=int, help="check only the first N records")
    p.add_argument("--set", action="append", default=[], help="config override a.b=value")
    p.add_argument(
        "--fail-fast",
        action="store_true",
        help="stop at the first bad sample with an error naming it (sets fail_fast)",
    )
    a = p.parse_args(argv)
    try:
        data = load_yaml(a.config, "--config") if a.config else {}
        if a.root:
            data["root"] = a.root
        if a.fail_fast:
            data["fail_fast"] = True
        cfg = apply_overrides(DataConfig, data, a.set)
        kind = a.kind or _infer_kind(cfg, a.manifest)
        if kind is None:
            p.error("cannot infer the dataset kind from the config; pass --kind")
        manifest = str(Path(a.manifest).resolve()) if Path(a.manifest).exists() else a.manifest
        spec = DatasetSpec(
            name=Path(a.manifest).stem, manifest=manifest, kind=kind, media_root=a.media_root
        )
        report = check_manifest(cfg, spec, a.limit)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    except InputError as e:  # the manifest, a sample under --fail-fast, a too-long sample
        print(f"error: {e}", file=sys.stderr)
        return 1
    report["over_threshold"] = report["skip_rate"] > cfg.max_skip_rate
    json.dump(report, sys.stdout, indent=1)
    sys.stdout.write("\n")
    return 1 if report["over_threshold"] else 0


if __name__ == "__main__":
    sys.exit(main())
