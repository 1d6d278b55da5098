"""Tokenizer training speed: bpe_rs (ours) vs rustbpe (nanochat's reference) vs HF `tokenizers`, same text and vocab.

    python bench/tokenizer_train.py                      # ~2.1M chars of Python docs, vocab 8192, best of 5
    python bench/tokenizer_train.py --vocab-size 32768 --repeat 4 --reps 3

Corpus: the pydoc topics that ship with Python plus the docstrings of the standard library (read with `ast`, nothing
is imported or downloaded), repeated `--repeat` times. Each trainer runs `--reps` times on the same list of strings;
the best wall time counts (the machine is shared);
`cpu s` is the best process CPU time (all threads). Prints chars/s, the ratios to rustbpe, and whether bpe_rs and rustbpe
learned identical merges (they must).
"""

import argparse
import ast
import os
import statistics
import sys
import sysconfig
import time

NANOCHAT_PATTERN = r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""


# ----------------------------------------------------------------------------------------------------------------
# Corpus
# ----------------------------------------------------------------------------------------------------------------

def stdlib_docs():
    """pydoc topics + every docstring in the standard library's .py files, in a fixed order (~2.1M chars)."""
    import pydoc_data.topics
    docs = [pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics)]
    root = sysconfig.get_paths()["stdlib"]
    skip = {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3"}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in skip)
        for name in sorted(filenames):
            if not name.endswith(".py"):
                continue
            try:
                with open(os.path.join(dirpath, name), encoding="utf-8") as f:
                    tree = ast.parse(f.read())
            except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
                continue
            for node in ast.walk(tree):
                if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                    doc = ast.get_docstring(node)
                    if doc:
                        docs.append(doc)
    return docs


# ----------------------------------------------------------------------------------------------------------------
# Trainers: each takes (docs, vocab_size) and returns the mergeable ranks (or None)
# ----------------------------------------------------------------------------------------------------------------

def train_bpe_rs(docs, vocab_size):
    import bpe_rs
    tok = bpe_rs.Tokenizer()
    tok.train_from_iterator(iter(docs), vocab_size, pattern=NANOCHAT_PATTERN)
    return tok.get_mergeable_ranks()


def train_rustbpe(docs, vocab_size):
    import rustbpe
    tok = rustbpe.Tokenizer()
    tok.train_from_iterator(iter(docs), vocab_size, pattern=NANOCHAT_PATTERN)
    return tok.get_mergeable_ranks()


def train_hf(docs, vocab_size):
    # As nanochat's HuggingFaceTokenizer: split with the same pattern, then byte-level BPE.
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token=None, fuse_unk=False))
    tok.normalizer = None
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(pattern=Regex(NANOCHAT_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False, min_frequency=0,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    tok.train_from_iterator(iter(docs), trainer)
    return None


def available(module):
    try:
        __import__(module)
        return True
    except ImportError:
        return False


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--repeat", type=int, default=1, help="repeat the corpus this many times")
    parser.add_argument("--reps", type=int, default=5, help="runs per trainer; the best counts")
    parser.add_argument("--skip-hf", action="store_true", help="leave out HF tokenizers (slow)")
    args = parser.parse_args(argv)

    t0 = time.perf_counter()
    docs = stdlib_docs() * args.repeat
    n_chars = sum(map(len, docs))
    print(f"corpus: {len(docs):,} docs, {n_chars:,} chars (stdlib docs x{args.repeat}, "
          f"built in {time.perf_counter() - t0:.1f}s); vocab {args.vocab_size}; best of {args.reps}; "
          f"{os.cpu_count()} CPUs; python {sys.version.split()[0]}")

    trainers = [("bpe_rs", train_bpe_rs), ("rustbpe", train_rustbpe)]
    if not args.skip_hf and available("tokenizers"):
        trainers.append(("hf_tokenizers", train_hf))
    elif not args.skip_hf:
        print("hf_tokenizers: not installed, skipped")

    times = {name: [] for name, _ in trainers}
    cpu = {name: [] for name, _ in trainers}
    ranks = {}
    for _ in range(args.reps):  # interleave the trainers so load changes hit them alike
        for name, fn in trainers:
            t, c = time.perf_counter(), time.process_time()
            ranks[name] = fn(docs, args.vocab_size)
            times[name].append(time.perf_counter() - t)
            cpu[name].append(time.process_time() - c)

    print(f"{'trainer':<14} {'best s':>8} {'median s':>9} {'Mchars/s':>9} {'vs rustbpe':>11} {'cpu s':>7}")
    ref = min(times["rustbpe"])
    for name, _ in trainers:
        best = min(times[name])
        print(f"{name:<14} {best:>8.3f} {statistics.median(times[name]):>9.3f} {n_chars / best / 1e6:>9.2f} "
              f"{ref / best:>10.2f}x {min(cpu[name]):>7.3f}")
    same = ranks["bpe_rs"] == ranks["rustbpe"]
    print(f"bpe_rs vs rustbpe: {min(times['rustbpe']) / min(times['bpe_rs']):.2f}x faster (best), "
          f"{statistics.median(times['rustbpe']) / statistics.median(times['bpe_rs']):.2f}x (median); "
          f"identical merges: {same} ({len(ranks['bpe_rs'])} vs {len(ranks['rustbpe'])} ranks)")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
