"""`python -m scripts.base_train` from a checkout: runs nanochat_jax/cli/base_train.py (see its docstring)."""

from nanochat_jax.cli.base_train import main
from nanochat_jax.core.common import run_main

if __name__ == "__main__":
    run_main(main)
