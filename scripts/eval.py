"""`python -m scripts.eval --checkpoint ... --tasks arc,gsm8k,mmlu --report_path report.md`: the form the nanochat
docs teach, the same as `python -m scripts.chat_eval`."""

from nanochat_jax.cli.chat_eval import main
from nanochat_jax.core.common import run_main

if __name__ == "__main__":
    run_main(main)
