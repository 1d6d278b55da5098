"""The GPT, as pure functions of a params pytree (a plain nested dict of fp32 arrays, JAX (in, out) layout).

    params = {"wte": (V, C), "lm_head": (C, V),
              "blocks": {"0": {"attn": {"c_q": (C, H*D), "c_k": (C, KV*D), "c_v": (C, KV*D), "c_proj": (H*D, C),
                                        ["ve_gate": (12, KV)]},
                               "mlp": {"c_fc": (C, F), ["c_gate": (C, F)], "c_proj": (F, C)}}, ...},
              2026 only: "value_embeds": {"1": (V, KV*D), ...}, "resid_lambdas": (L,), "x0_lambdas": (L,),
                         "smear_gate": (24, 1), "smear_lambda": (1,), "backout_lambda": (1,)}

V is the padded vocab (a multiple of 64); logits are sliced back to `config.vocab_size`. Master weights are fp32;
matmuls run in `common.compute_dtype()` (fp32 on CPU, bf16 on GPU, float16 on request). Norms, rotary and the
logit softcap are computed in fp32. Every formula follows nanochat (see tests/fixtures/nanochat_ref/*.json
`formula_notes`); `tests/test_model.py` checks logits and gradients against nanochat's own numbers.
"""

from __future__ import annotations

import functools
import math
import os
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from nanochat_jax.common import compute_dtype
from nanochat_jax.config import SMEAR_CHANNELS, VE_GATE_CHANNELS, ModelConfig, flops_per_token, num_params  # noqa: F401

F32 = jnp.float32
RMS_EPS = float(np.finfo(np.float32).eps)  # nanochat: F.rms_norm(eps=None) = finfo(fp32).eps in fp32
SOFTCAP = 15.0                             # logits = 15*tanh(logits/15), in fp32


# ---------------------------------------------------------------------------------------------------------------
# Init

@functools.partial(jax.jit, static_argnums=0)
def init_params(config: ModelConfig, key) -> dict:
    """Fresh fp32 params: nanochat's init_weights for the config's recipe. Jitted (one compile instead of one per
    random op); wrap it in your own jit with out_shardings to create sharded params directly."""
    C, V, L = config.n_embd, config.padded_vocab_size, config.n_layer
    q_out, kv_out, hid = config.n_head * config.head_dim, config.n_kv_head * config.head_dim, config.mlp_hidden
    keys = iter(jax.random.split(key, 8 * L + 8))
    normal = lambda shape, std: std * jax.random.normal(next(keys), shape, F32)
    uniform = lambda shape, lo, hi: jax.random.uniform(next(keys), shape, F32, lo, hi)
    zeros = lambda shape: jnp.zeros(shape, F32)

    if config.recipe == "2025":
        # Linear N(0, 1/sqrt(fan_in)*min(1, sqrt(fan_out/fan_in))) (arXiv:2310.17813), embedding N(0,1),
        # lm_head and both output projections zero.
        linear = lambda fi, fo: normal((fi, fo), 1 / math.sqrt(fi) * min(1.0, math.sqrt(fo / fi)))
        wte, lm_head = normal((V, C), 1.0), zeros((C, V))
        fc = lambda: linear(C, hid)
    else:
        # Uniform with bound sqrt(3)/sqrt(C) (std 1/sqrt(C), no outliers); c_fc at 0.4x; embedding N(0, 0.8),
        # lm_head N(0, 0.001); output projections zero.
        s = math.sqrt(3) / math.sqrt(C)
        linear = lambda fi, fo: uniform((fi, fo), -s, s)
        wte, lm_head = normal((V, C), 0.8), normal((C, V), 0.001)
        fc = lambda: uniform((C, hid), -0.4 * s, 0.4 * s)

    blocks = {}
    for i in range(L):
        attn = {"c_q": linear(C, q_out), "c_k": linear(C, kv_out), "c_v": linear(C, kv_out),
                "c_proj": zeros((q_out, C))}
        if config.has_ve(i):
            attn["ve_gate"] = uniform((VE_GATE_CHANNELS, config.n_kv_head), 0.0, 0.02)
        mlp = {"c_fc": fc(), "c_proj": zeros((hid, C))}
        if config.mlp == "swiglu":
            mlp["c_gate"] = fc()
        blocks[str(i)] = {"attn": attn, "mlp": mlp}

    params = {"wte": wte, "lm_head": lm_head, "blocks": blocks}
    if config.recipe == "2026":
        frac = jnp.arange(L, dtype=F32) / max(L - 1, 1)
        s = math.sqrt(3) / math.sqrt(C)
        params.update({
            "value_embeds": {str(i): uniform((V, kv_out), -s, s) for i in config.ve_layers},
            "resid_lambdas": 1.15 - 0.10 * frac,   # stronger residual early, weaker deep
            "x0_lambdas": 0.20 - 0.15 * frac,      # decaying skip to the (smeared) embedding
            "smear_gate": uniform((SMEAR_CHANNELS, 1), 0.0, 0.02),
            "smear_lambda": zeros((1,)),
            "backout_lambda": jnp.full((1,), 0.2, F32),
        })
    return params


# ---------------------------------------------------------------------------------------------------------------
# Building blocks

def rms_norm(x):
    """Parameter-free RMSNorm over the last axis, computed in fp32, returned in x's dtype."""
    xf = x.astype(F32)
    return (xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + RMS_EPS)).astype(x.dtype)


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
    saves a transposed copy of the activation per matrix (d8 forward+backward 4% faster, 7 of 8 paired runs). Wider
    (the lm_head) it is much slower than a plain GEMM, so the small (tokens, K) activation is transposed instead (the
    barrier keeps XLA from folding it back) and all three products are plain row-major GEMMs; without that, the
    (tokens, vocab) cotangent got a 256 MB transposed copy that took longer than the matmuls."""
    return jnp.dot(x, w)


def _cpu_matmul_fwd(x, w):
    return jnp.dot(x, w), (x, w)


def _cpu_matmul_bwd(res, g):
    x, w = res
    x2, g2 = x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1])
    if g2.shape[-1] <= TN_DW_MAX:       # contract the token axis in place: dW = x^T @ g, no copy
        dw = jax.lax.dot_general(x2, g2, (((0,), (0,)), ((), ())))
    elif x2.size <= g2.size + w.size:   # transpose x: dW = x^T @ g
        dw = jnp.dot(jax.lax.optimization_barrier(x2.T), g2)
    else:                             # cheaper to transpose g and the result: dW = (g^T @ x)^T
        dw = jax.lax.optimization_barrier(jnp.dot(jax.lax.optimization_barrier(g2.T), x2)).T
    return jnp.dot(g, w.T), dw


_cpu_matmul.defvjp(_cpu_matmul_fwd, _cpu_matmul_bwd)


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


def qkv(p, x, ve, cos, sin, config: ModelConfig):
    """Projections -> value-embedding mix -> rotary -> QK norm. x: normed input (B, T, C)."""
    B, T, _ = x.shape
    H, KV, D = config.n_head, config.n_kv_head, config.head_dim
    q = linear(x, p["c_q"]).reshape(B, T, H, D)
    k = linear(x, p["c_k"]).reshape(B, T, KV, D)
    v = linear(x, p["c_v"]).reshape(B, T, KV, D)
    if ve is not None:  # ResFormer value residual, gate in (0, 3) per kv head
        gate = 3 * jax.nn.sigmoid(linear(x[..., :VE_GATE_CHANNELS], p["ve_gate"]))  # (B, T, KV)
        v = v + gate[..., None] * ve.reshape(B, T, KV, D)
    q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    return rms_norm(q), rms_norm(k), v


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


def causal_attention(q, k, v, window: int, config: ModelConfig):
    """Causal attention over the sequence; query i sees keys max(0, i-window)..i. GQA by head groups."""
    T = q.shape[1]
    local = (window, 0) if window < T - 1 else None
    on_cpu_xla = attention_impl(q.dtype, q.shape[-1]) == "xla" and jax.default_backend() == "cpu"
    if local is not None and T % window == 0 and on_cpu_xla:
        return banded_attention(q, k, v, window, config)
    if local is None and on_cpu_xla and q.dtype == F32 and T % CAUSAL_BLOCKS == 0 and T >= 64 * CAUSAL_BLOCKS:
        return blocked_causal_attention(q, k, v, config)
    return sdpa(q, k, v, config, is_causal=True, local_window_size=local)


CAUSAL_BLOCKS = 4   # see blocked_causal_attention


def blocked_causal_attention(q, k, v, config: ModelConfig, blocks: int | None = None):
    """Full causal attention on XLA:CPU (fp32) with the queries in `blocks` blocks, block i attending only to keys
    0 .. its own last position: 5/8 of the scores at 4 blocks, the rest (exactly zero weight) never computed.
    A d8 long-window layer (T 512) forward+backward 53 -> 35 ms on 2 cores."""
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
    not stop fusion, and without it the compiled graph fuses the same (jax 0.10.2)."""
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
    scores, ~30% less time forward+backward (window/2 blocks measured no better). T must be a multiple of block,
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


def mlp(p, x, config: ModelConfig):
    h = linear(x, p["c_fc"])
    if config.mlp == "swiglu":
        h = jax.nn.silu(linear(x, p["c_gate"])) * h
    else:
        h = jnp.square(jax.nn.relu(h))
    return linear(h, p["c_proj"])


def block(p, x, ve, cos, sin, attend, config: ModelConfig):
    """x + attn(norm(x)); x + mlp(norm(x)). `attend(q, k, v) -> y` does the attention proper."""
    B, T, _ = x.shape
    q, k, v = qkv(p["attn"], rms_norm(x), ve, cos, sin, config)
    x = x + linear(attend(q, k, v).reshape(B, T, -1), p["attn"]["c_proj"])
    return x + mlp(p["mlp"], rms_norm(x), config)


def smear(params, x, prev, positions):
    """2026: x[t] += smear_lambda * sigmoid(x[t, :24] @ smear_gate) * x[t-1], for positions >= 1 (pre-smear x).
    x: (B, T, C); prev: (B, C), the embedding before x[:, 0] (ignored where that position is 0)."""
    x_prev = jnp.concatenate([prev[:, None].astype(x.dtype), x[:, :-1]], axis=1)
    gate = jax.nn.sigmoid(linear(x[..., :SMEAR_CHANNELS], params["smear_gate"]))  # (B, T, 1)
    gate = params["smear_lambda"].astype(x.dtype) * gate
    gate = jnp.where((positions >= 1)[..., None], gate, 0)
    return x + gate * x_prev


# ---------------------------------------------------------------------------------------------------------------
# The GPT

def _hidden(params, tokens, config: ModelConfig, cos, sin, attend, prev=None, positions=None):
    """Embedding -> smear -> blocks -> backout -> final norm: (B, T, C) in the compute dtype.
    attend(layer, q, k, v) -> y. prev/positions: the smear's previous-token embedding and each token's position."""
    dtype = compute_dtype()
    x = rms_norm(params["wte"][tokens].astype(dtype))
    if config.recipe == "2026":
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
            prev = jnp.zeros((tokens.shape[0], x.shape[-1]), dtype)
        x = smear(params, x, prev, positions)
    x0, x_backout = x, None
    for i in range(config.n_layer):
        if config.recipe == "2026":
            x = params["resid_lambdas"][i].astype(dtype) * x + params["x0_lambdas"][i].astype(dtype) * x0
        ve = params["value_embeds"][str(i)][tokens].astype(dtype) if config.has_ve(i) else None
        x = block(params["blocks"][str(i)], x, ve, cos, sin, functools.partial(attend, i), config)
        if config.recipe == "2026" and i == config.backout_layer:
            x_backout = x
    if x_backout is not None:  # backout: subtract a share of the mid-depth residual before the head
        x = x - params["backout_lambda"].astype(dtype) * x_backout
    return rms_norm(x)


def _trunk(params, tokens, config: ModelConfig, cos, sin, attend, prev=None, positions=None):
    """_hidden -> fp32 softcapped logits (B, T, vocab_size)."""
    x = _hidden(params, tokens, config, cos, sin, attend, prev, positions)
    return softcap(head_logits(params, x)[..., :config.vocab_size])


def head_logits(params, x):
    """Final normed hidden (B, T, C) -> raw fp32 logits (B, T, padded vocab), before the softcap."""
    return linear(x, params["lm_head"], out_dtype=F32)


def softcap(z):
    return SOFTCAP * jnp.tanh(z.astype(F32) / SOFTCAP)


def forward(params, tokens, config: ModelConfig):
    """tokens (B, T) int32 -> fp32 logits (B, T, vocab_size), after the softcap."""
    T = tokens.shape[1]
    cos, sin = rotary_tables(config, T)
    windows = config.window_sizes
    attend = lambda i, q, k, v: causal_attention(q, k, v, windows[i], config)
    return _trunk(params, tokens, config, jnp.asarray(cos), jnp.asarray(sin), attend)


def token_losses(logits, targets):
    """Cross-entropy per token (fp32, 0 where target == -1) and the validity mask."""
    valid = targets >= 0
    tgt = jnp.where(valid, targets, 0)
    logits = logits.astype(F32)
    picked = jnp.take_along_axis(logits, tgt[..., None], axis=-1)[..., 0]
    return jnp.where(valid, jax.nn.logsumexp(logits, axis=-1) - picked, 0.0), valid


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


def loss_and_count(params, inputs, targets, config: ModelConfig):
    """(sum of token losses over targets != -1, number of such targets), both fp32 scalars."""
    cos, sin = rotary_tables(config, inputs.shape[1])
    windows = config.window_sizes
    attend = lambda i, q, k, v: causal_attention(q, k, v, windows[i], config)
    x = _hidden(params, inputs, config, jnp.asarray(cos), jnp.asarray(sin), attend)
    losses = softcap_xent(head_logits(params, x), targets, config.vocab_size)
    return losses.sum(), (targets >= 0).sum().astype(F32)


def loss(params, inputs, targets, config: ModelConfig):
    """Mean cross-entropy over valid targets (nanochat's loss); 0 when there are none."""
    total, count = loss_and_count(params, inputs, targets, config)
    return total / jnp.maximum(count, 1.0)


# ---------------------------------------------------------------------------------------------------------------
# Cached decode (the engine's prefill and step)

class KVCache(NamedTuple):
    """Static-shape decode state, one array per layer (tuples of L) in the compute dtype. k: (B, KV, D, Tmax), keys
    stored transposed; v: (B, KV, Tmax, D). In these layouts both attention products are plain batched matmuls
    over (B, KV) whose operands need no copy (XLA:CPU otherwise transposed each layer's cache every step), and
    keeping the layers apart means reading one copies nothing. tokens: (B, Tmax) int32, the token ids written so
    far, from which the 2026 smear re-embeds the token before each new one (so a row may be rewound and rewritten
    from any position)."""
    k: jax.Array
    v: jax.Array
    tokens: jax.Array


def init_cache(config: ModelConfig, batch: int, max_len: int, dtype=None) -> KVCache:
    dtype = dtype or compute_dtype()
    B, KV, D, L = batch, config.n_kv_head, config.head_dim, config.n_layer
    k = tuple(jnp.zeros((B, KV, D, max_len), dtype) for _ in range(L))
    v = tuple(jnp.zeros((B, KV, max_len, D), dtype) for _ in range(L))
    return KVCache(k, v, jnp.zeros((batch, max_len), jnp.int32))


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


def forward_cached(params, tokens, cache: KVCache, pos, config: ModelConfig):
    """tokens (B, t) at positions pos..pos+t-1 of each row (pos: int32 (B,), traced; rows may differ) ->
    (fp32 logits (B, t, vocab_size), new cache). Positions 0..pos-1 of each row must hold that row's earlier
    tokens; anything the row wrote beyond its position (an abandoned continuation) is ignored. Writes past Tmax
    are dropped: keep pos + t <= Tmax. Jit with `config` static and donate the cache."""
    B, t = tokens.shape
    Tmax = cache.tokens.shape[1]
    pos = pos.astype(jnp.int32)
    positions = pos[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]  # (B, t)
    cos_tab, sin_tab = rotary_tables(config, Tmax)
    cos, sin = jnp.asarray(cos_tab)[positions], jnp.asarray(sin_tab)[positions]
    rows = jnp.broadcast_to(jnp.arange(B)[:, None], (B, t))
    key_pos = jnp.arange(Tmax, dtype=jnp.int32)
    delta = positions[:, :, None] - key_pos[None, None, :]            # (B, t, Tmax): query pos - key pos
    windows = config.window_sizes
    new_k, new_v = list(cache.k), list(cache.v)

    def attend(i, q, k, v):
        # (rows, positions) index B and Tmax around the other axes: the update's shape is (B, t, KV, D), as k's
        new_k[i] = new_k[i].at[rows, :, :, positions].set(k.astype(new_k[i].dtype), mode="drop")
        new_v[i] = new_v[i].at[rows, :, positions].set(v.astype(new_v[i].dtype), mode="drop")
        mask = (delta >= 0) & (delta <= windows[i])
        return cached_attention(q, new_k[i], new_v[i], mask, attn_scale(config))

    prev_tok = jnp.take_along_axis(cache.tokens, jnp.maximum(pos - 1, 0)[:, None], axis=1)[:, 0]
    prev = rms_norm(params["wte"][prev_tok].astype(compute_dtype()))
    logits = _trunk(params, tokens, config, cos, sin, attend, prev=prev, positions=positions)
    new_tokens = cache.tokens.at[rows, positions].set(tokens.astype(jnp.int32), mode="drop")
    return logits, KVCache(tuple(new_k), tuple(new_v), new_tokens)
