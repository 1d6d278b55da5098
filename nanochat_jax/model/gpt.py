"""The GPT as Flax (linen) modules, used purely functionally: `params = GPT(config).init(key, tokens)["params"]`,
`GPT(config).apply({"params": params}, tokens)`. The same modules run training (whole sequences) and decode (a KV
cache argument), so there is one model. The functions at the bottom (`init_params`, `forward`, `loss_and_count`,
`forward_cached`) are the names the rest of the package calls.

The params are a plain nested dict of fp32 arrays in JAX (in, out) layout, which the sharding rules, the Orbax
checkpoints, the nanochat converter and Muon's parameter groups all read:

    {"wte": (V, C), "lm_head": (C, V),
     "blocks": {"0": {"attn": {"c_q": (C, H*D), "c_k": (C, KV*D), "c_v": (C, KV*D), "c_proj": (H*D, C),
                               ["ve_gate": (12, KV)]},
                      "mlp": {"c_fc": (C, F), ["c_gate": (C, F)], "c_proj": (F, C)}}, ...},
     2026 only: "value_embeds": {"1": (V, KV*D), ...}, "resid_lambdas": (L,), "x0_lambdas": (L,),
                "smear_gate": (24, 1), "smear_lambda": (1,), "backout_lambda": (1,)}

V is the padded vocab (a multiple of 64); logits are sliced back to `config.vocab_size`. Master weights are fp32;
matmuls run in `common.compute_dtype()` (fp32 on CPU, bf16 on GPU, float16 on request). Norms, rotary and the logit
softcap are computed in fp32. Every formula follows nanochat (the 2025 recipe: nanochat's GPT of October 2025;
2026: its January 2026 record, with value embeddings, smear, backout and per-layer residual scalars);
tests/test_model.py checks logits and gradients against nanochat's own numbers. Matmuls, causal attention and the
fused cross-entropy go through `kernels_cpu` (fast routes on XLA:CPU, the plain formula elsewhere).
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from nanochat_jax.core.common import compute_dtype
from nanochat_jax.core.config import SMEAR_CHANNELS, VE_GATE_CHANNELS, ModelConfig
from nanochat_jax.model.kernels_cpu import cached_attention, head_losses, linear, normed_causal_attention
from nanochat_jax.model.ops import F32, apply_rotary, attn_scale, rms_norm, rotary_tables, softcap

__all__ = ["GPT", "KVCache", "init_params", "forward", "loss_and_count", "loss", "init_cache", "forward_cached"]


# ---------------------------------------------------------------------------------------------------------------
# Initialisers: nanochat's init_weights for each recipe. Each takes (key, shape) as Flax's param initialisers do.

def _normal(std):
    return lambda key, shape: std * jax.random.normal(key, shape, F32)


def _uniform(lo, hi):
    return lambda key, shape: jax.random.uniform(key, shape, F32, lo, hi)


def _zeros(key, shape):
    return jnp.zeros(shape, F32)


def _linear_init(config: ModelConfig, scale: float = 1.0):
    """2025: N(0, 1/sqrt(fan_in) * min(1, sqrt(fan_out/fan_in))) (arXiv:2310.17813). 2026: uniform with bound
    sqrt(3)/sqrt(C) (std 1/sqrt(C), no outliers), `scale` times that for c_fc (0.4)."""
    if config.recipe == "2025":
        return lambda key, shape: _normal(1 / math.sqrt(shape[0]) * min(1.0, math.sqrt(shape[1] / shape[0])))(
            key, shape)
    s = scale * math.sqrt(3) / math.sqrt(config.n_embd)
    return _uniform(-s, s)


def _layer_frac(config: ModelConfig):
    return jnp.arange(config.n_layer, dtype=F32) / max(config.n_layer - 1, 1)


# ---------------------------------------------------------------------------------------------------------------
# The decode side of attention: where this call's tokens go in the cache

class CacheSlots(NamedTuple):
    """Where a decode call writes: rows (B, t) and positions (B, t) index the cache, delta (B, t, Tmax) is each
    query's position minus each cache position (the causal window test)."""
    rows: jax.Array
    positions: jax.Array
    delta: jax.Array


# ---------------------------------------------------------------------------------------------------------------
# Modules

class Attention(nn.Module):
    """Projections -> value-embedding mix -> rotary -> QK norm -> causal attention (windowed) -> output projection.
    With `cache` (this layer's keys and values) the new keys/values are written at `slots` first and the queries
    attend over the cache; the updated cache comes back."""
    config: ModelConfig
    layer: int

    def setup(self):
        c = self.config
        C, q_out, kv_out = c.n_embd, c.n_head * c.head_dim, c.n_kv_head * c.head_dim
        w = _linear_init(c)
        self.c_q = self.param("c_q", w, (C, q_out))
        self.c_k = self.param("c_k", w, (C, kv_out))
        self.c_v = self.param("c_v", w, (C, kv_out))
        self.c_proj = self.param("c_proj", _zeros, (q_out, C))
        if c.has_ve(self.layer):  # ResFormer value residual, gate in (0, 3) per kv head
            self.ve_gate = self.param("ve_gate", _uniform(0.0, 0.02), (VE_GATE_CHANNELS, c.n_kv_head))

    def __call__(self, x, ve, cos, sin, cache=None, slots: CacheSlots | None = None):
        c = self.config
        B, T, _ = x.shape
        H, KV, D = c.n_head, c.n_kv_head, c.head_dim
        q = linear(x, self.c_q).reshape(B, T, H, D)
        k = linear(x, self.c_k).reshape(B, T, KV, D)
        v = linear(x, self.c_v).reshape(B, T, KV, D)
        if ve is not None:
            gate = 3 * jax.nn.sigmoid(linear(x[..., :VE_GATE_CHANNELS], self.ve_gate))  # (B, T, KV)
            v = v + gate[..., None] * ve.reshape(B, T, KV, D)
        window = c.window_sizes[self.layer]
        if cache is None:   # q and k rotated and normed here or inside the CPU kernel
            y = normed_causal_attention(q, k, v, cos, sin, window, c)
        else:
            q, k = rms_norm(apply_rotary(q, cos, sin)), rms_norm(apply_rotary(k, cos, sin))
            # keys are cached as (B, KV, D, Tmax), values as (B, KV, Tmax, D): (rows, positions) index B and Tmax
            # around the other axes, so the update's shape is (B, t, KV, D) as k's
            ck, cv = cache
            ck = ck.at[slots.rows, :, :, slots.positions].set(k.astype(ck.dtype), mode="drop")
            cv = cv.at[slots.rows, :, slots.positions].set(v.astype(cv.dtype), mode="drop")
            mask = (slots.delta >= 0) & (slots.delta <= window)
            y = cached_attention(q, ck, cv, mask, attn_scale(c))
            cache = (ck, cv)
        return linear(y.reshape(B, T, -1), self.c_proj), cache


class MLP(nn.Module):
    """ReLU² (both nanochat recipes) or SwiGLU, with a zero-initialised output projection."""
    config: ModelConfig

    def setup(self):
        c = self.config
        fc = _linear_init(c, scale=0.4 if c.recipe == "2026" else 1.0)
        self.c_fc = self.param("c_fc", fc, (c.n_embd, c.mlp_hidden))
        if c.mlp == "swiglu":
            self.c_gate = self.param("c_gate", fc, (c.n_embd, c.mlp_hidden))
        self.c_proj = self.param("c_proj", _zeros, (c.mlp_hidden, c.n_embd))

    def __call__(self, x):
        h = linear(x, self.c_fc)
        if self.config.mlp == "swiglu":
            h = jax.nn.silu(linear(x, self.c_gate)) * h
        else:
            h = jnp.square(jax.nn.relu(h))
        return linear(h, self.c_proj)


class Block(nn.Module):
    """x + attn(norm(x)); x + mlp(norm(x))."""
    config: ModelConfig
    layer: int

    def setup(self):
        self.attn = Attention(self.config, self.layer)
        self.mlp = MLP(self.config)

    def __call__(self, x, ve, cos, sin, cache=None, slots=None):
        y, cache = self.attn(rms_norm(x), ve, cos, sin, cache, slots)
        x = x + y
        return x + self.mlp(rms_norm(x)), cache


class Blocks(nn.Module):
    """The stack of blocks, each a child named by its index ("0", "1", ...), as nanochat's transformer.h."""
    config: ModelConfig

    def setup(self):
        for i in range(self.config.n_layer):
            setattr(self, str(i), Block(self.config, i))

    def __call__(self, i: int, *args):
        return getattr(self, str(i))(*args)


class ValueEmbeds(nn.Module):
    """2026: one (V, KV*D) value embedding per layer in `config.ve_layers`, named by the layer's index."""
    config: ModelConfig

    def setup(self):
        c = self.config
        s = math.sqrt(3) / math.sqrt(c.n_embd)
        shape = (c.padded_vocab_size, c.n_kv_head * c.head_dim)
        self.tables = tuple(self.param(str(i), _uniform(-s, s), shape) for i in c.ve_layers)

    def __call__(self, i: int, tokens):
        return self.tables[list(self.config.ve_layers).index(i)][tokens]


class GPT(nn.Module):
    """Embedding -> (2026: smear) -> blocks (2026: per-layer residual scalars, value embeddings, backout) -> final
    norm -> LM head -> softcap. `__call__` gives logits, `loss_and_count` the summed cross-entropy without
    materialising softcapped logits, `decode` runs tokens through the KV cache."""
    config: ModelConfig

    def setup(self):
        c = self.config
        V, C = c.padded_vocab_size, c.n_embd
        if c.recipe == "2025":  # embedding N(0, 1), lm_head zero
            self.wte = self.param("wte", _normal(1.0), (V, C))
            self.lm_head = self.param("lm_head", _zeros, (C, V))
        else:                   # embedding N(0, 0.8), lm_head N(0, 0.001)
            self.wte = self.param("wte", _normal(0.8), (V, C))
            self.lm_head = self.param("lm_head", _normal(0.001), (C, V))
        self.blocks = Blocks(c)
        if c.recipe == "2026":
            self.value_embeds = ValueEmbeds(c)
            # stronger residual early, weaker deep; a decaying skip to the (smeared) embedding
            self.resid_lambdas = self.param("resid_lambdas", lambda key: 1.15 - 0.10 * _layer_frac(c))
            self.x0_lambdas = self.param("x0_lambdas", lambda key: 0.20 - 0.15 * _layer_frac(c))
            self.smear_gate = self.param("smear_gate", _uniform(0.0, 0.02), (SMEAR_CHANNELS, 1))
            self.smear_lambda = self.param("smear_lambda", _zeros, (1,))
            self.backout_lambda = self.param("backout_lambda", lambda key: jnp.full((1,), 0.2, F32))

    def embed(self, tokens):
        return rms_norm(self.wte[tokens].astype(compute_dtype()))

    def smear(self, x, prev, positions):
        """2026: x[t] += smear_lambda * sigmoid(x[t, :24] @ smear_gate) * x[t-1], for positions >= 1 (pre-smear x).
        prev: (B, C), the embedding before x[:, 0] (ignored where that position is 0)."""
        x_prev = jnp.concatenate([prev[:, None].astype(x.dtype), x[:, :-1]], axis=1)
        gate = jax.nn.sigmoid(linear(x[..., :SMEAR_CHANNELS], self.smear_gate))  # (B, T, 1)
        gate = self.smear_lambda.astype(x.dtype) * gate
        gate = jnp.where((positions >= 1)[..., None], gate, 0)
        return x + gate * x_prev

    def hidden(self, tokens, cos, sin, caches=None, slots=None, prev=None, positions=None):
        """(final normed hidden (B, T, C) in the compute dtype, updated per-layer caches or None)."""
        c = self.config
        dtype = compute_dtype()
        x = self.embed(tokens)
        if c.recipe == "2026":
            if positions is None:
                positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
                prev = jnp.zeros((tokens.shape[0], x.shape[-1]), dtype)
            x = self.smear(x, prev, positions)
        x0, x_backout, new_caches = x, None, []
        for i in range(c.n_layer):
            if c.recipe == "2026":
                x = self.resid_lambdas[i].astype(dtype) * x + self.x0_lambdas[i].astype(dtype) * x0
            ve = self.value_embeds(i, tokens).astype(dtype) if c.has_ve(i) else None
            x, cache = self.blocks(i, x, ve, cos, sin, None if caches is None else caches[i], slots)
            new_caches.append(cache)
            if c.recipe == "2026" and i == c.backout_layer:
                x_backout = x
        if x_backout is not None:  # backout: subtract a share of the mid-depth residual before the head
            x = x - self.backout_lambda.astype(dtype) * x_backout
        return rms_norm(x), (None if caches is None else new_caches)

    def head(self, x):
        """Final normed hidden (B, T, C) -> raw fp32 logits (B, T, padded vocab), before the softcap."""
        return linear(x, self.lm_head, out_dtype=F32)

    def __call__(self, tokens):
        """tokens (B, T) int32 -> fp32 logits (B, T, vocab_size), after the softcap."""
        cos, sin = rotary_tables(self.config, tokens.shape[1])
        x, _ = self.hidden(tokens, jnp.asarray(cos), jnp.asarray(sin))
        return softcap(self.head(x)[..., :self.config.vocab_size])

    def loss_and_count(self, inputs, targets):
        """(sum of token losses over targets != -1, number of such targets), both fp32 scalars."""
        cos, sin = rotary_tables(self.config, inputs.shape[1])
        x, _ = self.hidden(inputs, jnp.asarray(cos), jnp.asarray(sin))
        losses = head_losses(x, self.lm_head, targets, self.config.vocab_size)
        return losses.sum(), (targets >= 0).sum().astype(F32)

    def decode(self, tokens, cache: KVCache, pos, last=None):
        """See `forward_cached`."""
        B, t = tokens.shape
        Tmax = cache.tokens.shape[1]
        pos = pos.astype(jnp.int32)
        positions = pos[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]  # (B, t)
        cos_tab, sin_tab = rotary_tables(self.config, Tmax)
        cos, sin = jnp.asarray(cos_tab)[positions], jnp.asarray(sin_tab)[positions]
        rows = jnp.broadcast_to(jnp.arange(B)[:, None], (B, t))
        delta = positions[:, :, None] - jnp.arange(Tmax, dtype=jnp.int32)[None, None, :]
        prev_tok = jnp.take_along_axis(cache.tokens, jnp.maximum(pos - 1, 0)[:, None], axis=1)[:, 0]
        x, caches = self.hidden(tokens, cos, sin, list(zip(cache.k, cache.v)), CacheSlots(rows, positions, delta),
                                prev=self.embed(prev_tok), positions=positions)
        if last is not None:   # only one position's logits are wanted: the head's product for that row alone
            x = jnp.take_along_axis(x, last.astype(jnp.int32)[:, None, None], axis=1)
        logits = softcap(self.head(x)[..., :self.config.vocab_size])
        new_tokens = cache.tokens.at[rows, positions].set(tokens.astype(jnp.int32), mode="drop")
        return logits, KVCache(tuple(k for k, _ in caches), tuple(v for _, v in caches), new_tokens)


# ---------------------------------------------------------------------------------------------------------------
# The functional API

@functools.partial(jax.jit, static_argnums=0)
def init_params(config: ModelConfig, key) -> dict:
    """Fresh fp32 params (nanochat's init for the config's recipe). Jitted, so the random ops compile once; wrap it
    in your own jit with out_shardings to create sharded params directly."""
    return GPT(config).init(key, jnp.zeros((1, 1), jnp.int32))["params"]


def forward(params, tokens, config: ModelConfig):
    """tokens (B, T) int32 -> fp32 logits (B, T, vocab_size), after the softcap."""
    return GPT(config).apply({"params": params}, tokens)


def loss_and_count(params, inputs, targets, config: ModelConfig):
    """(sum of token losses over targets != -1, number of such targets), both fp32 scalars."""
    return GPT(config).apply({"params": params}, inputs, targets, method=GPT.loss_and_count)


def loss(params, inputs, targets, config: ModelConfig):
    """Mean cross-entropy over valid targets (nanochat's loss); 0 when there are none."""
    total, count = loss_and_count(params, inputs, targets, config)
    return total / jnp.maximum(count, 1.0)


class KVCache(NamedTuple):
    """Static-shape decode state, one array per layer (tuples of L) in the compute dtype. k: (B, KV, D, Tmax), keys
    stored transposed; v: (B, KV, Tmax, D). In these layouts both attention products are plain batched matmuls
    over (B, KV) whose operands need no copy (XLA:CPU otherwise transposed each layer's cache every step), and
    keeping the layers apart means reading one copies nothing. tokens: (B, Tmax) int32, the token ids written so
    far, from which the 2026 smear re-embeds the token before each new one (so a row may be rewound and rewritten
    from any position)."""
    k: tuple
    v: tuple
    tokens: jax.Array


def init_cache(config: ModelConfig, batch: int, max_len: int, dtype=None) -> KVCache:
    dtype = dtype or compute_dtype()
    B, KV, D, L = batch, config.n_kv_head, config.head_dim, config.n_layer
    k = tuple(jnp.zeros((B, KV, D, max_len), dtype) for _ in range(L))
    v = tuple(jnp.zeros((B, KV, max_len, D), dtype) for _ in range(L))
    return KVCache(k, v, jnp.zeros((batch, max_len), jnp.int32))


def forward_cached(params, tokens, cache: KVCache, pos, config: ModelConfig, last=None):
    """tokens (B, t) at positions pos..pos+t-1 of each row (pos: int32 (B,), traced; rows may differ) ->
    (fp32 logits (B, t, vocab_size), new cache). Positions 0..pos-1 of each row must hold that row's earlier
    tokens; anything the row wrote beyond its position (an abandoned continuation) is ignored. Writes past Tmax
    are dropped: keep pos + t <= Tmax. With `last` (int (B,), traced) only token last[b] of each row gets logits:
    (B, 1, vocab_size), the LM head's product taken for that one position (a prefill wants no more). Jit with
    `config` static and donate the cache."""
    return GPT(config).apply({"params": params}, tokens, cache, pos, last, method=GPT.decode)
