"""Checkpoint import/export: HF/VILA safetensors <-> this project's NNX parameters.

``mapping`` holds the declarative name tables (regex -> parameter path + transform) and the
in-memory import/export built on them; the streaming file converters use the same tables.
"""
