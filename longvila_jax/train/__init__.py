"""Staged training: train state, optimizer, jitted step, objective, loop, checkpoints, metrics.

Entry point: ``python -m longvila_jax.train --config configs/stages/<stage>.yaml --mesh
configs/mesh/<mesh>.yaml [--set k=v ...]`` (``__main__.py``). Submodules are imported
explicitly; importing this package does no work.
"""
