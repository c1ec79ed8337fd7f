#!/usr/bin/env bash
# Set up .venv (Python 3.11, CPU-only jax and the torch 2.13.0 CPU reference) and run the test suite
# on 8 simulated CPU devices, two pytest workers (one per core; test files stay together so
# their module fixtures are built once, handed out in collection order, which tests/conftest.py
# starts with the longest files). Extra arguments go to pytest (`-n 0` runs serially).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/venv.sh
ensure_venv test
# Headless Chromium for the serving UI test (tests/serve); without it that one test skips.
bash scripts/install_browser.sh || true
.venv/bin/ruff check longvila_jax tests bench scripts
.venv/bin/ruff format --check longvila_jax tests bench scripts
exec .venv/bin/python -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder "$@"
