"""`python -m scripts.tok_eval` from a checkout: runs nanochat_jax/cli/tok_eval.py (see its docstring)."""

from nanochat_jax.cli.tok_eval import main
from nanochat_jax.core.common import run_main

if __name__ == "__main__":
    run_main(main)
