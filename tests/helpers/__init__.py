"""Helpers shared by the tests: tiny fixtures and configs, reference implementations, subprocess
launchers and the fuzz strategies. ``tests/`` is on ``sys.path`` (``pyproject.toml``), so test
files import them as ``helpers.<module>``; nothing here is collected as a test."""
