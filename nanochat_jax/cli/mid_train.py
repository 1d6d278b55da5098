"""Midtraining: the base model meets conversations, multiple choice, tool use and spelling (nanochat's mid_train).

    python -m scripts.mid_train                                 # from the newest base checkpoint, one epoch
    python -m scripts.mid_train --model-tag d20 --step 21400 --device-batch-size 16
    python -m scripts.mid_train --checkpoint ckpt/base --num-iterations 800 --output-dir ckpt/mid
    python -m scripts.mid_train --resume                        # continue the run in the output dir

Tiny CPU example (after the miniature's base_train):
    python -m scripts.mid_train --device-batch-size 1 --max-seq-len 128 --num-iterations 20 --eval-every 10

Mixture (nanochat): SmolTalk, MMLU auxiliary train, GSM8K train (calculator tool calls), the identity
conversations twice (--identity-copies), SpellingBee and SimpleSpelling. A task whose data cannot be had offline is
skipped with a one-line note (the CPU miniature keeps identity and spelling, and whatever task data is cached; it
takes 12 identity copies, else spelling drowns them and the model never learns who it is). LR: the base
recipe's LRs, constant, then a linear decay to 0 over the last 20% of the steps; Muon momentum warms up as in
pretraining. The loss is the masked conversation loss (train/step.py's one loss definition). Checkpoints go to
<base>/checkpoints/mid/<tag>, curves to <base>/tensorboard/mid/<run>, a "Midtraining" section to the report.
"""

from __future__ import annotations

from nanochat_jax.core.common import ArgumentParser, UserError, enable_compilation_cache, parse_args, print0, run_main
from nanochat_jax.stages import finetune as ft
from nanochat_jax.tasks import TaskMixture

STAGE = "mid"


# ---------------------------------------------------------------------------------------------------------------
# Arguments

def build_parser():
    p = ArgumentParser(description="Midtraining", doc=__doc__)
    ft.add_source_args(p, default_source="base")
    p.add_argument("--num-epochs", type=float, default=1.0, help="passes over the mixture (when --num-iterations < 0)")
    p.add_argument("--num-iterations", type=int, default=-1, help="optimizer steps (-1: --num-epochs)")
    p.add_argument("--max-seq-len", type=int, default=None, help="row length (default: the model's context)")
    p.add_argument("--device-batch-size", type=int, default=8, help="rows per device per micro-batch")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--packing", choices=("pack", "pad"), default="pack", help="best-fit packing or one per row")
    p.add_argument("--identity-copies", type=int, default=2,
                   help="copies of the identity conversations in the mixture (nanochat: 2)")
    p.add_argument("--spelling-size", type=int, default=200_000, help="SimpleSpelling items (SpellingBee: 80K)")
    p.add_argument("--smoltalk-size", type=int, default=None, help="cap SmolTalk conversations (default: all)")
    ft.add_optim_args(p, "mid")   # nanochat mid: constant, last 20% linear to 0
    p.add_argument("--eval-every", type=int, default=150, help="val loss every N steps (-1: never)")
    p.add_argument("--eval-steps", type=int, default=20, help="batches per val loss")
    p.add_argument("--eval-metrics-every", type=int, default=-1, help="MMLU/ARC accuracy every N steps (-1: never)")
    p.add_argument("--eval-metrics-max-problems", type=int, default=256, help="problems per task in that check")
    ft.add_output_args(p)
    return p


def train_specs(args):
    bee = max(1, round(args.spelling_size * 0.4))   # nanochat: 200K SimpleSpelling, 80K SpellingBee
    smol = {"stop": args.smoltalk_size} if args.smoltalk_size else {}
    return [("SmolTalk", "train", smol), ("MMLU", "train", {}), ("GSM8K", "train", {}),
            *[("identity", None, {})] * args.identity_copies,
            ("SimpleSpelling", "train", {"size": args.spelling_size}), ("SpellingBee", "train", {"size": bee})]


VAL_SPECS = [("SmolTalk", "test", {"stop": 2000}), ("MMLU", "test", {"stop": 500}), ("GSM8K", "test", {"stop": 100}),
             ("SpellingBee", "test", {"size": 100})]


# ---------------------------------------------------------------------------------------------------------------
# Main

def main(argv=None):
    args = parse_args(build_parser(), "mid_train", argv)
    if args.device_batch_size < 1 or args.grad_accum < 1:
        raise UserError("--device-batch-size and --grad-accum must be >= 1")
    enable_compilation_cache()
    start = ft.load_start(args)

    # -- data: the mixture, without what is not available ---------------------------------------------------------
    tasks, notes = ft.build_tasks(train_specs(args))
    if not tasks:
        raise UserError("no midtraining data available")
    train_ds = TaskMixture(tasks)
    print0(f"mid mixture: {len(train_ds):,} conversations ({ft.describe_mixture(tasks)})")
    val_tasks, _ = ft.build_tasks(VAL_SPECS, log=lambda *a: None)
    val_ds = TaskMixture(val_tasks)

    # -- train (resumable), curves, report -------------------------------------------------------------------------
    return ft.train_on_conversations(args, STAGE, "Midtraining", start, train_ds, val_ds, notes)


if __name__ == "__main__":
    run_main(main)
