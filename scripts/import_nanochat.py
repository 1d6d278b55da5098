"""`python -m scripts.import_nanochat` from a checkout: runs nanochat_jax/cli/import_nanochat.py (see its docstring)."""

from nanochat_jax.cli.import_nanochat import main
from nanochat_jax.core.common import run_main

if __name__ == "__main__":
    run_main(main)
