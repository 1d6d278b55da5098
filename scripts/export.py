"""`python -m scripts.export` from a checkout: runs nanochat_jax/cli/export.py (see its docstring)."""

from nanochat_jax.cli.export import main
from nanochat_jax.core.common import run_main

if __name__ == "__main__":
    run_main(main)
