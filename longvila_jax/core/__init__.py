"""The leaf layer: what every other package shares and nothing it imports from the project.

- ``errors``: the project's error types for hostile or malformed input (``InputError`` and its
  ``ConfigError`` / ``CheckpointError`` subclasses) and ``brief`` for bounded error messages;
- ``safe_load``: the one checked JSON/YAML loader (size, depth, duplicate-key, alias limits);
- ``safe_paths``: the one path-safety helper (plain names, joins that stay inside a root,
  regular files only, symlinks never followed out of the source tree) and safe copies;
- ``manifest``: per-file SHA-256 integrity manifests of checkpoint directories;
- ``faults``: named kill points for the kill-and-resume tests (inert unless armed).

Modules here import only the standard library, numpy and PyYAML.
"""
