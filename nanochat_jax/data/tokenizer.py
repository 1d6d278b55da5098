"""The GPT-4-style BPE tokenizer: trained by our Rust `bpe_rs`, run by tiktoken, saved as plain data.

    tok = Tokenizer.train_from_iterator(texts, vocab_size=4096)   # vocab_size counts the 9 special tokens
    ids = tok.encode("hello", prepend="<|bos|>")                  # str -> list[int]; list[str] -> list[list[int]]
    tok.save(path); tok = Tokenizer.from_directory(path)          # tokenizer.json + mergeable_ranks.tiktoken

Token ids: 0..N-1 are the mergeable byte sequences (id = merge rank, the 256 single bytes first), then the 9 special
tokens in the order of SPECIAL_TOKENS. Plain text never produces a special token, even text containing "<|bos|>":
specials only enter through `prepend`/`append`, `encode_special` and the conversation renderers.

Chat format (nanochat's): render_conversation gives the ids and a loss mask that is 1 on what the assistant must
learn (its text, its python tool calls, and <|assistant_end|>) and 0 elsewhere (bos, user turns, the
<|assistant_start|> token, python outputs). A system message is merged into the first user message.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import itertools
import json
from pathlib import Path

import numpy as np
import tiktoken

from nanochat_jax.core.common import UserError, get_base_dir

SPECIAL_TOKENS = [
    "<|bos|>",              # begins every document
    "<|user_start|>",       # user turn
    "<|user_end|>",
    "<|assistant_start|>",  # assistant turn
    "<|assistant_end|>",
    "<|python_start|>",     # assistant calls the python tool
    "<|python_end|>",
    "<|output_start|>",     # the tool's output, fed back to the assistant
    "<|output_end|>",
]

# nanochat's split pattern: GPT-4's, except numbers split into runs of 1-2 digits (\p{N}{1,2}, GPT-4 has {1,3}) so
# that small vocabularies spend fewer tokens on numbers.
SPLIT_PATTERN = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|"""
                 r"""\s*[\r\n]|\s+(?!\S)|\s+""")

# tokenizer.json's "format": a tag written into every saved tokenizer, not a module path (it names the module
# where this format began); bump the number if the saved layout changes
FORMAT = "nanochat_jax.tokenizer/1"
RANKS_FILE = "mergeable_ranks.tiktoken"  # tiktoken's own format: one "base64(bytes) rank" per line
META_FILE = "tokenizer.json"
MIN_VOCAB = 256 + len(SPECIAL_TOKENS)  # every byte, plus the specials


def tokenizer_dir() -> Path:
    """Where `scripts.tok_train` saves the tokenizer and `get_tokenizer()` loads it: `<base dir>/tokenizer`."""
    return get_base_dir() / "tokenizer"


def get_tokenizer() -> "Tokenizer":
    """The tokenizer trained by `python -m scripts.tok_train` (in `<base dir>/tokenizer`)."""
    path = tokenizer_dir()
    if not (path / META_FILE).is_file():
        raise UserError(f"no tokenizer in {path}: run `python -m scripts.tok_train` first")
    return Tokenizer.from_directory(path)


class Tokenizer:
    """A tiktoken `Encoding` built from our mergeable ranks, pattern and the 9 special tokens."""

    def __init__(self, mergeable_ranks: dict[bytes, int], pattern: str = SPLIT_PATTERN,
                 special_tokens: list[str] = SPECIAL_TOKENS):
        n = len(mergeable_ranks)
        if sorted(mergeable_ranks.values()) != list(range(n)):
            raise UserError(f"mergeable ranks are not the dense ids 0..{n - 1}")
        self._ranks = dict(mergeable_ranks)
        self._pattern = pattern
        self._specials = {name: n + i for i, name in enumerate(special_tokens)}
        self.enc = tiktoken.Encoding(name="nanochat_jax", pat_str=pattern, mergeable_ranks=self._ranks,
                                     special_tokens=self._specials)
        self.bos_token_id = self.encode_special("<|bos|>")

    # -----------------------------------------------------------------------------------------------------------
    # Training, saving, loading

    @classmethod
    def train_from_iterator(cls, texts, vocab_size: int) -> "Tokenizer":
        """Learn BPE merges from an iterable of str with bpe_rs; `vocab_size` includes the 9 special tokens.

        Raises UserError when vocab_size < 256 + 9, when the texts are empty, and when the texts hold fewer distinct
        pairs than the merges asked for (the message says the largest vocab size they support).
        """
        if vocab_size < MIN_VOCAB:
            raise UserError(f"vocab size {vocab_size:,} is below the minimum {MIN_VOCAB} "
                            f"(256 byte tokens + {len(SPECIAL_TOKENS)} special tokens)")
        try:
            from bpe_rs import Tokenizer as BPETrainer  # our Rust trainer, built by `pip install -e .`
        except ImportError:  # not built (a bare `bpe_rs/` crate folder imports as an empty namespace package)
            raise UserError("the Rust BPE trainer bpe_rs is not installed: run `pip install -e .` "
                            "(needs a Rust toolchain, https://rustup.rs)") from None
        texts = iter(texts)
        first = next((t for t in texts if t), None)  # look for text before starting the trainer
        if first is None:
            raise UserError("empty corpus: no text to train the tokenizer on")
        trainer = BPETrainer()
        trainer.train_from_iterator(itertools.chain([first], texts), vocab_size - len(SPECIAL_TOKENS),
                                    pattern=SPLIT_PATTERN)
        ranks = {bytes(token): rank for token, rank in trainer.get_mergeable_ranks()}
        supported = len(ranks) + len(SPECIAL_TOKENS)
        if supported < vocab_size:
            raise UserError(f"the training text supports at most {len(ranks) - 256:,} merges, i.e. a vocab size of "
                            f"at most {supported:,} (asked for {vocab_size:,}): use more text or a smaller vocab")
        return cls(ranks, trainer.get_pattern())

    def save(self, path) -> Path:
        """Write `tokenizer.json` (pattern, specials, fingerprint) and `mergeable_ranks.tiktoken` into `path`."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        (path / RANKS_FILE).write_text(self._ranks_text(), encoding="ascii")
        meta = {"format": FORMAT, "pattern": self._pattern, "special_tokens": self._specials,
                "vocab_size": self.get_vocab_size(), "fingerprint": self.fingerprint()}
        (path / META_FILE).write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        return path

    @classmethod
    def from_directory(cls, path) -> "Tokenizer":
        """Load what `save` wrote; checks the recorded fingerprint."""
        path = Path(path)
        try:
            meta = json.loads((path / META_FILE).read_text(encoding="utf-8"))
            ranks = {}
            for lineno, line in enumerate((path / RANKS_FILE).read_text(encoding="ascii").splitlines(), 1):
                if line:
                    token, rank = line.split()
                    ranks[base64.b64decode(token, validate=True)] = int(rank)
        except FileNotFoundError as e:
            raise UserError(f"no tokenizer in {path} ({Path(e.filename).name} missing): "
                            "run `python -m scripts.tok_train` first") from None
        except (ValueError, UnicodeDecodeError) as e:
            raise UserError(f"tokenizer in {path} is corrupt ({e})") from None
        if meta.get("format") != FORMAT:
            raise UserError(f"tokenizer in {path} has format {meta.get('format')!r}, expected {FORMAT!r}")
        specials = sorted(meta["special_tokens"], key=meta["special_tokens"].get)
        tok = cls(ranks, meta["pattern"], specials)
        if tok._specials != meta["special_tokens"] or tok.fingerprint() != meta.get("fingerprint"):
            raise UserError(f"tokenizer in {path} is inconsistent (fingerprint or special ids do not match)")
        return tok

    def _ranks_text(self) -> str:
        return "".join(f"{base64.b64encode(t).decode()} {r}\n" for t, r in sorted(self._ranks.items(),
                                                                                   key=lambda kv: kv[1]))

    def fingerprint(self) -> str:
        """16 hex digits identifying ranks + pattern + specials; shards and checkpoints record it."""
        h = hashlib.sha256()
        h.update(json.dumps({"pattern": self._pattern, "special_tokens": self._specials}, sort_keys=True).encode())
        h.update(self._ranks_text().encode())
        return h.hexdigest()[:16]

    # -----------------------------------------------------------------------------------------------------------
    # Vocabulary

    def get_vocab_size(self) -> int:
        return self.enc.n_vocab

    def get_mergeable_ranks(self) -> dict[bytes, int]:
        return dict(self._ranks)

    def get_special_tokens(self) -> list[str]:
        """The special token strings, in id order."""
        return list(self._specials)

    def get_pattern(self) -> str:
        return self._pattern

    def encode_special(self, name: str) -> int:
        try:
            return self._specials[name]
        except KeyError:
            raise UserError(f"{name!r} is not a special token (known: {', '.join(self._specials)})") from None

    def get_bos_token_id(self) -> int:
        return self.bos_token_id

    def id_to_token(self, i: int) -> str:
        return self.enc.decode([i])

    def token_bytes(self, decoded: bool = False) -> np.ndarray:
        """int32[vocab]: bytes per token id (0 for specials), the denominator of bits per byte.

        decoded=False: the token's own bytes (nanochat 2026, and ours). decoded=True: the UTF-8 length of the
        token decoded on its own, as nanochat 2025 counted them, so a token holding part of a character counts
        3 bytes for its U+FFFD (use it to compare with bpb figures from nanochat 2025)."""
        out = np.zeros(self.get_vocab_size(), dtype=np.int32)
        for token, rank in self._ranks.items():
            out[rank] = len(token.decode("utf-8", errors="replace").encode("utf-8")) if decoded else len(token)
        return out

    # -----------------------------------------------------------------------------------------------------------
    # Encoding and decoding

    def _special_id(self, token) -> int:
        return token if isinstance(token, (int, np.integer)) else self.encode_special(token)

    def encode(self, text, prepend=None, append=None, num_threads: int = 8):
        """str -> list[int], or list[str] -> list[list[int]] (encoded by `num_threads` threads).

        `prepend`/`append`: a special token (its string or id) added around every text. Special-token strings
        inside the text are encoded as ordinary text.
        """
        pre = [] if prepend is None else [int(self._special_id(prepend))]
        post = [] if append is None else [int(self._special_id(append))]
        if isinstance(text, str):
            return pre + self.enc.encode_ordinary(text) + post
        if isinstance(text, (list, tuple)):
            return [pre + ids + post for ids in self.enc.encode_ordinary_batch(list(text), num_threads=num_threads)]
        raise TypeError(f"encode takes a str or a list of str, not {type(text).__name__}")

    __call__ = encode

    def decode(self, ids) -> str:
        return self.enc.decode([int(i) for i in ids])

    # -----------------------------------------------------------------------------------------------------------
    # Conversations

    def render_conversation(self, conversation: dict, max_tokens: int = 2048) -> tuple[list[int], list[int]]:
        """Token ids and loss mask (1 = train on it) of one conversation, both cut to `max_tokens`.

        bos(0), then alternating turns starting with the user: <|user_start|> text <|user_end|> (all 0);
        <|assistant_start|>(0) content(1) <|assistant_end|>(1). An assistant content may be a list of parts:
        "text" (1), "python" as <|python_start|> code <|python_end|> (1), "python_output" as
        <|output_start|> output <|output_end|> (0). A leading system message is merged into the first user message.
        """
        messages = _check_messages(conversation)
        ids, mask = [], []

        def add(token_ids, m):
            token_ids = [token_ids] if isinstance(token_ids, int) else token_ids
            ids.extend(token_ids)
            mask.extend([m] * len(token_ids))

        sp = self.encode_special
        add(self.bos_token_id, 0)
        for message in messages:
            content = message["content"]
            if message["role"] == "user":
                add(sp("<|user_start|>"), 0)
                add(self.encode(content), 0)
                add(sp("<|user_end|>"), 0)
                continue
            add(sp("<|assistant_start|>"), 0)
            parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
            for part in parts:
                value = self.encode(part["text"])
                if part["type"] == "text":
                    add(value, 1)
                elif part["type"] == "python":
                    add(sp("<|python_start|>"), 1)
                    add(value, 1)
                    add(sp("<|python_end|>"), 1)
                else:  # python_output: comes from the interpreter at test time, never learned
                    add(sp("<|output_start|>"), 0)
                    add(value, 0)
                    add(sp("<|output_end|>"), 0)
            add(sp("<|assistant_end|>"), 1)
        return ids[:max_tokens], mask[:max_tokens]

    def render_for_completion(self, conversation: dict) -> list[int]:
        """The ids that prime the assistant to answer: the conversation without its last (assistant) message, then
        <|assistant_start|>. A conversation that ends with a user message is rendered whole."""
        messages = conversation.get("messages") if isinstance(conversation, dict) else None
        if messages and isinstance(messages[-1], dict) and messages[-1].get("role") == "assistant":
            conversation = {**conversation, "messages": list(messages[:-1])}
        ids, _ = self.render_conversation(conversation, max_tokens=1 << 62)
        return ids + [self.encode_special("<|assistant_start|>")]


_PART_TYPES = ("text", "python", "python_output")


def _check_messages(conversation) -> list[dict]:
    """The conversation's messages with the system message merged into the first user message; UserError if the
    conversation is malformed (roles out of order, unknown role or part type, empty message)."""
    if not isinstance(conversation, dict) or not isinstance(conversation.get("messages"), list):
        raise UserError('a conversation must be a dict {"messages": [...]}')
    messages = conversation["messages"]
    if not messages:
        raise UserError("conversation has no messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise UserError(f"message {i} must be a dict with 'role' and 'content'")
        if m["role"] not in ("system", "user", "assistant"):
            raise UserError(f"message {i} has unknown role {m['role']!r} (expected system, user or assistant)")
        content = m["content"]
        if isinstance(content, str):
            if not content:
                raise UserError(f"message {i} ({m['role']}) is empty")
        elif isinstance(content, list) and m["role"] == "assistant":
            if not content:
                raise UserError(f"message {i} (assistant) is empty")
            for j, part in enumerate(content):
                if not isinstance(part, dict) or part.get("type") not in _PART_TYPES \
                        or not isinstance(part.get("text"), str):
                    raise UserError(f"message {i} part {j} must be {{'type': text|python|python_output, "
                                    f"'text': str}}, got {part!r:.80}")
        else:
            raise UserError(f"message {i} ({m['role']}): content must be a str"
                            + (" or a list of parts" if m["role"] == "assistant" else ""))
    offset = 0
    if messages[0]["role"] == "system":
        if len(messages) < 2 or messages[1]["role"] != "user":
            raise UserError("a system message must be followed by a user message")
        merged = copy.copy(messages[1])
        merged["content"] = messages[0]["content"] + "\n\n" + messages[1]["content"]
        messages, offset = [merged] + messages[2:], 1
    for i, m in enumerate(messages):
        expected = "user" if i % 2 == 0 else "assistant"
        if m["role"] != expected:
            raise UserError(f"message {i + offset} is from {m['role']} but should be from {expected} "
                            "(roles must alternate user, assistant, ..., after an optional leading system)")
    return messages
