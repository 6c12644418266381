#!/usr/bin/env bash
# Creates .venv (if missing) and installs this package with every dependency pinned by constraints.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.installed-$(cat constraints.txt setup.py | sha256sum | cut -c1-16)
if [ ! -f "$stamp" ]; then
  .venv/bin/pip install -q --disable-pip-version-check -c constraints.txt setuptools wheel
  .venv/bin/pip install -q --disable-pip-version-check --no-build-isolation -c constraints.txt -e '.[connector,test]'
  .venv/bin/python -m compileall -q .venv/lib >/dev/null 2>&1 || true
  touch "$stamp"
fi
