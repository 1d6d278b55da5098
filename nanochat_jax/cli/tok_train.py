"""Train the BPE tokenizer (bpe_rs) and save it to <base dir>/tokenizer.

    python -m scripts.tok_train                                    # the downloaded shards, vocab 65,536
    python -m scripts.tok_train --data-path embedded --vocab-size 4096   # tiny CPU example, no download (~10 s)
    python -m scripts.tok_train --data-path my_corpus.jsonl --vocab-size 32768 --max-chars 1e9

--data-path takes a .txt file (one document per line), a .jsonl file (a "text" field), a .parquet file (a "text"
column), a directory of those, or the word `embedded` (English that ships with Python; see
nanochat_jax.data.documents.embedded_corpus). Each document is cut to --doc-cap characters and training stops after
--max-chars characters. --vocab-size counts the 9 special tokens.
"""

import json
import sys
import time
from pathlib import Path

from nanochat_jax.report import writer as report
from nanochat_jax.core.common import ArgumentParser, UserError, parse_args, print0, run_main
from nanochat_jax.data.documents import describe_embedded, iter_documents
from nanochat_jax.data.tokenizer import Tokenizer, tokenizer_dir

SANITY_TEXT = """Hello world! This is a test.
Numbers: 123, 4567, 89
Contractions: I'm, you're, it's
Special chars: @#$%^&*()  <|bos|>
Unicode: 你好世界 🌍 naïve café"""


def capped_documents(docs, max_chars: int, doc_cap: int, on_chars=None, sample: list | None = None,
                     sample_chars: int = 2_000_000):
    """Yield `docs` cut to `doc_cap` characters each, until `max_chars` have been yielded (as nanochat: the
    document that crosses the limit is the last). Calls `on_chars(n)` per document and keeps the first
    `sample_chars` characters' documents in `sample` (for the compression summary)."""
    total = 0
    for doc in docs:
        doc = doc[:doc_cap]
        total += len(doc)
        if sample is not None and total <= sample_chars:
            sample.append(doc)
        if on_chars:
            on_chars(len(doc))
        yield doc
        if total >= max_chars:
            return


def open_source(data_path):
    """iter_documents for --data-path, or for the downloaded shards when it is not given (with a clear hint)."""
    if data_path is not None:
        if data_path == "embedded":
            print0(describe_embedded())
        return iter_documents(data_path)
    docs = iter_documents("shards")
    try:
        first = next(docs)
    except UserError as e:
        msg = str(e)
        if "download_data" not in msg:
            msg += " (run `python -m scripts.download_data`, or pass --data-path embedded)"
        raise UserError(msg) from None

    def chained():
        yield first
        yield from docs
    return chained()


def main(argv=None):
    # -----------------------------------------------------------------------------------------------------------
    # Arguments
    parser = ArgumentParser(description="Train the BPE tokenizer with bpe_rs", doc=__doc__)
    parser.add_argument("--vocab-size", type=int, default=65536, help="vocab size incl. the 9 specials (65,536 = 2^16)")
    # nanochat's script defaults to 10B but its speedrun passes 2B: 2B characters are plenty for a 65K vocab
    parser.add_argument("--max-chars", type=float, default=2e9, help="stop after this many characters")
    parser.add_argument("--doc-cap", type=int, default=10_000, help="cut each document to this many characters")
    parser.add_argument("--data-path", default=None,
                        help="a .txt/.jsonl/.parquet file or directory, or 'embedded' (default: downloaded shards)")
    parser.add_argument("--output-dir", default=None, help="where to save (default: <base dir>/tokenizer)")
    args = parse_args(parser, "tok_train", argv)
    max_chars = int(args.max_chars)
    if max_chars <= 0 or args.doc_cap <= 0:
        raise UserError("--max-chars and --doc-cap must be positive")
    out_dir = Path(args.output_dir) if args.output_dir else tokenizer_dir()
    source = args.data_path or "shards"
    print0(f"vocab_size: {args.vocab_size:,}  max_chars: {max_chars:,}  doc_cap: {args.doc_cap:,}  data: {source}")

    # -----------------------------------------------------------------------------------------------------------
    # Text: documents cut to doc_cap, up to max_chars, with a progress bar over characters consumed
    from tqdm import tqdm
    docs = open_source(args.data_path)
    sample: list[str] = []
    stats = {"docs": 0, "chars": 0}
    bar = tqdm(total=max_chars if source == "shards" else None, unit="char", unit_scale=True,
               desc="training", disable=not sys.stderr.isatty())

    def on_chars(n):
        stats["docs"] += 1
        stats["chars"] += n
        bar.update(n)

    # -----------------------------------------------------------------------------------------------------------
    # Train
    t0 = time.time()
    tokenizer = Tokenizer.train_from_iterator(capped_documents(docs, max_chars, args.doc_cap, on_chars, sample),
                                              args.vocab_size)
    seconds = time.time() - t0
    bar.close()
    print0(f"trained on {stats['chars']:,} chars in {stats['docs']:,} documents in {seconds:.2f}s "
           f"({stats['chars'] / max(seconds, 1e-9):,.0f} chars/s)")

    # -----------------------------------------------------------------------------------------------------------
    # Save, check, summarise
    tokenizer.save(out_dir)
    info = {"data_path": source, "max_chars": max_chars, "doc_cap": args.doc_cap, "vocab_size": args.vocab_size,
            "train_chars": stats["chars"], "train_docs": stats["docs"], "train_seconds": round(seconds, 3),
            "fingerprint": tokenizer.fingerprint()}
    (out_dir / "train_info.json").write_text(json.dumps(info, indent=2) + "\n")
    print0(f"saved tokenizer to {out_dir} (fingerprint {tokenizer.fingerprint()})")
    ids = tokenizer.encode(SANITY_TEXT)
    assert tokenizer.decode(ids) == SANITY_TEXT, "round trip failed"
    sample_bytes = sum(len(d.encode("utf-8")) for d in sample)
    sample_tokens = sum(map(len, tokenizer.encode(sample)))
    token_bytes = tokenizer.token_bytes()
    nonzero = token_bytes[token_bytes > 0]
    summary = {"bytes_per_token": sample_bytes / max(sample_tokens, 1), "sample_chars": sum(map(len, sample)),
               "token_bytes_min": int(nonzero.min()), "token_bytes_max": int(nonzero.max()),
               "token_bytes_mean": float(nonzero.mean())}
    print0(f"compression: {summary['bytes_per_token']:.3f} bytes/token on the first {summary['sample_chars']:,} "
           f"training chars; token lengths {summary['token_bytes_min']}-{summary['token_bytes_max']} bytes "
           f"(mean {summary['token_bytes_mean']:.2f})")
    report.log("Tokenizer training", {**info, "chars_per_second": stats["chars"] / max(seconds, 1e-9), **summary})
    return tokenizer


if __name__ == "__main__":
    run_main(main)
