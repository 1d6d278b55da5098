"""`python -m scripts.speedrun_plan` from a checkout: runs nanochat_jax/cli/speedrun_plan.py (see its docstring)."""

from nanochat_jax.cli.speedrun_plan import main
from nanochat_jax.core.common import run_main

if __name__ == "__main__":
    run_main(main)
