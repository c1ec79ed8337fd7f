#!/usr/bin/env bash
# Installs Debian's headless Chromium and its WebDriver (packages `chromium` and
# `chromium-driver`) for the serving UI test (tests/serve/test_ui.py). Tolerant of failure: it
# never stops the caller; without root, apt or a network the UI test skips and says why.
# Idempotent: nothing happens when both binaries are already on PATH.
set -u
if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "install_browser: no apt-get; the UI test will be skipped" >&2
  exit 0
fi
SUDO=""
if [ "$(id -u)" != 0 ]; then
  if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    SUDO="sudo -n"
  else
    echo "install_browser: not root and no passwordless sudo; the UI test will be skipped" >&2
    exit 0
  fi
fi
export DEBIAN_FRONTEND=noninteractive
if ! { $SUDO apt-get update -qq >/dev/null \
  && $SUDO apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null; }; then
  echo "install_browser: apt-get could not install chromium; the UI test will be skipped" >&2
fi
exit 0
