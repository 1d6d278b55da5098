"""Report a base model's bits per byte on the train and validation splits, and greedy samples from fixed prompts.

    python -m scripts.base_loss                                      # newest base checkpoint, pretraining shards
    python -m scripts.base_loss --checkpoint ~/exports/d20 --split-tokens 10485760
    python -m scripts.base_loss --data-path embedded --device-batch-size 4 --split-tokens 32768   # tiny CPU example

--data-path is the corpus the model was trained on (as base_train takes it); it is tokenized once into the
pretokenized cache and its validation split is used for val bpb. Writes the "Base model loss" report section.
"""

from nanochat_jax.report import writer as report
from nanochat_jax.train.load import load_model_from_args
from nanochat_jax.core.common import ArgumentParser, UserError, enable_compilation_cache, parse_args, print0, run_main
from nanochat_jax.data.loader import pretrain_loader
from nanochat_jax.data.shards import ensure_pretokenized
from nanochat_jax.evaluation import SAMPLE_PROMPTS, greedy_samples
from nanochat_jax.evaluation.bpb import BYTE_COUNTS, bytes_note, evaluate_bpb, make_bpb_fn, one_pass_steps


# ---------------------------------------------------------------------------------------------------------------
# Arguments

def build_parser():
    p = ArgumentParser(description="Train/val bits per byte and samples of a base model", doc=__doc__)
    p.add_argument("--source", default="base", help="base|mid|sft|rl: which stage's checkpoint")
    p.add_argument("--model-tag", "-g", default=None, help="model tag (default: the most recently written)")
    p.add_argument("--step", "-s", type=int, default=None, help="checkpoint step (default: the newest)")
    p.add_argument("--checkpoint", default=None, help="a checkpoint/step/export directory (overrides --source)")
    p.add_argument("--data-path", default="shards", help="corpus: shards | embedded | a .txt/.jsonl/.parquet path")
    p.add_argument("--device-batch-size", type=int, default=32, help="rows per forward batch")
    p.add_argument("--max-seq-len", type=int, default=None, help="sequence length (default: the model's)")
    p.add_argument("--split-tokens", type=int, default=20 * 524288,
                   help="tokens evaluated per split (nanochat's); at most one pass over a smaller split")
    p.add_argument("--max-new-tokens", type=int, default=16, help="greedy tokens per sample prompt")
    p.add_argument("--bytes", choices=BYTE_COUNTS, default="raw",
                   help="bytes per token for bpb: raw (nanochat 2026) or decoded (as nanochat 2025 counted them)")
    return p


def main(argv=None):
    args = parse_args(build_parser(), "base_loss", argv)
    enable_compilation_cache()

    # -- model and data -------------------------------------------------------------------------------------------
    params, config, tokenizer, meta = load_model_from_args(args)
    B, T = args.device_batch_size, args.max_seq_len or config.sequence_len
    steps = args.split_tokens // (B * T)
    if steps < 1:
        raise UserError(f"--split-tokens {args.split_tokens} is less than one batch of {B}x{T} tokens")
    train_shards, val_shards = ensure_pretokenized(args.data_path, tokenizer)
    print0(f"model step {meta.get('step')}, evaluating {steps} batches of {B}x{T} per split")

    # -- bits per byte --------------------------------------------------------------------------------------------
    bpb_fn = make_bpb_fn(config)
    token_bytes = tokenizer.token_bytes(decoded=args.bytes == "decoded")
    note = bytes_note(config.recipe, args.bytes)
    if note:
        print0(f"note: {note}")
    results = {}
    for split, shards in (("train", train_shards), ("val", val_shards)):
        if not shards:
            raise UserError(f"{args.data_path} has no {split} split")
        loader = pretrain_loader(shards, B, T, tokenizer.get_bos_token_id(), shuffle=False,
                                 fingerprint=tokenizer.fingerprint())
        split_steps, cut = one_pass_steps(args.split_tokens, B, T, loader.pass_batches, "--split-tokens")
        if cut:
            print0(f"{split}: {cut}")
        results[split] = evaluate_bpb(params, loader, token_bytes, steps=split_steps, bpb_fn=bpb_fn)
        loader.close()
        print0(f"{split} bpb: {results[split]:.4f}")

    # -- samples --------------------------------------------------------------------------------------------------
    samples = greedy_samples(params, config, tokenizer, SAMPLE_PROMPTS, max_tokens=args.max_new_tokens)
    for s in samples:
        print0(s)
    report.log("Base model loss", [{"step": meta.get("step"), "train bpb": results["train"], "val bpb": results["val"],
                                    "bytes counted": args.bytes}] + ([f"Note: {note}."] if note else []) +
               ["Samples:", "\n".join(f"- {s!r}" for s in samples)])
    return results, samples


if __name__ == "__main__":
    run_main(main)
