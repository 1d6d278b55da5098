"""The stages as commands: one module per stage, each with a docstring saying how to run it, `build_parser()` and
`main(argv)`.

Installed (`pip install .`), every stage is a sub-command of one console script; in a checkout, `python -m
scripts.<stage>` runs the same module:

    nanochat-jax base-train --depth 4          # = python -m scripts.base_train --depth 4
    nanochat-jax chat-cli --source sft -p hi   # stage names take dashes or underscores: chat_cli works too
    nanochat-jax base-train --help             # the stage's flags, defaults and examples
    nanochat-jax --help                        # the list below

Only the chosen stage's module is imported, so `nanochat-jax --help` answers without loading JAX.
"""

from __future__ import annotations

import importlib
import sys

from nanochat_jax.core.common import run_main

# command -> (module in this folder, what it does), in the order a run uses them
STAGES = {
    "download-data": ("download_data", "download pretraining shards"),
    "tok-train": ("tok_train", "train the BPE tokenizer"),
    "tok-eval": ("tok_eval", "bytes per token of the tokenizer vs GPT-2/GPT-4"),
    "pretokenize": ("pretokenize", "write token shards once, so training never tokenizes"),
    "base-train": ("base_train", "pretrain a base model"),
    "base-loss": ("base_loss", "bits per byte and samples of a base model"),
    "base-eval": ("base_eval", "CORE evaluation of a base model"),
    "mid-train": ("mid_train", "midtraining"),
    "chat-sft": ("chat_sft", "supervised fine-tuning"),
    "chat-rl": ("chat_rl", "reinforcement learning on GSM8K"),
    "chat-eval": ("chat_eval", "chat evaluation (ARC, MMLU, GSM8K, HumanEval, SpellingBee)"),
    "chat-cli": ("chat_cli", "chat in the terminal"),
    "chat-web": ("chat_web", "the web chat and the OpenAI-compatible API"),
    "import-nanochat": ("import_nanochat", "import a nanochat checkpoint directory"),
    "export": ("export", "export a model for Hugging Face Transformers or PyTorch nanochat"),
    "report": ("report", "start (reset) or assemble (generate) report.md"),
    "speedrun-plan": ("speedrun_plan", "what run_speedrun.sh derives from a preset"),
}
ALIASES = {"chat": "chat-cli", "eval": "chat-eval"}   # the names nanochat's docs use


def usage() -> str:
    width = max(map(len, STAGES))
    lines = [f"  {name:<{width}}  {what}" for name, (_, what) in STAGES.items()]
    return ("usage: nanochat-jax STAGE [flags]   (nanochat-jax STAGE --help: the stage's flags)\n\nstages:\n"
            + "\n".join(lines) + "\n\naliases: " + ", ".join(f"{a} = {s}" for a, s in ALIASES.items()))


def main(argv=None) -> int:
    """Run `nanochat-jax STAGE [flags]`: the stage module's `main(flags)`; exit code 2 for an unknown stage."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage(), file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    name = argv[0].replace("_", "-")
    name = ALIASES.get(name, name)
    if name not in STAGES:
        print(f"error: unknown stage {argv[0]!r}; the stages are: {', '.join(STAGES)}", file=sys.stderr)
        return 2
    module = importlib.import_module(f"nanochat_jax.cli.{STAGES[name][0]}")
    sys.argv[0] = f"nanochat-jax {name}"   # argparse names the program after argv[0] in usage lines
    run_main(module.main, argv[1:])
    return 0
