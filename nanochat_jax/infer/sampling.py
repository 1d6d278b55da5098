"""Sampling inside the jit: the next token of every row of a decode batch. Every knob is a per-row array, so
changing it never recompiles; only `filtered` (whether any row uses top-k/top-p) picks one of two compiled paths."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from nanochat_jax.model import kernels_cpu


def sample_logits(logits, keys, pos, temperature, top_k, top_p, filtered: bool):
    """Next token per row. logits (B, V) fp32; keys (B, 2) uint32 (the row's base key; folded with `pos`, the
    position of the token being sampled, so a row never reuses a key); temperature (B,) (0 = greedy); top_k (B,)
    int32 (0 = off); top_p (B,) (>= 1 = off). `filtered` (static): whether any row uses top-k/top-p (that path
    sorts the vocabulary)."""
    logits = logits.astype(jnp.float32)
    B, V = logits.shape
    greedy = kernels_cpu.argmax(logits)
    t = jnp.where(temperature > 0, temperature, 1.0).astype(jnp.float32)
    scaled = logits / t[:, None]
    if filtered:
        desc = -jnp.sort(-scaled, axis=-1)                                         # (B, V) largest first
        k = jnp.where((top_k > 0) & (top_k < V), top_k, V)
        desc = jnp.where(jnp.arange(V)[None, :] < k[:, None], desc, -jnp.inf)      # top-k
        probs = jax.nn.softmax(desc, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs                                # mass strictly above each
        keep = (before < top_p[:, None]) | (top_p[:, None] >= 1.0)                  # top-p: smallest set >= p
        keep = keep & jnp.isfinite(desc)
        n_keep = jnp.maximum(keep.sum(axis=-1), 1)
        threshold = jnp.take_along_axis(desc, (n_keep - 1)[:, None], axis=-1)      # (B, 1)
        scaled = jnp.where(scaled >= threshold, scaled, -jnp.inf)

    def draw():
        step_keys = jax.vmap(jax.random.fold_in)(keys, pos)
        sampled = jax.vmap(jax.random.categorical)(step_keys, scaled)
        return jnp.where(temperature > 0, sampled, greedy).astype(jnp.int32)

    # the Gumbel draw over (B, V) costs as much as a small model's step: skipped when every row is greedy
    return jax.lax.cond(jnp.any(temperature > 0), draw, lambda: greedy)
