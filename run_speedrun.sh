#!/usr/bin/env bash
# The nanochat-jax pipeline in one command (grown stage by stage as they land).
# On a CPU it runs the miniature on the embedded corpus, offline.
set -euo pipefail
cd "$(dirname "$0")"
source scripts/setup_env.sh
export PYTHONUNBUFFERED=1
python -m scripts.tok_train --data-path embedded --vocab-size 4096
python -m scripts.tok_eval
