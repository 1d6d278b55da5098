"""Evaluate a base model on the CORE metric (DCLM's 22 tasks), write a CSV per model and a report section.

    python -m scripts.base_eval                                   # the newest base checkpoint, every item
    python -m scripts.base_eval --model-tag d20 --step 5000
    python -m scripts.base_eval --checkpoint ~/exports/d20 --max-per-task 500
    python -m scripts.base_eval --max-per-task 16                 # tiny CPU example (~minutes for a d4)

The eval bundle is downloaded on first use into <base dir>/eval_bundle (address: $NANOCHAT_EVAL_BUNDLE_URL, default
nanochat's). Results go to <base dir>/base_eval/<model>_<step>.csv (Task, Accuracy, Centered, then CORE) and to the
"Base model evaluation" report section.
"""

import re

from nanochat_jax.report import writer as report
from nanochat_jax.train.load import load_model_from_args
from nanochat_jax.core.common import ArgumentParser, enable_compilation_cache, get_base_dir, parse_args, print0, run_main
from nanochat_jax.evaluation.core import evaluate_core, write_csv


# ---------------------------------------------------------------------------------------------------------------
# Arguments

def build_parser():
    p = ArgumentParser(description="CORE evaluation of a base model", doc=__doc__)
    p.add_argument("--source", default="base", help="base|mid|sft|rl: which stage's checkpoint")
    p.add_argument("--model-tag", "-g", default=None, help="model tag (default: the most recently written)")
    p.add_argument("--step", "-s", type=int, default=None, help="checkpoint step (default: the newest)")
    p.add_argument("--checkpoint", default=None, help="a checkpoint/step/export directory (overrides --source)")
    p.add_argument("--max-per-task", "-x", type=int, default=-1, help="items per task (-1 = all; a debug knob)")
    p.add_argument("--batch-tokens", type=int, default=16384, help="tokens per forward batch (rows x length)")
    p.add_argument("--tasks", default=None, help="comma-separated task labels (default: all 22)")
    p.add_argument("--bundle-dir", default=None,
                   help="an unpacked eval bundle (default: <base dir>/eval_bundle, downloaded); 'mini': the small "
                        "offline bundle (nanochat_jax.evaluation.mini_bundle)")
    return p


def main(argv=None):
    args = parse_args(build_parser(), "base_eval", argv)
    enable_compilation_cache()

    # -- model ----------------------------------------------------------------------------------------------------
    params, config, tokenizer, meta = load_model_from_args(args)
    if args.checkpoint:
        name = f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', args.checkpoint.rstrip('/').split('/')[-1])}"
    else:
        name = f"{args.source}_{args.model_tag or 'latest'}"
    step = meta.get("step", 0)
    print0(f"model: {name} step {step} ({config.n_layer} layers, width {config.n_embd}, vocab {config.vocab_size})")

    # -- CORE -----------------------------------------------------------------------------------------------------
    tasks = [t.strip() for t in args.tasks.split(",")] if args.tasks else None
    bundle = args.bundle_dir
    if bundle == "mini":
        from nanochat_jax.evaluation.mini_bundle import ensure_mini_bundle
        bundle = ensure_mini_bundle()
    core = evaluate_core(params, config, tokenizer, max_per_task=args.max_per_task, batch_tokens=args.batch_tokens,
                         tasks=tasks, bundle_dir=bundle)
    print0(f"CORE metric: {core['core_metric']:.4f}  ({core['seconds']:.0f}s)")

    # -- outputs --------------------------------------------------------------------------------------------------
    csv_path = write_csv(get_base_dir() / "base_eval" / f"{name}_{int(step):06d}.csv", core)
    print0(f"wrote {csv_path}")
    report.log("Base model evaluation", {
        "model": name, "step": step, "max per task": args.max_per_task, "CORE metric": core["core_metric"],
        "tasks": [{"task": k, "accuracy": v, "centered": core["centered_results"][k]}
                  for k, v in core["results"].items()]})
    return core


if __name__ == "__main__":
    run_main(main)
