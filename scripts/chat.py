"""Alias of scripts.chat_cli: `python -m scripts.chat --checkpoint PATH [-p PROMPT]` (see chat_cli for the flags)."""

from nanochat_jax.cli.chat_cli import main
from nanochat_jax.core.common import run_main

if __name__ == "__main__":
    run_main(main)
