"""The CPU speed paths, behind the names the model and the sampler call: `linear`, `causal_attention` (and
`normed_causal_attention`, with q and k's rotary embedding and norm), `cached_attention`, `head_losses` and
`argmax`.

Each computes exactly what the plain formula does (tests/test_model.py checks values and gradients against it) and
takes its faster route only where XLA:CPU needs one: matmuls whose weight gradient is laid out for the CPU's GEMMs,
whose large forms run on the AMX tile unit as bf16x3 where the CPU has one (attention_cpu.tile_matmul; NANOCHAT_AMX=0
keeps XLA's fp32 GEMM) and whose few-row forms (a decode step) go through the few-rows kernel of attention_cpu,
causal attention through the fused C++ kernel of attention_cpu (or, where no compiler built it, in query blocks that
skip the masked-out half of the scores, short windows as bands), and the LM head's softcapped cross-entropy through
the C++ kernel (loss and gradient in one pass over the logits; where no compiler built it, XLA with a hand-written
gradient that keeps no extra (tokens, vocab) arrays). On GPU the plain paths run (cuDNN attention where it
applies)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from nanochat_jax.core.config import ModelConfig
from nanochat_jax.model import attention_cpu
from nanochat_jax.model import ops
from nanochat_jax.model.ops import F32, SOFTCAP, attention_impl, attn_scale, sdpa, softcap


def linear(x, w, out_dtype=None):
    """x @ w with the fp32 master weight cast to the activation dtype (result in out_dtype, default x's).
    fp32 on CPU goes through _cpu_matmul, the same products with a gradient XLA:CPU runs at full speed."""
    w = w.astype(x.dtype)
    if x.dtype == F32 and out_dtype in (None, F32) and jax.default_backend() == "cpu":
        return _cpu_matmul(x, w)
    return jnp.dot(x, w, preferred_element_type=out_dtype)


TN_DW_MAX = 4096   # see _cpu_matmul


@jax.custom_vjp
def _cpu_matmul(x, w):
    """x (..., K) @ w (K, M) in fp32, with a weight gradient laid out for XLA:CPU. Up to TN_DW_MAX output columns
    (the block matrices) dW contracts the token axis of x and g in place: YNNPACK runs that product well, and it
    saves a transposed copy of the activation per matrix (bench/RESULTS.md has the measurement). Wider
    (the lm_head) it is much slower than a plain GEMM, so the small (tokens, K) activation is transposed instead (the
    barrier keeps XLA from folding it back) and all three products are plain row-major GEMMs; without that, the
    (tokens, vocab) cotangent got a 256 MB transposed copy that took longer than the matmuls.
    A few rows (a decode step) go through attention_cpu's small-matmul kernel, which streams the weights once. On a
    CPU with AMX, products with every side >= 128 (training's, a long prefill's, the head's logits and dx) run on the
    tile unit as bf16x3 (attention_cpu.tile_matmul), all three products with their operands as they lie: about
    twice XLA's fp32 rate, within ~1e-5 of the fp32 product's largest entry."""
    return _product(x, w)


def _product(x, w):
    if attention_cpu.supports_small(x, w) and attention_cpu.available():
        return attention_cpu.small_matmul(x, w)
    x2 = x.reshape(-1, x.shape[-1])
    if attention_cpu.supports_tile(x2.shape[0], w.shape[1], w.shape[0]):
        return attention_cpu.tile_matmul(x2, w).reshape(*x.shape[:-1], w.shape[1])
    return jnp.dot(x, w)


def _cpu_matmul_fwd(x, w):
    return _product(x, w), (x, w)


def _cpu_matmul_bwd(res, g):
    x, w = res
    x2, g2 = x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1])
    if attention_cpu.supports_tile(*x2.shape, g2.shape[-1]):   # the same three sides as the forward's
        return attention_cpu.tile_matmul(g2, w, bt=True).reshape(x.shape), attention_cpu.tile_matmul(x2, g2, at=True)
    if g2.shape[-1] <= TN_DW_MAX:       # contract the token axis in place: dW = x^T @ g, no copy
        dw = jax.lax.dot_general(x2, g2, (((0,), (0,)), ((), ())))
    elif x2.size <= g2.size + w.size:   # transpose x: dW = x^T @ g
        dw = jnp.dot(jax.lax.optimization_barrier(x2.T), g2)
    else:                             # cheaper to transpose g and the result: dW = (g^T @ x)^T
        dw = jax.lax.optimization_barrier(jnp.dot(jax.lax.optimization_barrier(g2.T), x2)).T
    return jnp.dot(g, w.T), dw


_cpu_matmul.defvjp(_cpu_matmul_fwd, _cpu_matmul_bwd)


def _on_cpu_xla(q) -> bool:
    """Whether attention on q runs through XLA on the CPU (where the C++ kernel and the blocked paths apply)."""
    return attention_impl(q.dtype, q.shape[-1]) == "xla" and jax.default_backend() == "cpu"


def causal_attention(q, k, v, window: int, config: ModelConfig):
    """Causal attention over the sequence; query i sees keys max(0, i-window)..i. GQA by head groups.
    On XLA:CPU in fp32 the fused C++ kernel (attention_cpu) runs where it is built and the shapes allow; else short
    windows run as bands and full attention as query blocks over their key prefixes; elsewhere plain sdpa."""
    T = q.shape[1]
    local = (window, 0) if window < T - 1 else None
    on_cpu_xla = _on_cpu_xla(q)
    if on_cpu_xla and attention_cpu.supports(q, k) and attention_cpu.available():
        return attention_cpu.attention(q, k, v, attn_scale(config), min(window, T))
    if local is not None and T % window == 0 and on_cpu_xla:
        return banded_attention(q, k, v, window, config)
    if local is None and on_cpu_xla and q.dtype == F32 and T % CAUSAL_BLOCKS == 0 and T >= 64 * CAUSAL_BLOCKS:
        return blocked_causal_attention(q, k, v, config)
    return sdpa(q, k, v, config, is_causal=True, local_window_size=local)


def normed_causal_attention(q, k, v, cos, sin, window: int, config: ModelConfig):
    """causal_attention(rms_norm(apply_rotary(q)), rms_norm(apply_rotary(k)), v): the attention block's q and k as
    the projections made them. Where the fused C++ kernel takes the shapes (and the tables are one (T, D/2) pair),
    it applies the rotary embedding and the norm itself (attention_cpu.attention_rope); else they run in XLA first."""
    T = q.shape[1]
    on_cpu_xla = _on_cpu_xla(q)
    if (on_cpu_xla and cos.ndim == 2 and cos.shape[0] == T and attention_cpu.supports(q, k)
            and attention_cpu.available()):
        return attention_cpu.attention_rope(q, k, v, jnp.asarray(cos, F32), jnp.asarray(sin, F32),
                                            attn_scale(config), min(window, T), ops.RMS_EPS)
    return causal_attention(ops.rms_norm(ops.apply_rotary(q, cos, sin)), ops.rms_norm(ops.apply_rotary(k, cos, sin)),
                            v, window, config)


def cached_attention(q, k, v, mask, scale: float):
    """Attention of new queries over a KV cache (ops.cached_attention); on CPU in fp32 the kernel's version, which
    reads each row's visible span of the cache in place (XLA:CPU copied every layer's cache transposed each step)."""
    if jax.default_backend() == "cpu" and attention_cpu.supports_cache(q, k, v) and attention_cpu.available():
        return attention_cpu.cached_attention(q, k, v, mask, scale)
    return ops.cached_attention(q, k, v, mask, scale)


def argmax(logits):
    """jnp.argmax(logits, axis=-1) as int32 (the first index of each row's largest value, its first NaN where it
    holds one); on CPU in fp32 through the kernel, where XLA:CPU's (value, index) pair reduction takes a noticeable
    part of a small model's decode step."""
    if jax.default_backend() == "cpu" and logits.dtype == F32 and attention_cpu.available():
        return attention_cpu.row_argmax(logits)
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)


CAUSAL_BLOCKS = 4   # see blocked_causal_attention


def blocked_causal_attention(q, k, v, config: ModelConfig, blocks: int | None = None):
    """Full causal attention on XLA:CPU (fp32) with the queries in `blocks` blocks, block i attending only to keys
    0 .. its own last position: 5/8 of the scores at 4 blocks, the rest (exactly zero weight) never computed."""
    T = q.shape[1]
    blocks = blocks or CAUSAL_BLOCKS
    size = T // blocks
    out = []
    for i in range(blocks):
        end = (i + 1) * size
        mask = np.arange(end)[None, :] <= np.arange(i * size, end)[:, None]            # (size, end)
        out.append(_masked_attention(q[:, i * size:end], k[:, :end], v[:, :end], jnp.asarray(mask),
                                     attn_scale(config)))
    return jnp.concatenate(out, axis=1)


def _attention_scores(q, k, scale):
    """q (B, Tq, H, D), k (B, Tk, KV, D) -> scores (B, KV, H/KV, Tq, Tk), GQA by head groups."""
    B, Tq, H, D = q.shape
    KV = k.shape[2]
    return jnp.einsum("bqngd,bknd->bngqk", q.reshape(B, Tq, KV, H // KV, D), k) * scale


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _masked_attention(q, k, v, mask, scale: float):
    """softmax(q k^T * scale, where mask (Tq, Tk)) v in fp32, with a hand-written gradient: in this form the
    softmax's backward is its own loop fusion (autodiff of sdpa gets it fused into the dO V^T product, where it ran
    several times slower than the product alone). The barrier on dO V^T does not decide that: XLA:CPU barriers do
    not stop fusion, and the compiled graph fuses the same without it."""
    return _masked_attention_fwd(q, k, v, mask, scale)[0]


def _masked_attention_fwd(q, k, v, mask, scale):
    B, Tq, H, D = q.shape
    s = jnp.where(mask, _attention_scores(q, k, scale), -jnp.inf)
    e = jnp.exp(s - jnp.max(s, axis=-1, keepdims=True))
    p = e / jnp.sum(e, axis=-1, keepdims=True)
    o = jnp.einsum("bngqk,bknd->bqngd", p, v).reshape(B, Tq, H, D)
    return o, (q, k, v, p)


def _masked_attention_bwd(scale, res, g):
    q, k, v, p = res
    B, Tq, H, D = q.shape
    KV = k.shape[2]
    g = g.reshape(B, Tq, KV, H // KV, D)
    dv = jnp.einsum("bngqk,bqngd->bknd", p, g)
    dp = jax.lax.optimization_barrier(jnp.einsum("bqngd,bknd->bngqk", g, v))
    ds = p * (dp - jnp.sum(p * dp, axis=-1, keepdims=True)) * scale
    dq = jnp.einsum("bngqk,bknd->bqngd", ds, k).reshape(B, Tq, H, D)
    dk = jnp.einsum("bngqk,bqngd->bknd", ds, q.reshape(B, Tq, KV, H // KV, D))
    return dq, dk, dv, None


_masked_attention.defvjp(_masked_attention_fwd, _masked_attention_bwd)


def banded_attention(q, k, v, window: int, config: ModelConfig, block: int | None = None):
    """causal_attention for a short window on XLA:CPU: queries in blocks of `block` (default: window), each block
    attending only to the keys of its own and the window/block previous blocks under the same causal-window mask,
    so most masked-out scores (exactly zero weight either way) are never computed: at T = 4 windows, half the
    scores computed (blocks of window/2 were no faster). T must be a multiple of block,
    and window of block."""
    B, T, H, D = q.shape
    KV = k.shape[2]
    block = block or window
    n, prev = T // block, window // block
    nk = (prev + 1) * block
    qpos = np.arange(n)[:, None, None] * block + np.arange(block)[None, :, None]          # (n, block, 1)
    kpos = (np.arange(n)[:, None, None] - prev) * block + np.arange(nk)[None, None, :]    # (n, 1, nk)
    mask = (kpos >= 0) & (kpos <= qpos) & (qpos - kpos <= window)                        # (n, block, nk)
    pad = lambda a: jnp.concatenate([jnp.zeros_like(a[:, :prev * block]), a], axis=1).reshape(
        B, n + prev, block, KV, D)
    group = lambda a: jnp.concatenate([a[:, i:i + n] for i in range(prev + 1)], axis=2).reshape(B * n, nk, KV, D)
    qb = q.reshape(B * n, block, H, D)
    m = jnp.broadcast_to(jnp.asarray(mask)[None], (B, n, block, nk)).reshape(B * n, 1, block, nk)
    return sdpa(qb, group(pad(k)), group(pad(v)), config, mask=m).reshape(B, T, H, D)


def head_losses(x, w, targets, vocab_size: int):
    """Per-token cross-entropy of softcap(x @ w)[..., :vocab_size] against targets (fp32, 0 where target == -1):
    x (..., C) the final normed hidden, w (C, padded V) the fp32 LM head. On CPU in fp32 with the kernels built,
    the fused head (_head_xent); else the logits through `linear` and softcap_xent."""
    if x.dtype == F32 and jax.default_backend() == "cpu" and attention_cpu.available():
        return _head_xent(x, w, targets, vocab_size)
    return softcap_xent(linear(x, w, out_dtype=F32), targets, vocab_size)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _head_xent(x, w, targets, vocab_size: int):
    """head_losses on XLA:CPU: the logits product, then the C++ cross-entropy kernel, which computes the losses and
    (under differentiation) d loss / d logits in the same pass, over the logits' own buffer. The backward pass is
    then the head's two products with each row's cotangent applied to the small side: dx = (dz w^T) * g and
    dw = (x * g)^T dz; no (tokens, vocab) elementwise pass is left."""
    z = _product(x.reshape(-1, x.shape[-1]), w)
    losses, _ = attention_cpu.softcap_xent(z, targets.reshape(-1), vocab_size, SOFTCAP, grad=False)
    return losses.reshape(targets.shape)


def _head_xent_fwd(x, w, targets, vocab_size):
    x2 = x.reshape(-1, x.shape[-1])
    losses, dz = attention_cpu.softcap_xent(_product(x2, w), targets.reshape(-1), vocab_size, SOFTCAP)
    return losses.reshape(targets.shape), (x2, w, dz)


def _head_xent_bwd(vocab_size, res, g):
    x2, w, dz = res
    g2 = g.reshape(-1, 1).astype(F32)
    dzw, dw = _cpu_matmul_bwd((x2 * g2, w), dz)   # the head's products in _cpu_matmul's CPU layouts
    return (dzw * g2).reshape(*g.shape, x2.shape[-1]), dw, None


_head_xent.defvjp(_head_xent_fwd, _head_xent_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def softcap_xent(z, targets, vocab_size: int):
    """Cross-entropy of softcap(z)[..., :vocab_size] per token (fp32, 0 where target == -1), from the raw fp32
    logits z (..., padded V). The same numbers as token_losses(softcap(z)[..., :vocab_size], targets), with a
    hand-written gradient: d loss/dz = (softmax - onehot) * (1 - (c/15)^2), computed in one pass over z plus one
    element per row for the one-hot term (no extra (B, T, V) arrays kept for the backward pass)."""
    return _softcap_xent_fwd(z, targets, vocab_size)[0]


def _softcap_xent_parts(z, targets, vocab_size):
    col = jax.lax.broadcasted_iota(jnp.int32, z.shape, z.ndim - 1)
    valid = targets >= 0
    tgt = jnp.where(valid, targets, 0)
    return col, valid, tgt


def _softcap_xent_fwd(z, targets, vocab_size):
    col, valid, tgt = _softcap_xent_parts(z, targets, vocab_size)
    # |softcap(z)| <= 15, so a fixed shift of 15 stands in for the row max: exp(15 (t - 1)) in [e^-30, 1] neither
    # overflows nor underflows, and the sum stays a normal fp32 number. Written as 15 (t - 1), not softcap(z) - 15,
    # so XLA shares only t = tanh(z/15) with the backward pass: a shared 15 t was one more (tokens, V) array written.
    e = jnp.exp((jnp.tanh(z / SOFTCAP) - 1.0) * SOFTCAP)
    if vocab_size < z.shape[-1]:
        e = jnp.where(col < vocab_size, e, 0.0)
    lse = SOFTCAP + jnp.log(jnp.sum(e, axis=-1))
    picked = softcap(jnp.take_along_axis(z, tgt[..., None], axis=-1)[..., 0])
    losses = jnp.where(valid, lse - picked, 0.0)
    return losses, (z, targets, lse)


def _softcap_xent_bwd(vocab_size, res, g):
    z, targets, lse = res
    col, valid, tgt = _softcap_xent_parts(z, targets, vocab_size)
    g = jnp.where(valid, g, 0.0)
    # The cap (with the row terms) behind a barrier: without it XLA:CPU merges this 15 with the forward's and writes
    # that broadcast out as a whole (tokens, V) array. (On XLA:CPU a barrier keeps values apart through CSE and
    # algebraic rewrites, not through fusion.)
    g, lse, cap = jax.lax.optimization_barrier((g, lse, jnp.float32(SOFTCAP)))
    t = jnp.tanh(z / SOFTCAP)
    p = jnp.exp(t * cap - lse[..., None])
    if vocab_size < z.shape[-1]:
        p = jnp.where(col < vocab_size, p, 0.0)
    dz = g[..., None] * p * (1.0 - t * t)
    # the one-hot term, -g (1 - t^2) at each row's target, added in place: one element per row instead of an
    # iota == target test on every element (that test made the (tokens, V) fusion ~2x slower)
    V = z.shape[-1]
    t_tgt = jnp.tanh(jnp.take_along_axis(z, tgt[..., None], axis=-1)[..., 0] / SOFTCAP)
    rows = jnp.arange(dz.size // V)
    dz = dz.reshape(-1, V).at[rows, tgt.reshape(-1)].add((-g * (1.0 - t_tgt * t_tgt)).reshape(-1))
    return dz.reshape(z.shape).astype(z.dtype), None


softcap_xent.defvjp(_softcap_xent_fwd, _softcap_xent_bwd)
