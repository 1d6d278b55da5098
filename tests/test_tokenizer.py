"""Facts about nanochat_jax/data/tokenizer.py: round trips on any Unicode, specials only on request, plain-data save/load
with a stable fingerprint, token byte lengths, and nanochat's conversation rendering with exact loss masks."""

import json
import random

import numpy as np
import pytest

from nanochat_jax.core.common import UserError
from nanochat_jax.data.tokenizer import (MIN_VOCAB, SPECIAL_TOKENS, SPLIT_PATTERN, Tokenizer, get_tokenizer,
                                    tokenizer_dir)

# ---------------------------------------------------------------------------------------------------------------
# Random text: mixed scripts, emoji (with ZWJ and skin tones), combining marks, digits, whitespace runs

POOLS = [
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ",
    "0123456789",
    "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~",
    " ", "  ", "    ", "\t", "\n", "\r\n", "\n\n\n", " \n ", "\u00a0", "\u3000", "\u2028",
    "абвгдежзийклмнопрстуфхцчшщыэюяЖЩЯ",
    "αβγδεζηθικλμνξοπρστυφχψω",
    "的一是不了人我在有他这为之大来以个中上们",
    "あいうえおかきくけこアイウエオ",
    "한국어텍스트입니다",
    "مرحبابالعالم",
    "नमस्तेदुनिया",
    "éèêëàâäôöûüçñßøåæœ",
    "\u0301\u0308\u0323",  # combining marks
    "😀😂🥲🤖🚀🌍👍🏽👩‍💻🇫🇷❤️",
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢𐍈𝄞",
]


def random_text(rng: random.Random, n_pieces: int) -> str:
    out = []
    for _ in range(n_pieces):
        pool = rng.choice(POOLS)
        if rng.random() < 0.1:  # any code point outside the surrogates
            cp = rng.randrange(0x20, 0x110000)
            out.append(chr(cp) if not 0xD800 <= cp <= 0xDFFF else "?")
        else:
            out.append("".join(rng.choice(pool) if len(pool) > 4 else pool for _ in range(rng.randint(1, 6))))
    return "".join(out)


def training_texts(n_docs=400, seed=0) -> list[str]:
    rng = random.Random(seed)
    words = ["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "tokenizer", "Python", "merge",
             "naïve", "café", "данные", "数据", "😀", "1234", "3.14", "x = y + 1", "def f():", "    return"]
    docs = []
    for _ in range(n_docs):
        doc = " ".join(rng.choice(words) for _ in range(rng.randint(5, 40)))
        docs.append(doc + rng.choice(["", "\n", "!", "  ", "\n\n"]) + random_text(rng, 5))
    return docs


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train_from_iterator(training_texts(), 512)


# ---------------------------------------------------------------------------------------------------------------
# Training

def test_trained_vocab_layout(tok):
    assert tok.get_vocab_size() == 512
    n = 512 - len(SPECIAL_TOKENS)
    ranks = tok.get_mergeable_ranks()
    assert len(ranks) == n and sorted(ranks.values()) == list(range(n))
    assert all(ranks[bytes([b])] == b for b in range(256))  # the 256 bytes come first, in byte order
    assert [tok.encode_special(s) for s in SPECIAL_TOKENS] == list(range(n, 512))
    assert tok.get_special_tokens() == SPECIAL_TOKENS
    assert tok.get_bos_token_id() == n
    assert tok.get_pattern() == SPLIT_PATTERN


def test_training_is_deterministic_and_the_fingerprint_tracks_the_vocab(tok):
    again = Tokenizer.train_from_iterator(iter(training_texts()), 512)
    assert again.get_mergeable_ranks() == tok.get_mergeable_ranks()
    assert again.fingerprint() == tok.fingerprint()
    smaller = Tokenizer.train_from_iterator(training_texts(), 400)
    assert smaller.fingerprint() != tok.fingerprint()
    assert len(tok.fingerprint()) == 16 and int(tok.fingerprint(), 16) >= 0


def test_vocab_below_bytes_plus_specials_is_refused():
    with pytest.raises(UserError, match=f"below the minimum {MIN_VOCAB}"):
        Tokenizer.train_from_iterator(["some text"], 256 + len(SPECIAL_TOKENS) - 1)


def test_too_little_text_names_the_largest_supported_vocab():
    docs = ["hello world"] * 3
    with pytest.raises(UserError, match=r"at most (\d+)") as e:
        Tokenizer.train_from_iterator(docs, 1000)
    assert "\n" not in str(e.value)
    largest = int(str(e.value).split("vocab size of at most ")[1].split()[0].replace(",", ""))
    assert MIN_VOCAB < largest < 300
    assert Tokenizer.train_from_iterator(docs, largest).get_vocab_size() == largest


def test_empty_corpus_is_refused():
    with pytest.raises(UserError, match="empty corpus"):
        Tokenizer.train_from_iterator(iter([]), 300)


# ---------------------------------------------------------------------------------------------------------------
# Encoding

def test_round_trip_on_random_unicode(tok):
    rng = random.Random(1234)
    texts = [random_text(rng, rng.randint(1, 30)) for _ in range(300)] + ["", " ", "\n\n", "   \t  x  "]
    for text in texts:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert all(0 <= i < tok.get_vocab_size() for i in ids)
    assert tok.encode(texts, num_threads=2) == [tok.encode(t) for t in texts]
    assert tok.decode(tok.encode("".join(texts))) == "".join(texts)


def test_specials_are_never_produced_from_plain_text(tok):
    n = len(tok.get_mergeable_ranks())
    text = "<|bos|>hi" + "".join(SPECIAL_TOKENS) + " <|endoftext|> <|user_start|>\n"
    for t in [text, *(random_text(random.Random(s), 10) + s2 for s in range(50) for s2 in SPECIAL_TOKENS[:2])]:
        ids = tok.encode(t)
        assert max(ids) < n, t
        assert tok.decode(ids) == t
    assert all(max(ids) < n for ids in tok.encode([text] * 4))


def test_prepend_and_append_take_names_or_ids(tok):
    bos, end = tok.get_bos_token_id(), tok.encode_special("<|assistant_end|>")
    body = tok.encode("hello world")
    assert tok.encode("hello world", prepend="<|bos|>") == [bos] + body
    assert tok.encode("hello world", prepend=bos, append=end) == [bos] + body + [end]
    assert tok.encode(["hello world", "x"], prepend="<|bos|>", append="<|assistant_end|>") == \
        [[bos] + body + [end], [bos] + tok.encode("x") + [end]]
    assert tok.decode([bos] + body) == "<|bos|>hello world"
    with pytest.raises(UserError, match="not a special token"):
        tok.encode("x", prepend="<|nope|>")


def test_token_bytes(tok):
    tb = tok.token_bytes()
    assert tb.dtype == np.int32 and tb.shape == (tok.get_vocab_size(),)
    n = len(tok.get_mergeable_ranks())
    assert (tb[n:] == 0).all()
    assert (tb[:256] == 1).all()
    for token, rank in tok.get_mergeable_ranks().items():
        assert tb[rank] == len(token)
    assert tb[256:n].min() >= 2
    # the bytes of a text are the sum of its tokens' byte lengths (what bits-per-byte relies on)
    text = "naïve café 😀 data 数据"
    assert tb[tok.encode(text)].sum() == len(text.encode("utf-8"))


# ---------------------------------------------------------------------------------------------------------------
# Save / load

def test_save_load_round_trip_as_plain_data(tok, tmp_path):
    tok.save(tmp_path / "t")
    files = sorted(p.name for p in (tmp_path / "t").iterdir())
    assert files == ["mergeable_ranks.tiktoken", "tokenizer.json"]
    meta = json.loads((tmp_path / "t" / "tokenizer.json").read_text())
    assert meta["pattern"] == SPLIT_PATTERN and meta["fingerprint"] == tok.fingerprint()
    assert list(meta["special_tokens"]) == SPECIAL_TOKENS
    lines = (tmp_path / "t" / "mergeable_ranks.tiktoken").read_text().splitlines()
    assert len(lines) == len(tok.get_mergeable_ranks()) and lines[0] == "AA== 0"  # tiktoken's format
    loaded = Tokenizer.from_directory(tmp_path / "t")
    assert loaded.fingerprint() == tok.fingerprint()
    assert loaded.get_mergeable_ranks() == tok.get_mergeable_ranks()
    text = random_text(random.Random(7), 40)
    assert loaded.encode(text) == tok.encode(text)
    assert (loaded.token_bytes() == tok.token_bytes()).all()


def test_fingerprint_is_stable_across_versions():
    # A hand-built vocabulary: if this changes, every recorded fingerprint (shards, checkpoints) is invalidated.
    ranks = {bytes([b]): b for b in range(256)}
    ranks[b"ab"] = 256
    tok = Tokenizer(ranks)
    assert tok.encode("abab") == [256, 256]
    assert tok.fingerprint() == "b010639caff9f8cf"


def test_corrupt_or_missing_tokenizer_dir(tok, tmp_path):
    with pytest.raises(UserError, match="tok_train"):
        Tokenizer.from_directory(tmp_path / "nothing")
    tok.save(tmp_path / "t")
    (tmp_path / "t" / "mergeable_ranks.tiktoken").write_text("!!notbase64 0\n")
    with pytest.raises(UserError, match="corrupt"):
        Tokenizer.from_directory(tmp_path / "t")


def test_a_tokenizer_saved_by_earlier_versions_still_loads(tok, tmp_path):
    """The saved format tag is part of the on-disk contract: moving the module (it now lives in data/) must not
    change it, or every tokenizer and checkpoint written before would be refused."""
    tok.save(tmp_path / "t")
    meta_path = tmp_path / "t" / "tokenizer.json"
    assert json.loads(meta_path.read_text())["format"] == "nanochat_jax.tokenizer/1"
    assert Tokenizer.from_directory(tmp_path / "t").fingerprint() == tok.fingerprint()


def test_get_tokenizer_loads_from_base_dir(tok, base_dir):
    with pytest.raises(UserError, match="run `python -m scripts.tok_train` first"):
        get_tokenizer()
    assert tokenizer_dir() == base_dir / "tokenizer"
    tok.save(tokenizer_dir())
    assert get_tokenizer().fingerprint() == tok.fingerprint()


# ---------------------------------------------------------------------------------------------------------------
# Conversations

def test_render_conversation_masks_by_hand(tok):
    sp = tok.encode_special
    conversation = {"messages": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": [
            {"type": "text", "text": "Let me compute."},
            {"type": "python", "text": "print(2+2)"},
            {"type": "python_output", "text": "4"},
            {"type": "text", "text": "It is 4."},
        ]},
        {"role": "user", "content": "Thanks"},
        {"role": "assistant", "content": "You're welcome."},
    ]}
    e = tok.encode
    expected = [
        (sp("<|bos|>"), 0),
        (sp("<|user_start|>"), 0), *[(i, 0) for i in e("You are terse.\n\nWhat is 2+2?")], (sp("<|user_end|>"), 0),
        (sp("<|assistant_start|>"), 0),
        *[(i, 1) for i in e("Let me compute.")],
        (sp("<|python_start|>"), 1), *[(i, 1) for i in e("print(2+2)")], (sp("<|python_end|>"), 1),
        (sp("<|output_start|>"), 0), *[(i, 0) for i in e("4")], (sp("<|output_end|>"), 0),
        *[(i, 1) for i in e("It is 4.")],
        (sp("<|assistant_end|>"), 1),
        (sp("<|user_start|>"), 0), *[(i, 0) for i in e("Thanks")], (sp("<|user_end|>"), 0),
        (sp("<|assistant_start|>"), 0), *[(i, 1) for i in e("You're welcome.")], (sp("<|assistant_end|>"), 1),
    ]
    ids, mask = tok.render_conversation(conversation)
    assert ids == [i for i, _ in expected]
    assert mask == [m for _, m in expected]
    assert conversation["messages"][0]["content"] == "You are terse."  # the input is not mutated
    assert len(conversation["messages"]) == 5

    # truncation keeps the first max_tokens of both
    short_ids, short_mask = tok.render_conversation(conversation, max_tokens=7)
    assert short_ids == ids[:7] and short_mask == mask[:7]

    # for completion: drop the last assistant message, prime with <|assistant_start|>
    prompt = tok.render_for_completion(conversation)
    prefix, _ = tok.render_conversation({"messages": conversation["messages"][:-1]})
    assert prompt == prefix + [sp("<|assistant_start|>")]
    assert len(conversation["messages"]) == 5


@pytest.mark.parametrize("messages, message", [
    ([], "no messages"),
    ([{"role": "assistant", "content": "hi"}], "message 0 is from assistant but should be from user"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "message 1 is from user"),
    ([{"role": "system", "content": "s"}, {"role": "assistant", "content": "x"}], "followed by a user message"),
    ([{"role": "user", "content": "a"}, {"role": "system", "content": "s"}], "message 1 is from system"),
    ([{"role": "user", "content": ""}], "message 0 (user) is empty"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": []}], "message 1 (assistant) is empty"),
    ([{"role": "tool", "content": "a"}], "unknown role 'tool'"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": [{"type": "image", "text": "x"}]}],
     "message 1 part 0"),
    ([{"role": "user", "content": ["a"]}], "content must be a str"),
    ([{"role": "user"}], "must be a dict with 'role' and 'content'"),
])
def test_bad_conversations_raise_one_clear_line(tok, messages, message):
    with pytest.raises(UserError) as e:
        tok.render_conversation({"messages": messages})
    assert message in str(e.value)
    assert "\n" not in str(e.value)
