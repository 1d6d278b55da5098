"""`python -m scripts.chat_web` from a checkout: runs nanochat_jax/cli/chat_web.py (see its docstring)."""

from nanochat_jax.cli.chat_web import main
from nanochat_jax.core.common import run_main

if __name__ == "__main__":
    run_main(main)
