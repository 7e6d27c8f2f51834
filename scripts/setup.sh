#!/usr/bin/env bash
# Set up mor_secure in ./.venv (idempotent). torch==2.13.0 (CPU build) goes first and pinned:
# any looser torch requirement makes pip fetch a CUDA build with several GB of packages.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if command -v python3.11 >/dev/null 2>&1; then PY=python3.11; else PY=python3; fi
fi
if ! "$PY" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
  echo "mor_secure needs Python 3.11 (found $("$PY" --version 2>&1)); set PYTHON=/path/to/python3.11" >&2
  exit 1
fi
# Headless Chromium for the report's browser test (tests/test_report_browser.py). Installed only when
# missing and only where apt-get can run as root (CI on Debian); elsewhere the test says why it skips.
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  echo "installing chromium (apt) for the report's browser test"
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } ||
    echo "could not install chromium: the browser test skips outside CI and fails under CI" >&2
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check torch==2.13.0
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[test]"
echo "mor_secure is set up in .venv ($(.venv/bin/python -c 'import mor_secure; print(mor_secure.__version__)'))"
