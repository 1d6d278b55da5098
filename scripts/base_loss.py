"""`python -m scripts.base_loss` from a checkout: runs nanochat_jax/cli/base_loss.py (see its docstring)."""

from nanochat_jax.cli.base_loss import main
from nanochat_jax.core.common import run_main

if __name__ == "__main__":
    run_main(main)
