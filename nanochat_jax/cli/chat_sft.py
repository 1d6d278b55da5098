"""Supervised fine-tuning: teach the (midtrained) model to chat. The loss counts only the tokens whose mask is 1
(the assistant's words, its tool calls and <|assistant_end|>), summed over the whole step and divided by their count.

    python -m scripts.chat_sft                                   # from the newest mid checkpoint, one epoch
    python -m scripts.chat_sft --source base --num-iterations 500
    python -m scripts.chat_sft --pretrained_checkpoint ckpt/mid --data_path my_chats.jsonl --output_dir ckpt/sft
    python -m scripts.chat_sft --resume                          # continue the run in the output dir

Tiny CPU example (after the miniature's mid_train):
    python -m scripts.chat_sft --device-batch-size 1 --max-seq-len 128 --num-iterations 20 --eval-every 10

Data: the nanochat mixture (ARC-Easy/Challenge train, GSM8K train, 10K SmolTalk, identity x2 (--identity-copies),
SimpleSpelling, SpellingBee); a task whose data cannot be had offline is skipped with a note. `--data_path` (.jsonl
conversations or .json prompt/response pairs, comma-separated for several files) trains on that data instead (10% of
it, at most 500 conversations, held out for the val loss); every line is checked before anything else happens, and
a bad one is refused with its line number. Checkpoints go to <base>/checkpoints/sft/<tag>, TensorBoard curves to
<base>/tensorboard/sft/<run>, a section to the report.
"""

from __future__ import annotations

from nanochat_jax.core.common import ArgumentParser, UserError, enable_compilation_cache, parse_args, print0, run_main
from nanochat_jax.stages import finetune as ft
from nanochat_jax.tasks import Conversations, TaskMixture, hold_out, load_custom

STAGE = "sft"


# ---------------------------------------------------------------------------------------------------------------
# Arguments

def build_parser():
    p = ArgumentParser(description="Chat SFT", doc=__doc__)
    ft.add_source_args(p, default_source="mid")
    p.add_argument("--data-path", default=None, help="custom SFT data: .jsonl / .json (comma-separated for several)")
    p.add_argument("--num-epochs", type=float, default=1.0, help="passes over the data (when --num-iterations < 0)")
    p.add_argument("--num-iterations", type=int, default=-1, help="optimizer steps (-1: --num-epochs)")
    p.add_argument("--max-seq-len", type=int, default=None, help="row length (default: the model's context)")
    p.add_argument("--device-batch-size", type=int, default=4, help="rows per device per micro-batch")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--packing", choices=("pack", "pad"), default="pack",
                   help="pack: best fit of whole conversations per row; pad: one conversation per row")
    p.add_argument("--smoltalk-size", type=int, default=10_000, help="SmolTalk conversations in the mixture")
    p.add_argument("--identity-copies", type=int, default=2,
                   help="copies of the identity conversations in the mixture (nanochat: 2)")
    p.add_argument("--spelling-size", type=int, default=300, help="SpellingBee / SimpleSpelling items")
    ft.add_optim_args(p, "sft")   # nanochat SFT: LR x0.02 decaying to 0 (2025); x0.8, 50% warmdown (2026)
    p.add_argument("--eval-every", type=int, default=100, help="val loss every N steps (-1: never)")
    p.add_argument("--eval-steps", type=int, default=20, help="batches per val loss")
    p.add_argument("--eval-metrics-every", type=int, default=200, help="MMLU/ARC accuracy every N steps (-1: never)")
    p.add_argument("--eval-metrics-max-problems", type=int, default=256, help="problems per task in that check")
    ft.add_output_args(p)
    return p


def train_specs(args):
    return [("ARC-Easy", "train", {}), ("ARC-Challenge", "train", {}), ("GSM8K", "train", {}),
            ("SmolTalk", "train", {"stop": args.smoltalk_size}), *[("identity", None, {})] * args.identity_copies,
            ("SimpleSpelling", "train", {"size": args.spelling_size}),
            ("SpellingBee", "train", {"size": args.spelling_size})]


VAL_SPECS = [("SmolTalk", "test", {"stop": 2000}), ("GSM8K", "test", {"stop": 200}),
             ("SpellingBee", "test", {"size": 100})]


def load_custom_data(spec: str):
    """Validated custom conversations from one or more files (UserError with the file and line number)."""
    convs = []
    for path in [s.strip() for s in spec.split(",") if s.strip()]:
        convs += load_custom(path)
    return Conversations(convs, name="custom")


# ---------------------------------------------------------------------------------------------------------------
# Main

def main(argv=None):
    args = parse_args(build_parser(), "chat_sft", argv)
    if args.device_batch_size < 1 or args.grad_accum < 1:
        raise UserError("--device-batch-size and --grad-accum must be >= 1")

    # -- custom data first: a bad file is refused before a model is loaded or a directory touched ---------------
    custom = load_custom_data(args.data_path) if args.data_path else None
    if custom is not None:
        print0(f"custom data: {len(custom):,} conversations from {args.data_path} (validated)")

    enable_compilation_cache()
    start = ft.load_start(args)

    # -- data -----------------------------------------------------------------------------------------------------
    notes = []
    if custom is not None:   # 10% (at most 500) held out for the val loss, never trained on
        train_ds, val_ds = hold_out(custom.conversations, "custom")
        print0(f"custom data: training on {len(train_ds):,} conversations, "
               + (f"{len(val_ds):,} held out for validation" if val_ds else "too few to hold any out: no val loss"))
    else:
        tasks, notes = ft.build_tasks(train_specs(args))
        if not tasks:
            raise UserError("no SFT data available: pass --data-path")
        train_ds = TaskMixture(tasks)
        print0(f"SFT mixture: {len(train_ds):,} conversations ({ft.describe_mixture(tasks)})")
        val_tasks, _ = ft.build_tasks(VAL_SPECS, log=lambda *a: None)
        val_ds = TaskMixture(val_tasks)

    # -- train (resumable), curves, report -------------------------------------------------------------------------
    return ft.train_on_conversations(args, STAGE, "Chat SFT", start, train_ds, val_ds, notes)


if __name__ == "__main__":
    run_main(main)
