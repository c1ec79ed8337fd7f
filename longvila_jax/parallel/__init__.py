"""Sequence parallelism: device meshes, Ulysses all-to-all, zigzag ring attention and 2D layouts."""
