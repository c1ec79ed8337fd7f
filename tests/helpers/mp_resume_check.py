"""Restore-at-every-position check with grain worker processes (run as a script, not by pytest).

``python -m helpers.mp_resume_check CORPUS_DIR WINDOW`` (``tests/`` on ``PYTHONPATH``) prints one
JSON line. mp_prefetch needs a ``__main__`` guard and parsed absl flags, hence a separate
process; ``tests/data/test_data_resume.py`` runs it.
"""

from __future__ import annotations

import json
import sys

import numpy as np

from longvila_jax.config.base import from_dict, load_yaml
from longvila_jax.config.data import DataConfig
from longvila_jax.data.pipeline import DataIterator


def _cfg(corpus: str, workers: int) -> DataConfig:
    data = load_yaml(f"{corpus}/data.yaml")
    data.update(
        decode_timeout_s=0.0,
        max_length=128,
        max_frames_per_row=8,
        batch_size=2,
        worker_count=workers,
    )
    return from_dict(DataConfig, data)


def _fp(batch) -> list:
    return [
        batch["sample_index"].tolist(),
        float(np.sum(batch["frames"])),
        batch["labels"].tolist(),
    ]


def main(corpus: str, window: int, ahead: int = 2) -> None:
    ref_it = DataIterator(_cfg(corpus, 0), 0, 1)
    ref = [_fp(next(ref_it)) for _ in range(window + ahead)]
    it = DataIterator(_cfg(corpus, 2), 0, 1)
    states, stream = [], []
    for _ in range(window + ahead):
        states.append(json.loads(json.dumps(it.get_state())))
        stream.append(_fp(next(it)))
    mismatches = []
    for p in range(window):
        it.set_state(states[p])
        got = [_fp(next(it)) for _ in range(ahead)]
        if got != stream[p : p + ahead]:
            mismatches.append(p)
    it.close()
    print(
        json.dumps(
            {
                "positions": window,
                "mismatches": mismatches,
                "same_as_in_process": stream == ref,
                "state_keys": sorted(states[0]["pack"]["parent"]),
            }
        )
    )


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
