"""Helpers for the chat-stage tests (mid, SFT, RL, chat_eval, the chain): a tiny tokenizer, a tiny model, a tiny
base checkpoint under a base dir, and a fake Hugging Face Hub with fixture task data (404 for everything else)."""

from __future__ import annotations

import functools
import io
from pathlib import Path

import jax

from hubfake import FakeHub
from nanochat_jax.tasks import identity_conversations
from nanochat_jax.tasks.spelling import SpellingBee

VOCAB = 512


@functools.lru_cache(maxsize=None)
def tiny_tokenizer(vocab_size: int = VOCAB):
    """A BPE tokenizer trained on identity, spelling and GSM8K-like text (vocab 512 by default)."""
    from nanochat_jax.data.tokenizer import Tokenizer
    texts = []
    for c in identity_conversations():
        texts += [m["content"] for m in c["messages"]]
    bee = SpellingBee(size=200)
    for i in range(len(bee)):
        c = bee[i]
        texts.append(c["messages"][0]["content"])
        texts.append("".join(p["text"] for p in c["messages"][1]["content"]))
    texts += [f"Tom has {a} apples and buys {b} more. {a}+{b}={a + b} so he has {a + b}.\n#### {a + b}"
              for a in range(20) for b in range(10)]
    texts += ["Multiple Choice question: which is red?\n- apple=A\n- sky=B\n\nRespond only with the letter."] * 5
    return Tokenizer.train_from_iterator(texts, vocab_size)


def tiny_config(tokenizer=None, depth: int = 2, seq_len: int = 128, recipe: str = "2025"):
    from nanochat_jax.core.config import ModelConfig
    vocab = (tokenizer or tiny_tokenizer()).get_vocab_size()
    return ModelConfig.from_depth(depth, d_model=64, head_dim=32, vocab_size=vocab, max_seq_len=seq_len,
                                  recipe=recipe)


def tiny_params(config, seed: int = 0, scale_lm_head: float = 0.5):
    """init_params, with a non-zero lm_head (nanochat zero-initialises it, which makes every logit 0)."""
    from nanochat_jax import model
    params = model.init_params(config, jax.random.PRNGKey(seed))
    key = jax.random.PRNGKey(seed + 1)
    params["lm_head"] = scale_lm_head * jax.random.normal(key, params["lm_head"].shape, params["lm_head"].dtype)
    return params


def save_base_checkpoint(base_dir: Path, tokenizer, config, params, tag: str = "d2") -> Path:
    """A one-step 'base' checkpoint (params + an Adam-free train state) under <base>/checkpoints/base/<tag>."""
    from nanochat_jax.train.checkpoint import CheckpointManager, checkpoint_dir
    out = checkpoint_dir("base", tag)
    tokenizer.save(Path(base_dir) / "tokenizer")
    ckpt = CheckpointManager(out, async_save=False, tokenizer=tokenizer)
    ckpt.save(1, {"params": params}, {}, {"model_config": config.to_dict(), "stage": "base", "model_tag": tag})
    ckpt.close()
    return out


class FixtureHub(FakeHub):
    """A fake Hugging Face Hub on 127.0.0.1 (tests/hubfake.py; point HF_ENDPOINT at `url`) serving parquet files
    added with `add_parquet`; every other file is a 404."""

    def add_parquet(self, repo: str, path: str, rows: list[dict]):
        import pyarrow as pa
        import pyarrow.parquet as pq
        buf = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(rows), buf)
        self.files[f"{repo}/{path}"] = buf.getvalue()


def gsm8k_rows(n: int, offset: int = 0) -> list[dict]:
    rows = []
    for i in range(offset, offset + n):
        a, b = i % 20, (i * 7) % 10
        rows.append({"question": f"Tom has {a} apples and buys {b} more. How many apples does he have?",
                     "answer": f"He has {a}+{b}=<<{a}+{b}={a + b}>>{a + b} apples.\n#### {a + b}"})
    return rows


def arc_rows(n: int) -> list[dict]:
    rows = []
    for i in range(n):
        rows.append({"id": str(i), "question": f"Which number is {i % 4}?",
                     "choices": {"text": ["zero", "one", "two", "three"], "label": ["A", "B", "C", "D"]},
                     "answerKey": "ABCD"[i % 4]})
    return rows
