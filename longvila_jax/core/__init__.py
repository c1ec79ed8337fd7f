"""The leaf layer: what every other package shares; it imports nothing else from the project.

Shared vocabulary and maths:

- ``axes``: the logical axis names of model code and the physical mesh axis names;
- ``attention``: the ``AttentionFn`` protocol every attention kernel implements, the dense
  single-device reference attention and ``MASK_VALUE``;
- ``labels``: ``IGNORE_INDEX``, the label of positions without a target;
- ``loss``: the token cross-entropy (sum and count) every objective computes;
- ``tokens``: the ``<image>`` placeholder and its id in a tokenizer;
- ``trees``: nested-dict helpers for parameter trees.

Hostile input (``docs/reliability.md``):

- ``errors``: the project's error types (``InputError`` and its ``ConfigError`` /
  ``CheckpointError`` subclasses) and ``brief``/``brief_path`` for bounded messages;
- ``safe_load``: the one checked JSON/YAML loader (size, depth, duplicate-key, alias limits);
- ``safe_paths``: the one path-safety helper (plain names, joins that stay inside a root,
  regular files only, symlinks never followed out of the source tree) and safe copies;
- ``manifest``: per-file SHA-256 integrity manifests of checkpoint directories;
- ``faults``: named kill and stall points for the fault tests (inert unless armed).

Modules here import only the standard library, numpy, PyYAML and jax.
"""
