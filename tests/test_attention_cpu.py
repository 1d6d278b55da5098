"""Facts about nanochat_jax/model/attention_cpu.py: the fused C++ attention kernel for CPU equals the plain
attention in values and gradients, the model takes it on CPU, and where it cannot be built the XLA paths run."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import max_rel
from nanochat_jax import model
from nanochat_jax.core.config import ModelConfig
from nanochat_jax.model import attention_cpu, kernels_cpu, ops

pytestmark = pytest.mark.skipif(not attention_cpu.available(), reason="no C++ compiler to build the kernel")


def _qkv(B, T, H, KV, D, seed=0):
    ks = jax.random.split(jax.random.PRNGKey(seed), 4)
    return (jax.random.normal(ks[0], (B, T, H, D)), jax.random.normal(ks[1], (B, T, KV, D)),
            jax.random.normal(ks[2], (B, T, KV, D)), jax.random.normal(ks[3], (B, T, H, D)))


def _config(H, KV, D):
    return ModelConfig.from_depth(2, d_model=H * D, n_heads=H, n_kv_heads=KV, max_seq_len=512)


def _plain(config, window):
    def f(q, k, v):
        local = (window, 0) if window < q.shape[1] - 1 else None
        return model.sdpa(q, k, v, config, is_causal=True, local_window_size=local)
    return f


def _grads(f, q, k, v, g):
    return jax.grad(lambda *a: (f(*a) * g).sum(), argnums=(0, 1, 2))(q, k, v)


@pytest.mark.parametrize("B,T,H,KV,D,window", [
    (2, 256, 4, 4, 64, 256),    # full causal, multi-head
    (2, 192, 4, 2, 32, 192),    # grouped-query attention, head dim 32
    (1, 256, 6, 3, 128, 100),   # a window that is not a multiple of the block
    (2, 128, 2, 1, 64, 64),     # a window of one block, multi-query
    (1, 128, 2, 2, 32, 1),      # each query sees itself and the key before
])
def test_kernel_equals_plain_attention_values_and_grads(B, T, H, KV, D, window):
    config = _config(H, KV, D)
    q, k, v, g = _qkv(B, T, H, KV, D)
    ours = lambda q, k, v: attention_cpu.attention(q, k, v, model.attn_scale(config), min(window, T))  # noqa: E731
    plain = _plain(config, window)
    assert max_rel(np.asarray(ours(q, k, v)), np.asarray(plain(q, k, v))) <= 1e-5
    for a, b in zip(_grads(ours, q, k, v, g), _grads(plain, q, k, v, g)):
        assert max_rel(np.asarray(a), np.asarray(b)) <= 1e-5


def test_keys_outside_the_window_have_exactly_no_effect():
    config = _config(4, 2, 32)
    q, k, v, _ = _qkv(1, 256, 4, 2, 32)
    y = attention_cpu.attention(q, k, v, model.attn_scale(config), 40)
    k2, v2 = k.at[:, 100].add(1.0), v.at[:, 100].add(1.0)
    y2 = attention_cpu.attention(q, k2, v2, model.attn_scale(config), 40)
    assert float(jnp.abs(y2[:, :100] - y[:, :100]).max()) == 0.0      # before the key: causal
    assert float(jnp.abs(y2[:, 141:] - y[:, 141:]).max()) == 0.0      # more than 40 after it: outside the window
    assert float(jnp.abs(y2[:, 100:141] - y[:, 100:141]).max()) > 1e-4


def test_the_model_takes_the_kernel_on_cpu_where_the_shapes_allow(monkeypatch):
    calls = []
    real = attention_cpu.attention
    monkeypatch.setattr(attention_cpu, "attention", lambda *a: calls.append(a[-1]) or real(*a))
    config = _config(4, 2, 32)
    q, k, v, _ = _qkv(1, 128, 4, 2, 32)
    model.causal_attention(q, k, v, 1000, config)
    model.causal_attention(q, k, v, 64, config)
    assert calls == [128, 64]
    q, k, v, _ = _qkv(1, 100, 4, 2, 32)            # T not a multiple of 64: the XLA path, same numbers
    y = model.causal_attention(q, k, v, 1000, config)
    assert len(calls) == 2
    assert max_rel(np.asarray(y), np.asarray(_plain(config, 1000)(q, k, v))) <= 1e-5


def test_without_the_kernel_the_banded_path_still_equals_plain_attention(monkeypatch):
    monkeypatch.setattr(attention_cpu, "available", lambda: False)
    calls = []
    real = kernels_cpu.banded_attention
    monkeypatch.setattr(kernels_cpu, "banded_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    config = _config(4, 2, 32)
    q, k, v, g = _qkv(1, 256, 4, 2, 32)
    ours = lambda q, k, v: model.causal_attention(q, k, v, 64, config)  # noqa: E731
    assert max_rel(np.asarray(ours(q, k, v)), np.asarray(_plain(config, 64)(q, k, v))) <= 1e-5
    assert calls
    for a, b in zip(_grads(ours, q, k, v, g), _grads(_plain(config, 64), q, k, v, g)):
        assert max_rel(np.asarray(a), np.asarray(b)) <= 1e-5


def test_a_failed_build_warns_once_and_leaves_the_xla_path(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("NANOCHAT_KERNEL_CACHE", str(tmp_path / "kernels"))
    attention_cpu.available.cache_clear()
    try:
        assert attention_cpu.available() is False
        assert attention_cpu.available() is False
        err = capsys.readouterr().err
        assert err.count("fused CPU attention kernel is unavailable") == 1 and "no-such-compiler" in err
        config = _config(4, 2, 32)
        q, k, v, _ = _qkv(1, 128, 4, 2, 32)
        y = model.causal_attention(q, k, v, 1000, config)
        assert max_rel(np.asarray(y), np.asarray(_plain(config, 1000)(q, k, v))) <= 1e-5
    finally:
        monkeypatch.undo()
        attention_cpu.available.cache_clear()
    assert attention_cpu.available() is True      # rebuilt from the cache, registered again


def test_switched_off_by_the_environment(monkeypatch):
    monkeypatch.setenv("NANOCHAT_CPU_ATTENTION", "0")
    attention_cpu.available.cache_clear()
    try:
        assert attention_cpu.available() is False
    finally:
        monkeypatch.undo()
        attention_cpu.available.cache_clear()


@pytest.mark.parametrize("B,t,H,KV,D,S", [(3, 1, 4, 4, 64, 77), (2, 5, 6, 2, 32, 160), (1, 1, 8, 8, 128, 40)])
def test_cached_kernel_equals_plain_cached_attention(B, t, H, KV, D, S):
    """Over a cache, with ragged rows (different filled lengths), windows and several new queries per row."""
    ks = jax.random.split(jax.random.PRNGKey(1), 3)
    q = jax.random.normal(ks[0], (B, t, H, D))
    k = jax.random.normal(ks[1], (B, KV, D, S))
    v = jax.random.normal(ks[2], (B, KV, S, D))
    pos = np.minimum(S - t, np.arange(B) * 13 + 7)[:, None] + np.arange(t)[None, :]     # (B, t) positions
    window = np.array([S, 9, S])[:B, None, None]
    delta = pos[:, :, None] - np.arange(S)[None, None, :]
    mask = jnp.asarray((delta >= 0) & (delta <= window))
    scale = 0.3
    ours = attention_cpu.cached_attention(q, k, v, mask, scale)
    plain = ops.cached_attention(q, k, v, mask, scale)
    assert max_rel(np.asarray(ours), np.asarray(plain)) <= 1e-5
    np.testing.assert_array_equal(np.asarray(kernels_cpu.cached_attention(q, k, v, mask, scale)), np.asarray(ours))


def test_cached_kernel_gives_zeros_to_a_row_that_sees_nothing():
    q, k, v = jnp.ones((2, 1, 2, 32)), jnp.ones((2, 2, 32, 16)), jnp.ones((2, 2, 16, 32))
    mask = jnp.zeros((2, 1, 16), bool).at[0, 0, :3].set(True)
    y = np.asarray(attention_cpu.cached_attention(q, k, v, mask, 1.0))
    assert np.all(y[1] == 0.0) and np.allclose(y[0], 1.0)
