"""Evaluation of models: bits per byte (bpb.py), the DCLM CORE metric (core.py), chat evaluation; and the greedy
samples that base training and `scripts.base_loss` print (`greedy_samples`, below: plain `model.forward` on a
fixed-shape buffer, no engine or KV cache needed)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from nanochat_jax import model

# nanochat's base-model prompts (scripts/base_loss.py and the sampling in base_train.py)
SAMPLE_PROMPTS = [
    "The capital of France is",
    "The chemical symbol of gold is",
    "If yesterday was Friday, then tomorrow will be",
    "The opposite of hot is",
    "The planets of the solar system are:",
    "My favorite color is",
    "If 5*x + 3 = 13, then x is",
]


def make_greedy_step(config, forward_fn=None):
    """Jitted (params, tokens (P, T), lens (P,)) -> (tokens, lens + 1): append each row's argmax next token."""
    if forward_fn is None:
        forward_fn = lambda p, t: model.forward(p, t, config)  # noqa: E731

    @jax.jit
    def step(params, tokens, lens):
        logits = forward_fn(params, tokens)                                   # (P, T, V)
        nxt = jnp.argmax(logits[jnp.arange(tokens.shape[0]), lens - 1], axis=-1).astype(tokens.dtype)
        tokens = tokens.at[jnp.arange(tokens.shape[0]), lens].set(nxt)
        return tokens, lens + 1

    return step


def greedy_samples(params, config, tokenizer, prompts=SAMPLE_PROMPTS, max_tokens: int = 16, step_fn=None) -> list[str]:
    """Greedy continuations of `prompts` (each prefixed with <|bos|>), decoded prompt + continuation.

    All prompts run together in one (P, T) buffer, T a multiple of 64 that fits the longest prompt plus
    `max_tokens`; the causal model ignores the padding to the right of each row.
    """
    step_fn = step_fn or make_greedy_step(config)
    bos = tokenizer.get_bos_token_id()
    encoded = [tokenizer.encode(p, prepend=bos) for p in prompts]
    T = -(-(max(len(e) for e in encoded) + max_tokens) // 64) * 64
    tokens = np.full((len(encoded), T), bos, np.int32)
    for i, e in enumerate(encoded):
        tokens[i, :len(e)] = e
    lens = np.array([len(e) for e in encoded], np.int32)
    toks, ln = tokens, lens
    for _ in range(max_tokens):
        toks, ln = step_fn(params, toks, ln)
    toks = np.asarray(toks)
    return [tokenizer.decode(toks[i, 1:lens[i] + max_tokens]) for i in range(len(encoded))]
