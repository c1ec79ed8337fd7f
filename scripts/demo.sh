#!/usr/bin/env bash
# Set up .venv (CPU-only) and run the main job on its embedded default: the tiny demo, which
# needs no downloads. Extra arguments go to `python -m longvila_jax`.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/venv.sh
ensure_venv
exec .venv/bin/python -m longvila_jax "$@"
