"""Checkpoint import/export: HF/VILA safetensors <-> this project's NNX parameters.

``mapping`` holds the declarative name tables (regex -> parameter path + transform) and the
in-memory import/export built on them; the streaming file converters use the same tables.
Every file the converters read is treated as hostile: ``provenance`` validates the record that
export takes file names from, ``checks`` holds the shared weight checks (floating dtypes,
finite values, stored shapes vs the config, source folders), ``hf_fields`` type-checks HF JSON
configs, and ``integrity`` verifies and seals project checkpoints against their manifests.
"""
