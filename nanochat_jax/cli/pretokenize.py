"""Tokenize a corpus once into token shards (<base dir>/pretok/<hash>/{train,val}_NNNNN.bin) for the grain loader.

    python -m scripts.pretokenize                                  # the downloaded shards (last one = validation)
    python -m scripts.pretokenize --data-path embedded -w 2        # tiny CPU example, no download (~10 s)
    python -m scripts.pretokenize --data-path my_corpus.jsonl --val-fraction 0.005

--data-path takes what tok_train takes: a .txt file (one document per line), a directory of .txt files (one
document per file), a .jsonl file ("text" field), a .parquet file ("text" column), `embedded`, or `shards`. A fixed
hash of each document's index holds out --val-fraction of a custom corpus for validation. The cache is keyed by the
corpus files' hash and the tokenizer's fingerprint, so training stages that take --data-path find it (and make it on
first use if this script was not run). Needs the tokenizer: run `python -m scripts.tok_train` first.
"""

import time

from nanochat_jax.core.common import ArgumentParser, parse_args, print0, run_main
from nanochat_jax.data.documents import DEFAULT_VAL_FRACTION
from nanochat_jax.data.shards import SHARD_TOKENS, ShardDocs, ensure_pretokenized
from nanochat_jax.data.tokenizer import get_tokenizer


# ---------------------------------------------------------------------------------------------------------------
# Arguments

def build_parser() -> ArgumentParser:
    p = ArgumentParser(description=__doc__.split("\n")[0], doc=__doc__)
    p.add_argument("--data-path", default="shards", help="corpus: a file, a directory, 'embedded' or 'shards'")
    p.add_argument("--val-fraction", type=float, default=DEFAULT_VAL_FRACTION,
                   help="documents held out for validation (custom corpora; the shards keep their last shard)")
    p.add_argument("-w", "--workers", type=int, default=None, help="tokenizer processes (default: all cores)")
    p.add_argument("--shard-tokens", type=int, default=SHARD_TOKENS, help="tokens per shard file")
    return p


# ---------------------------------------------------------------------------------------------------------------

def main(argv=None):
    args = parse_args(build_parser(), "pretokenize", argv)
    tokenizer = get_tokenizer()   # UserError "run scripts.tok_train first" when there is none
    t0 = time.time()
    train, val = ensure_pretokenized(args.data_path, tokenizer, args.val_fraction, workers=args.workers,
                                     shard_tokens=args.shard_tokens)
    fp = tokenizer.fingerprint()
    for name, shards in (("train", train), ("val", val)):
        docs = ShardDocs(shards, fp) if shards else None
        print0(f"{name}: {len(shards)} shards, {len(docs) if docs else 0:,} documents, "
               f"{docs.n_tokens if docs else 0:,} tokens  ({shards[0].parent if shards else '-'})")
    print0(f"done in {time.time() - t0:.1f}s")
    return train, val


if __name__ == "__main__":
    run_main(main)
