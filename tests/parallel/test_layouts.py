"""2D zigzag layout: the parallelism.md section 4 simulation (layout -> Ulysses all-to-all ->
zigzag schedule must compute exactly the dense causal pairs), VILA's hybrid formula failing it,
permutation round trips and the global label shift."""

from __future__ import annotations

import numpy as np
import pytest
from helpers.layout_oracles import (
    dense_causal_pairs,
    simulate_zigzag_schedule,
    vila_hybrid_permutation,
)

from longvila_jax.core.labels import IGNORE_INDEX
from longvila_jax.parallel.layouts import (
    apply_layout,
    inverse_permutation,
    layout_batch,
    shift_labels,
    undo_layout,
    zigzag_2d_permutation,
)

GRID = [(1, 4), (2, 2), (2, 4), (4, 2), (4, 4), (8, 2), (8, 4)]  # (U, R)


@pytest.mark.parametrize("ulysses,ring", GRID)
def test_corrected_layout_matches_dense_causal_mask(ulysses, ring):
    seq = 4 * ring * ulysses
    perm = zigzag_2d_permutation(seq, ring, ulysses)
    assert sorted(perm.tolist()) == list(range(seq))
    assert simulate_zigzag_schedule(perm, ring, ulysses) == dense_causal_pairs(seq)


def test_worked_example_of_parallelism_md():
    """L = 16, R = 2, U = 2: shards hold 0-3, 12-15, 4-7, 8-11."""
    perm = zigzag_2d_permutation(16, 2, 2)
    assert perm.reshape(4, 4).tolist() == [
        [0, 1, 2, 3], [12, 13, 14, 15], [4, 5, 6, 7], [8, 9, 10, 11],
    ]  # fmt: skip


@pytest.mark.parametrize("ulysses,ring", [(2, 2), (2, 4), (4, 2), (4, 4), (8, 2)])
def test_vila_hybrid_formula_is_not_a_valid_layout(ulysses, ring):
    seq = 4 * ring * ulysses
    perm = vila_hybrid_permutation(seq, ring, ulysses)
    is_permutation = sorted(perm.tolist()) == list(range(seq))
    pairs_ok = simulate_zigzag_schedule(perm, ring, ulysses) == dense_causal_pairs(seq)
    assert not (is_permutation and pairs_ok)
    if ulysses >= 4:  # chunk ids out of range / never assigned: tokens are dropped
        assert not is_permutation


def test_round_trip_and_batch_layout():
    perm = zigzag_2d_permutation(32, 2, 4)
    x = np.arange(3 * 32).reshape(3, 32)
    np.testing.assert_array_equal(undo_layout(apply_layout(x, perm), perm), x)
    np.testing.assert_array_equal(perm[inverse_permutation(perm)], np.arange(32))
    tokens = np.arange(32)[None] + 100
    labels = shift_labels(tokens)
    out = layout_batch({"tokens": tokens, "labels": labels, "meta": np.zeros(5)}, perm)
    # Every token keeps its own global next-token target after the permutation.
    for t, lab in zip(out["tokens"][0], out["labels"][0], strict=True):
        assert lab == (t + 1 if t < 131 else IGNORE_INDEX)
    assert out["meta"].shape == (5,)
    with pytest.raises(ValueError, match="labels"):
        layout_batch({"labels": labels[:, :16]}, perm, seq_keys=("labels",))


def test_bad_lengths_raise():
    with pytest.raises(ValueError, match="divisible"):
        zigzag_2d_permutation(30, 2, 4)
