#!/usr/bin/env bash
# The wheels bench/gpu_check.py installs on an offline GPU node (Python 3.12, x86-64, jax/flax/optax/orbax/tensorboard/
# tiktoken/numpy/pyarrow/huggingface_hub/transformers/pytest already there): the packages it lacks, with the
# dependencies those need that the node's stack does not already bring, and our own wheel (bpe_rs is abi3: the
# cp311-abi3 wheel built here serves 3.12). Into .gpu_wheels/ (git-ignored), which the device tool carries.
#
#     bash bench/gpu_wheels.sh            # then: run(carry=[".gpu_wheels"], "python3 bench/gpu_check.py --out $OUT")
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=.gpu_wheels
PY=${PYTHON:-.venv/bin/python}
rm -rf "$DIR" && mkdir -p "$DIR"

# the missing packages and their dependencies, as cp312 manylinux x86-64 wheels
"$PY" -m pip download -q --only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
    --platform any -d "$DIR" grain array-record tensorboardX flask waitress
# numpy (jax's) is on the node and large: not carried; the small dependencies are, in case the node's are older
# (pip installs only what is missing or unsatisfied)
rm -f "$DIR"/numpy-*.whl
# pip itself, run from its wheel where the node's Python has no pip module (a venv made without it)
"$PY" -m pip download -q --only-binary=:all: --no-deps -d "$DIR" pip

# our own wheel: the package and the bpe_rs extension
MATURIN=$(command -v maturin || echo "$PY -m maturin")
$MATURIN build --release --quiet -o "$DIR" >/dev/null

ls -1 "$DIR"
du -sh "$DIR"
