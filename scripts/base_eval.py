"""`python -m scripts.base_eval` from a checkout: runs nanochat_jax/cli/base_eval.py (see its docstring)."""

from nanochat_jax.cli.base_eval import main
from nanochat_jax.core.common import run_main

if __name__ == "__main__":
    run_main(main)
