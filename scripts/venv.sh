# Sourced by the other scripts: create .venv with Python 3.11 and install the project into it.
ensure_venv() {
  local extra="${1:-}"
  local py
  py=$(command -v python3.11 || command -v python3)
  if ! "$py" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
    echo "Python 3.11 is required (found $("$py" --version))" >&2
    return 1
  fi
  [ -x .venv/bin/python ] || "$py" -m venv .venv
  local spec="."
  [ -n "$extra" ] && spec=".[${extra}]"
  .venv/bin/python -m pip install --quiet --disable-pip-version-check -e "$spec"
}
