"""`python -m scripts.report` from a checkout: runs nanochat_jax/cli/report.py (see its docstring)."""

from nanochat_jax.cli.report import main
from nanochat_jax.core.common import run_main

if __name__ == "__main__":
    run_main(main)
