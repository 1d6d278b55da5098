"""`python -m scripts.chat_sft` from a checkout: runs nanochat_jax/cli/chat_sft.py (see its docstring)."""

from nanochat_jax.cli.chat_sft import main
from nanochat_jax.core.common import run_main

if __name__ == "__main__":
    run_main(main)
