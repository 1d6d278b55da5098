"""evaluation/bpb.py: bits per byte against a hand computation; specials and ignored targets are excluded."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nanochat_jax.evaluation.bpb import evaluate_bpb, make_bpb_fn

V = 8
TOKEN_BYTES = np.array([1, 2, 3, 1, 4, 2, 0, 0], dtype=np.int32)   # ids 6, 7 are special tokens (0 bytes)


def bigram_loss_fn(table, inputs, targets):
    """A fake model: logits at position t are table[inputs[t]] (V,)."""
    logits = table[inputs]
    valid = targets >= 0
    tgt = jnp.where(valid, targets, 0)
    nll = jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, tgt[..., None], -1)[..., 0]
    return jnp.where(valid, nll, 0.0).sum(), valid.sum()


def test_bpb_matches_hand_computation():
    table = np.log(np.arange(1, V * V + 1, dtype=np.float32).reshape(V, V))
    inputs = np.array([[6, 0, 1, 2], [3, 4, 5, 7]], dtype=np.int32)
    targets = np.array([[0, 1, -1, 7], [4, 5, 6, 2]], dtype=np.int32)
    # by hand: p(y | x) = (x*V + y + 1) / sum_j (x*V + j + 1)
    nats, nbytes = 0.0, 0
    for x, y in zip(inputs.ravel(), targets.ravel()):
        if y < 0 or TOKEN_BYTES[y] == 0:
            continue                      # ignored (-1) and special targets (7, 6) are left out
        row = np.arange(x * V + 1, x * V + V + 1, dtype=np.float64)
        nats += -math.log(row[y] / row.sum())
        nbytes += TOKEN_BYTES[y]
    want = nats / (math.log(2) * nbytes)
    assert nbytes == 1 + 2 + 4 + 2 + 3
    batches = [{"inputs": inputs, "targets": targets}] * 3
    got = evaluate_bpb(jnp.asarray(table), batches, TOKEN_BYTES, steps=2, loss_fn=bigram_loss_fn)
    assert got == pytest.approx(want, rel=1e-6)


def test_bpb_uses_only_requested_steps_and_sums_over_batches():
    table = np.zeros((V, V), np.float32)   # uniform: every token costs ln V nats
    b1 = {"inputs": np.zeros((1, 2), np.int32), "targets": np.array([[0, 4]], np.int32)}  # 1 + 4 bytes
    b2 = {"inputs": np.zeros((1, 2), np.int32), "targets": np.array([[1, -1]], np.int32)}  # 2 bytes
    fn = make_bpb_fn(loss_fn=bigram_loss_fn)
    got = evaluate_bpb(jnp.asarray(table), [b1, b2], TOKEN_BYTES, bpb_fn=fn)
    assert got == pytest.approx(3 * math.log(V) / (math.log(2) * 7), rel=1e-6)
    got1 = evaluate_bpb(jnp.asarray(table), iter([b1, b2]), TOKEN_BYTES, steps=1, bpb_fn=fn)
    assert got1 == pytest.approx(2 * math.log(V) / (math.log(2) * 5), rel=1e-6)


def test_bpb_with_the_real_model_equals_numpy_from_its_logits():
    from nanochat_jax import model
    from nanochat_jax.core.config import ModelConfig
    config = ModelConfig.from_depth(2, d_model=64, n_heads=2, vocab_size=100, max_seq_len=32)
    params = model.init_params(config, jax.random.PRNGKey(0))
    params = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.PRNGKey(1), p.shape), params)
    rng = np.random.default_rng(0)
    inputs = rng.integers(0, 100, (2, 16)).astype(np.int32)
    targets = rng.integers(0, 100, (2, 16)).astype(np.int32)
    targets[0, :3] = -1
    token_bytes = rng.integers(0, 4, 100).astype(np.int32)   # some zeros act as specials
    got = evaluate_bpb(params, [{"inputs": inputs, "targets": targets}], token_bytes, config=config)
    logits = np.asarray(model.forward(params, jnp.asarray(inputs), config), np.float64)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    keep = (targets >= 0) & (token_bytes[np.maximum(targets, 0)] > 0)
    nats = -np.take_along_axis(logp, np.maximum(targets, 0)[..., None], -1)[..., 0][keep].sum()
    want = nats / (math.log(2) * token_bytes[targets[keep]].sum())
    assert got == pytest.approx(want, rel=1e-5)


def test_base_loss_end_to_end(base_dir, tmp_path):
    """scripts.base_loss on a tiny saved model and a small text corpus: finite bpb for both splits, samples."""
    from nanochat_jax.report import writer as report
    from nanochat_jax.cli import base_loss
    from test_core_eval import save_tiny_base_model
    save_tiny_base_model(seq_len=32)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(f"line {i}: the quick brown fox jumps over the lazy dog {i * 7}\n" for i in range(400)))
    results, samples = base_loss.main(["--data-path", str(corpus), "--device-batch-size", "2",
                                       "--split-tokens", "256", "--max-new-tokens", "4"])
    assert 0 < results["train"] < 20 and 0 < results["val"] < 20
    assert len(samples) == 7 and samples[0].startswith("The capital of France is")
    text = (base_dir / "report" / "base-model-loss.md").read_text()
    assert "train bpb" in text and "The capital of France is" in text


def test_base_loss_reads_at_most_one_pass_of_a_small_split(base_dir, tmp_path, monkeypatch, capsys):
    """--split-tokens far beyond a split's size evaluates one pass over it, and says so (it used to cycle a small
    split for minutes)."""
    from nanochat_jax.cli import base_loss
    from test_core_eval import save_tiny_base_model
    save_tiny_base_model(seq_len=32)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(f"line {i}: the quick brown fox jumps over the lazy dog {i * 7}\n" for i in range(400)))
    seen = []

    def counting_bpb(params, loader, token_bytes, steps=None, **kw):
        seen.append((steps, loader.pass_batches))
        return 1.0

    monkeypatch.setattr(base_loss, "evaluate_bpb", counting_bpb)
    base_loss.main(["--data-path", str(corpus), "--device-batch-size", "2", "--split-tokens", "10000000",
                    "--max-new-tokens", "1"])
    (train_steps, train_pass), (val_steps, val_pass) = seen
    assert train_steps == train_pass and val_steps == val_pass and val_pass < 10_000_000 // 64
    out = capsys.readouterr().out
    assert f"val: --split-tokens 10,000,000 asks for 156,250 batches of 2x32, but the split fills only {val_pass}: " \
           "evaluating one pass" in out


def test_decoded_byte_counts_are_nanochat_2025s():
    """nanochat 2025 counted each token's bytes decoded on its own: a token holding part of a UTF-8 character counts
    3 (U+FFFD). Raw counts (2026, the default) and decoded counts agree on ASCII and differ there."""
    from nanochat_jax.evaluation.bpb import bytes_note
    from nanochat_jax.data.tokenizer import Tokenizer
    ranks = {bytes([i]): i for i in range(256)}
    ranks["é".encode()] = 256               # a whole 2-byte character
    ranks[b"a\xc3"] = 257                   # 'a' and the first byte of 'é'
    tok = Tokenizer(ranks)
    raw, dec = tok.token_bytes(), tok.token_bytes(decoded=True)
    assert raw[ord("a")] == dec[ord("a")] == 1 and raw[256] == dec[256] == 2
    assert raw[0xC3] == 1 and dec[0xC3] == 3                # a lone lead byte decodes to U+FFFD
    assert raw[257] == 2 and dec[257] == 1 + 3
    assert raw[tok.get_bos_token_id()] == dec[tok.get_bos_token_id()] == 0
    assert "decoded" in bytes_note("2025", "raw") and bytes_note("2026", "raw") is None
    assert bytes_note("2025", "decoded") is None
