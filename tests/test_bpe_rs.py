"""bpe_rs, our Rust BPE trainer: same merges as rustbpe (nanochat's reference), as a tiny pure-Python BPE, and as
fancy-regex / Python `re` splitting; clear errors on bad input."""

import random
import re

import pytest

import bpe_rs

rustbpe = pytest.importorskip("rustbpe")

NANOCHAT_PATTERN = r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""
GPT4_PATTERN = r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""


# ----------------------------------------------------------------------------------------------------------------
# Corpora (generated here, no downloads)
# ----------------------------------------------------------------------------------------------------------------

def python_docs():
    """English prose and code samples: the pydoc topics that ship with Python (~0.5M chars)."""
    import pydoc_data.topics
    return [pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics)]


NASTY_PIECES = [
    "hello", "World", "don't", "I'LL", "we've", "they're", "'s", "'S", "'\u017f", "'x", "''",  # contractions
    "123", "4567890", "3.14159", "1e-9", "\u0661\u0662\u0663", "\u00bd\u2153", "\u2167",  # digits (ASCII, Arabic, fractions, roman)
    "!!", "?!", "...", "---", "(x)", "[1, 2]", "{'a': 1}", "#include", "<|bos|>", "a_b", "$$", "\u00ab\u00bb",
    " ", "  ", "   ", "\t", "\t\t ", "\n", "\n\n", "\r\n", " \n ", "\u00a0", "\u3000", "\u2028", "\u200b", "\x0b\x0c",
    "caf\u00e9", "na\u00efve", "\u00c5ngstr\u00f6m", "\u212a", "\u0441\u043b\u043e\u0432\u043e", "\u4e2d\u6587\u5b57",
    "\u65e5\u672c\u8a9e", "\ud55c\uad6d\uc5b4", "\u0639\u0631\u0628\u064a", "\u05e2\u05d1\u05e8\u05d9\u05ea",
    "\U0001f600", "\U0001f44d\U0001f3fd", "\U0001f1eb\U0001f1f7", "\u2764\ufe0f", "e\u0301", "\U0001d400\U0001d401",
    "\u0915\u093f", "\u0e20\u0e32\u0e29\u0e32",
]


def nasty_text(rng, n_pieces):
    parts = []
    for _ in range(n_pieces):
        parts.append(rng.choice(NASTY_PIECES))
        if rng.random() < 0.5:
            parts.append(rng.choice([" ", "", "\n", "  "]))
    return "".join(parts)


def synthetic_docs(seed=0, n_docs=400):
    """Digits, punctuation, whitespace runs and non-ASCII, in documents of varied length."""
    rng = random.Random(seed)
    return [nasty_text(rng, rng.randint(1, 300)) for _ in range(n_docs)]


def train_both(docs, vocab_size, pattern=None, **kw):
    ours = bpe_rs.Tokenizer()
    ours.train_from_iterator(iter(docs), vocab_size, pattern=pattern, **kw)
    ref = rustbpe.Tokenizer()
    ref.train_from_iterator(iter(docs), vocab_size, pattern=pattern or NANOCHAT_PATTERN)
    return ours, ref


def first_difference(a, b):
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i, x, y
    return min(len(a), len(b)), None, None


# ----------------------------------------------------------------------------------------------------------------
# Same merges as rustbpe
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("corpus,vocab_size", [
    ("python_docs", 4096),
    ("python_docs", 300),
    ("synthetic", 2000),
    ("mixed", 6000),
])
def test_same_merges_as_rustbpe(corpus, vocab_size):
    docs = {"python_docs": python_docs, "synthetic": synthetic_docs,
            "mixed": lambda: python_docs()[:40] + synthetic_docs(seed=1, n_docs=200)}[corpus]()
    ours, ref = train_both(docs, vocab_size)
    a, b = ours.get_mergeable_ranks(), ref.get_mergeable_ranks()
    assert len(a) == len(b), (len(a), len(b))
    assert a == b, first_difference(a, b)
    assert len(a) == vocab_size and ours.vocab_size == vocab_size
    assert ours.get_pattern() == NANOCHAT_PATTERN


def test_same_merges_other_patterns():
    docs = synthetic_docs(seed=2, n_docs=150) + python_docs()[:10]
    # GPT-4's \p{N}{1,3} (the rustbpe default; also a fast path) and an arbitrary pattern (fancy-regex path).
    for pattern in [GPT4_PATTERN, r"\w+|\s+|[^\w\s]+"]:
        ours, ref = train_both(docs, 1500, pattern=pattern)
        assert ours.get_mergeable_ranks() == ref.get_mergeable_ranks(), pattern
        assert ours.get_pattern() == pattern


def test_streaming_buffer_and_generator_inputs():
    """Batch boundaries don't change the result; generators and lists both work."""
    docs = synthetic_docs(seed=3, n_docs=120)
    whole = bpe_rs.Tokenizer()
    whole.train_from_iterator(docs, 1000)
    small = bpe_rs.Tokenizer()
    small.train_from_iterator((d for d in docs), 1000, buffer_size=7)
    assert small.get_mergeable_ranks() == whole.get_mergeable_ranks()
    assert len(whole.get_merges()) == 1000 - 256


def test_ranks_work_in_tiktoken():
    tiktoken = pytest.importorskip("tiktoken")
    docs = synthetic_docs(seed=4, n_docs=100)
    tok = bpe_rs.Tokenizer()
    tok.train_from_iterator(docs, 800)
    ranks = dict(tok.get_mergeable_ranks())
    assert sorted(ranks.values()) == list(range(800))
    enc = tiktoken.Encoding("t", pat_str=tok.get_pattern(), mergeable_ranks=ranks, special_tokens={})
    text = docs[0] + " \U0001f600 x"
    assert enc.decode(enc.encode(text)) == text
    assert len(enc.encode(docs[0])) < len(docs[0].encode("utf-8"))


# ----------------------------------------------------------------------------------------------------------------
# Same merges as a tiny pure-Python BPE (ASCII text, so Python's `re` can split it too)
# ----------------------------------------------------------------------------------------------------------------

# The nanochat pattern for ASCII text: \p{L} = [A-Za-z], \p{N} = [0-9] (Python 3.11 `re` has possessive quantifiers).
ASCII_PATTERN = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\nA-Za-z0-9]?+[A-Za-z]+|[0-9]{1,2}| ?[^\sA-Za-z0-9]++[\r\n]*"""
                 r"""|\s*[\r\n]|\s+(?!\S)|\s+""")


def python_bpe(texts, vocab_size):
    """Textbook BPE: count pairs over all chunks, merge the most frequent (ties: smallest pair), repeat."""
    counts = {}
    for t in texts:
        for chunk in re.findall(ASCII_PATTERN, t):
            counts[chunk] = counts.get(chunk, 0) + 1
    words = [(list(c.encode()), n) for c, n in counts.items()]
    merges = []
    while 256 + len(merges) < vocab_size:
        stats = {}
        for ids, n in words:
            for p in zip(ids, ids[1:]):
                stats[p] = stats.get(p, 0) + n
        if not stats:
            break
        best = max(stats, key=lambda p: (stats[p], -p[0], -p[1]))
        new_id = 256 + len(merges)
        merges.append(best)
        for k, (ids, n) in enumerate(words):
            out, i = [], 0
            while i < len(ids):
                if i + 1 < len(ids) and (ids[i], ids[i + 1]) == best:
                    out.append(new_id)
                    i += 2
                else:
                    out.append(ids[i])
                    i += 1
            words[k] = (out, n)
    return merges


def ascii_docs(seed, n_docs):
    rng = random.Random(seed)
    words = ["the", "cat", "sat", "on", "mat", "don't", "WE'LL", "it's", "aaaa", "abab", "12", "2024", "3.5", "!",
             "?!", " ", "  ", "\t", "\n", "\r\n", "(", ")", "=", "foo_bar", "x", "xx", "'", "''"]
    return ["".join(rng.choice(words) + rng.choice(["", " ", " ", "\n"]) for _ in range(rng.randint(1, 60)))
            for _ in range(n_docs)]


@pytest.mark.parametrize("seed,vocab_size", [(0, 330), (1, 400)])
def test_same_merges_as_pure_python_bpe(seed, vocab_size):
    docs = ascii_docs(seed, 150)
    tok = bpe_rs.Tokenizer()
    tok.train_from_iterator(docs, vocab_size)
    assert tok.get_merges() == [tuple(m) for m in python_bpe(docs, vocab_size)]


# ----------------------------------------------------------------------------------------------------------------
# The fast splitter equals fancy-regex (all text) and Python's `re` (ASCII text)
# ----------------------------------------------------------------------------------------------------------------

def test_fast_split_matches_regex():
    rng = random.Random(5)
    alphabet = ["a", "Z", "'", "s", "S", "l", "L", "v", "e", "E", "r", "d", "m", "t", "\u017f", "\u212a", "1", "22",
                "\u0663", "\u00bd", " ", "\t", "\n", "\r", "\u00a0", "\u3000", "\u2028", "\x0b", "\x85", ".", "!", "-",
                "\u00e9", "\u4e2d", "\U0001f600", "\u0301", "\U0001d400", "\ufeff", "\x00"]
    texts = ["", " ", "\n", "'", "''s", " \n ", "a  b", "  \n\n  x", "x  ", "12345", "don't", "'\u017f"]
    texts += ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 40))) for _ in range(3000)]
    texts += synthetic_docs(seed=6, n_docs=30)
    for pattern in [NANOCHAT_PATTERN, GPT4_PATTERN]:
        for t in texts:
            fast = bpe_rs.split_text(t, pattern)
            assert fast == bpe_rs.split_text(t, pattern, fast=False), repr(t)
            assert "".join(fast) == t


def test_fast_split_matches_python_re_on_ascii():
    for t in ascii_docs(7, 200):
        assert bpe_rs.split_text(t) == re.findall(ASCII_PATTERN, t), repr(t)


# ----------------------------------------------------------------------------------------------------------------
# Errors and limits
# ----------------------------------------------------------------------------------------------------------------

def test_vocab_below_256_is_a_value_error():
    with pytest.raises(ValueError, match="at least 256"):
        bpe_rs.Tokenizer().train_from_iterator(["hello world"], 255)


@pytest.mark.parametrize("texts", [[], iter([]), ["", ""]])
def test_empty_input_is_a_value_error(texts):
    with pytest.raises(ValueError, match="no text to train on"):
        bpe_rs.Tokenizer().train_from_iterator(texts, 300)


def test_non_str_items_are_a_type_error():
    with pytest.raises(TypeError, match=r"must yield str, but item 1 is bytes"):
        bpe_rs.Tokenizer().train_from_iterator(["ok", b"bytes"], 300)
    with pytest.raises(TypeError, match="iterable of str"):
        bpe_rs.Tokenizer().train_from_iterator(42, 300)


def test_unencodable_str_is_a_value_error():
    with pytest.raises(ValueError, match="item 1 is not valid text"):
        bpe_rs.Tokenizer().train_from_iterator(["ok", "lone \ud800 surrogate"], 300)


def test_iterator_exception_propagates():
    def gen():
        yield "hello"
        raise RuntimeError("boom")
    with pytest.raises(RuntimeError, match="boom"):
        bpe_rs.Tokenizer().train_from_iterator(gen(), 300)


def test_bad_pattern_is_a_value_error():
    with pytest.raises(ValueError, match="invalid split pattern"):
        bpe_rs.Tokenizer().train_from_iterator(["hello"], 300, pattern="(unclosed")


def test_text_too_small_for_the_vocab_stops_early():
    """When the text runs out of pairs, training stops: fewer ranks come back, and the caller can tell."""
    docs = ["abab abab cdcd", "abab"]
    tok = bpe_rs.Tokenizer()
    tok.train_from_iterator(docs, 1000)
    ranks = tok.get_mergeable_ranks()
    # chunks: "abab" (x3), " abab", " cdcd": every chunk ends up a single token after a handful of merges
    assert 256 < len(ranks) < 1000
    assert tok.vocab_size == len(ranks)
    assert [r for _, r in ranks] == list(range(len(ranks)))
    assert {b"abab", b" abab", b" cdcd"} <= {t for t, _ in ranks}
    ref = rustbpe.Tokenizer()
    ref.train_from_iterator(docs, 1000, pattern=NANOCHAT_PATTERN)
    assert ref.get_mergeable_ranks() == ranks


def test_gil_is_released_while_training():
    """Another Python thread keeps running while bpe_rs splits and merges (it would stall if the GIL were held)."""
    import threading
    import time

    docs = python_docs() * 3
    for attempt in range(6):  # the machine is shared: allow a noisy run or two
        done = threading.Event()

        def work():
            bpe_rs.Tokenizer().train_from_iterator(docs, 8192)
            done.set()

        thread = threading.Thread(target=work)
        start = last = time.perf_counter()
        thread.start()
        max_gap = 0.0
        while not done.is_set():
            now = time.perf_counter()
            max_gap, last = max(max_gap, now - last), now
        thread.join()
        duration = time.perf_counter() - start
        if duration < 0.2:  # too quick to tell a stall from scheduling noise: give it more text
            docs = docs * 4
            continue
        if max_gap < 0.5 * duration:
            return
    pytest.fail(f"main thread stalled {max_gap:.3f}s of a {duration:.3f}s training run")
