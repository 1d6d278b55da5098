"""Choosing and loading the model a chat script serves, shared by nanochat_jax/cli/chat_web.py and cli/chat_cli.py."""

from __future__ import annotations

from pathlib import Path


def add_model_args(parser):
    """The flags that choose a model, as in every chat script."""
    parser.add_argument("--source", default="sft", choices=["base", "mid", "sft", "rl"],
                        help="which training stage's checkpoint to load from the base dir")
    parser.add_argument("--model-tag", "-g", default=None, help="model tag (e.g. d20); default: the largest")
    parser.add_argument("--step", "-s", type=int, default=None, help="checkpoint step; default: the newest")
    parser.add_argument("--checkpoint", default=None,
                        help="load this path instead (a stage's dir, one step's dir, or a weights-only export)")


def load_chat_model(args):
    """(params, config, tokenizer, meta) for the model chosen by add_model_args' flags."""
    from nanochat_jax.train.load import load_model_from_args  # on call: it imports JAX, parsing the flags does not
    return load_model_from_args(args)


def model_label(args, meta: dict) -> str:
    """A short name for the loaded model, e.g. "nanochat-sft-d20-step000700", for logs and /v1/models."""
    if args.checkpoint:
        name = Path(args.checkpoint).resolve().name
    else:
        name = "-".join(str(x) for x in (args.source, meta.get("model_tag") or args.model_tag) if x)
    step = meta.get("step")
    return f"nanochat-{name}" + (f"-step{int(step):06d}" if isinstance(step, int) else "")
