#!/usr/bin/env bash
# The test command: sets up .venv (with the dev extra) if needed, then runs the whole pytest suite.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m "not slow"` or `bash scripts/test.sh tests/test_model.py`.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh dev
export PYTHONUNBUFFERED=1
python -m pytest -q --timeout=900 "$@"
