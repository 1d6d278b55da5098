"""The model's plain maths, shared by training and decode: RMSNorm, rotary embeddings, the logit softcap, attention
through jax.nn.dot_product_attention (XLA or cuDNN), attention over a KV cache, and the per-token cross-entropy.
Every formula follows nanochat; tests/test_model.py checks them against nanochat's own numbers."""

from __future__ import annotations

import functools
import math
import os

import jax
import jax.numpy as jnp
import numpy as np

from nanochat_jax.core.config import ModelConfig

F32 = jnp.float32
RMS_EPS = float(np.finfo(np.float32).eps)  # nanochat: F.rms_norm(eps=None) = finfo(fp32).eps in fp32
SOFTCAP = 15.0                             # logits = 15*tanh(logits/15), in fp32


def rms_norm(x):
    """Parameter-free RMSNorm over the last axis, computed in fp32, returned in x's dtype."""
    xf = x.astype(F32)
    return (xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + RMS_EPS)).astype(x.dtype)


def softcap(z):
    return SOFTCAP * jnp.tanh(z.astype(F32) / SOFTCAP)


@functools.lru_cache(maxsize=16)
def rotary_tables(config: ModelConfig, n_pos: int):
    """cos, sin: np.float32 (n_pos, head_dim/2). Half-split RoPE, as nanochat.

    Every step is correctly rounded (power in fp64 -> fp32, reciprocal and angle in fp32, cos/sin in fp64 -> fp32),
    so that the 2025 recipe's bf16-rounded tables equal nanochat's bit for bit.
    """
    hd = config.head_dim
    exponent = (np.arange(0, hd, 2, dtype=np.float32) / np.float32(hd)).astype(np.float64)
    inv_freq = np.float32(1.0) / (float(config.rope_base) ** exponent).astype(np.float32)
    angle = np.arange(n_pos, dtype=np.float32)[:, None] * inv_freq[None, :]
    cos = np.cos(angle.astype(np.float64)).astype(np.float32)
    sin = np.sin(angle.astype(np.float64)).astype(np.float32)
    if config.recipe == "2025":  # nanochat (2025) keeps the tables in bf16 whatever the compute dtype
        cos = cos.astype(jnp.bfloat16).astype(np.float32)
        sin = sin.astype(jnp.bfloat16).astype(np.float32)
    return cos, sin


def apply_rotary(x, cos, sin):
    """x: (B, T, N, D); cos, sin: (T, D/2) or (B, T, D/2). Rotation in fp32, result in x's dtype."""
    if cos.ndim == 2:
        cos, sin = cos[None], sin[None]
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    d = x.shape[-1] // 2
    x1, x2 = x[..., :d].astype(F32), x[..., d:].astype(F32)
    y = jnp.concatenate([x1 * cos + x2 * sin, -x1 * sin + x2 * cos], axis=-1)
    return y.astype(x.dtype)


def attention_impl(dtype, head_dim: int) -> str:
    """cuDNN flash attention on GPU for bf16/fp16 with a head dim it supports, XLA otherwise
    ($NANOCHAT_ATTN=xla|cudnn overrides)."""
    forced = os.environ.get("NANOCHAT_ATTN", "").strip().lower()
    if forced:
        return forced
    ok_dtype = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    if jax.default_backend() == "gpu" and ok_dtype and head_dim % 8 == 0 and head_dim <= 128:
        return "cudnn"
    return "xla"


def attn_scale(config: ModelConfig) -> float:
    """SDPA's 1/sqrt(D), times the 2026 recipe's q and k scale of 1.2 each (folded into one factor)."""
    return config.qk_scale ** 2 / math.sqrt(config.head_dim)


def sdpa(q, k, v, config: ModelConfig, **kwargs):
    """jax.nn.dot_product_attention (q: (B, T, H, D), k/v: (B, S, KV, D)) with our scale and implementation.
    XLA on CPU has no fp16/bf16 dot with fp32 accumulation in the backward pass, so there it runs in fp32."""
    impl = kwargs.pop("implementation", None) or attention_impl(q.dtype, q.shape[-1])
    dtype = q.dtype
    if impl == "xla" and jax.default_backend() == "cpu" and dtype != F32:
        q, k, v = q.astype(F32), k.astype(F32), v.astype(F32)
    y = jax.nn.dot_product_attention(q, k, v, scale=attn_scale(config), implementation=impl, **kwargs)
    return y.astype(dtype)


def token_losses(logits, targets):
    """Cross-entropy per token (fp32, 0 where target == -1) and the validity mask."""
    valid = targets >= 0
    tgt = jnp.where(valid, targets, 0)
    logits = logits.astype(F32)
    picked = jnp.take_along_axis(logits, tgt[..., None], axis=-1)[..., 0]
    return jnp.where(valid, jax.nn.logsumexp(logits, axis=-1) - picked, 0.0), valid


def cached_attention(q, k, v, mask, scale: float):
    """Attention of q (B, t, H, D) over a cache k (B, KV, D, S), v (B, KV, S, D) where mask (B, t, S) is set; GQA
    by head groups.
    Scores and softmax in fp32, the weighted sum in v's dtype (as XLA's sdpa). Written out rather than through
    jax.nn.dot_product_attention, which wants (B, S, KV, D) and so copied the whole cache transposed every step."""
    B, t, H, D = q.shape
    KV = k.shape[1]
    qg = q.reshape(B, t, KV, H // KV, D)
    s = jnp.einsum("bqngd,bndk->bngqk", qg, k.astype(q.dtype), preferred_element_type=F32) * scale
    s = jnp.where(mask[:, None, None], s, -jnp.inf)                                     # (B, KV, G, t, S)
    p = jax.nn.softmax(s, axis=-1).astype(v.dtype)
    return jnp.einsum("bngqk,bnkd->bqngd", p, v).reshape(B, t, H, D).astype(q.dtype)
