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
# what the node already has (jax, flax, orbax, tensorboard and transformers bring these): not carried
for name in numpy protobuf absl_py typing_extensions etils fsspec importlib_resources zipp werkzeug \
            pyyaml packaging; do
    rm -f "$DIR"/"$name"-*.whl
done

# our own wheel: the package and the bpe_rs extension
MATURIN=$(command -v maturin || echo "$PY -m maturin")
$MATURIN build --release --quiet -o "$DIR" >/dev/null

ls -1 "$DIR"
du -sh "$DIR"
