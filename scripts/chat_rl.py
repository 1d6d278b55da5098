"""`python -m scripts.chat_rl` from a checkout: runs nanochat_jax/cli/chat_rl.py (see its docstring)."""

from nanochat_jax.cli.chat_rl import main
from nanochat_jax.core.common import run_main

if __name__ == "__main__":
    run_main(main)
