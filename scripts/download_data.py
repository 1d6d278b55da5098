"""`python -m scripts.download_data` from a checkout: runs nanochat_jax/cli/download_data.py (see its docstring)."""

from nanochat_jax.cli.download_data import main
from nanochat_jax.core.common import run_main

if __name__ == "__main__":
    run_main(main)
