"""Facts about nanochat_jax/model/attention_cpu.py: the fused C++ attention, cross-entropy and Muon kernels for CPU
equal the plain formulas (in values and gradients), the model and Muon take them on CPU, and where they cannot be
built the XLA paths run."""

import importlib
import os

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
        assert err.count("fused CPU kernels are unavailable") == 1 and "no-such-compiler" in err
        config = _config(4, 2, 32)
        q, k, v, _ = _qkv(1, 128, 4, 2, 32)
        y = model.causal_attention(q, k, v, 1000, config)
        assert max_rel(np.asarray(y), np.asarray(_plain(config, 1000)(q, k, v))) <= 1e-5
        x, w, targets = _head(40, 32, 64, 60)
        losses = model.head_losses(x, w, targets, 60)
        np.testing.assert_allclose(losses, _plain_head(x, w, targets, 60), rtol=1e-5, atol=1e-6)
        W = _unit_stack(16, 64, 64)
        coeffs = muon.POLAR_EXPRESS_COEFFS
        np.testing.assert_array_equal(muon._iterate(W, coeffs), muon._iterate_direct(W, coeffs))
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


def _head(N, C, V, vocab, seed=3):
    """Hidden rows, an LM head large enough to saturate the softcap, and targets with ignored rows and the last
    vocabulary column among them."""
    ks = jax.random.split(jax.random.PRNGKey(seed), 3)
    x = jax.random.normal(ks[0], (N, C))
    w = jax.random.normal(ks[1], (C, V)) * 4.0
    targets = jax.random.randint(ks[2], (N,), 0, vocab).at[:5].set(-1).at[7].set(vocab - 1)
    return x, w, targets


def _plain_head(x, w, targets, vocab):
    return ops.token_losses(ops.softcap(x @ w)[:, :vocab], targets)[0]


@pytest.mark.parametrize("N,V,vocab", [(40, 64, 64), (37, 1024, 1001), (16, 48, 41)])
def test_xent_kernel_equals_the_plain_softcapped_loss_and_its_gradient(N, V, vocab):
    """Losses and d loss / d logits against autodiff of softcap + token_losses: SIMD body and scalar tail (vocab
    not a multiple of the vector width), padded columns and ignored rows zero."""
    z = jax.random.normal(jax.random.PRNGKey(0), (N, V)) * 20
    targets = jax.random.randint(jax.random.PRNGKey(1), (N,), 0, vocab).at[:3].set(-1).at[5].set(vocab - 1)
    plain = lambda z: ops.token_losses(ops.softcap(z)[:, :vocab], targets)[0]
    losses, dz = jax.jit(lambda z: attention_cpu.softcap_xent(z, targets, vocab, ops.SOFTCAP))(z)
    ref_dz = jax.grad(lambda z: plain(z).sum())(z)
    np.testing.assert_allclose(losses, plain(z), rtol=1e-5, atol=1e-5)
    assert max_rel(np.asarray(dz), np.asarray(ref_dz)) <= 1e-5
    assert float(jnp.abs(dz[:3]).max()) == 0.0 and float(jnp.abs(dz[:, vocab:]).max(initial=0.0)) == 0.0
    only, _ = jax.jit(lambda z: attention_cpu.softcap_xent(z, targets, vocab, ops.SOFTCAP, grad=False))(z)
    np.testing.assert_array_equal(only, losses)


def test_head_losses_take_the_kernel_and_equal_the_plain_head_in_values_and_grads(monkeypatch):
    """The fused head (logits product + kernel, hand-written backward) against autodiff of the plain head, under a
    non-uniform cotangent per token, with a padded vocabulary."""
    calls = []
    real = attention_cpu.softcap_xent
    monkeypatch.setattr(attention_cpu, "softcap_xent", lambda *a, **k: calls.append(1) or real(*a, **k))
    x, w, targets = _head(48, 32, 96, 90)
    x, targets = x.reshape(2, 24, 32), targets.reshape(2, 24)
    g = jax.random.uniform(jax.random.PRNGKey(9), targets.shape)
    ours = jax.jit(jax.value_and_grad(lambda x, w: (model.head_losses(x, w, targets, 90) * g).sum(), argnums=(0, 1)))
    plain = lambda x, w: (_plain_head(x.reshape(-1, 32), w, targets.reshape(-1), 90) * g.reshape(-1)).sum()
    ref = jax.jit(jax.value_and_grad(plain, argnums=(0, 1)))
    (l1, (dx1, dw1)), (l0, (dx0, dw0)) = ours(x, w), ref(x, w)
    assert calls
    np.testing.assert_allclose(l1, l0, rtol=1e-5)
    assert max_rel(np.asarray(dx1), np.asarray(dx0)) <= 1e-5
    assert max_rel(np.asarray(dw1), np.asarray(dw0)) <= 1e-5


# ---------------------------------------------------------------------------------------------------------------
# Muon's iteration kernel

muon = importlib.import_module("nanochat_jax.optim.muon")


def _unit_stack(k, r, c, seed=0):
    X = jax.random.normal(jax.random.PRNGKey(seed), (k, r, c))
    return X / (jnp.linalg.norm(X, axis=(-2, -1), keepdims=True) * 1.01 + 1e-6)


@pytest.mark.parametrize("k,r,c,right,gram,coeffs", [
    (4, 64, 64, False, False, muon.POLAR_EXPRESS_COEFFS),           # square, direct
    (4, 64, 256, False, True, muon.POLAR_EXPRESS_COEFFS),           # wide (an MLP's c_fc), Gram
    (4, 256, 64, True, True, muon.POLAR_EXPRESS_COEFFS),            # tall (c_proj), Gram from the right
    (3, 96, 160, False, False, muon.POLAR_EXPRESS_COEFFS[:3]),      # wide, direct, 3 iterations
    (5, 160, 96, True, False, (muon.NS_COEFFS_2025,) * 5),          # tall, direct, the 2025 coefficients
    (2, 32, 320, False, True, (muon.NS_COEFFS_2025,) * 2),          # one micro tile high, Gram
])
def test_polar_kernel_equals_the_xla_iteration(k, r, c, right, gram, coeffs):
    W = _unit_stack(k, r, c)
    ref = (muon._iterate_gram if gram else muon._iterate_direct)(W, coeffs, right)
    # fp32 products, then the default (bf16x3 on the AMX tile unit, where the CPU has one)
    for splits, tol in ((0, 1e-4), (None, 2e-4)):
        out = jax.jit(lambda w: attention_cpu.polar_iterate(w, coeffs, right, gram, splits))(W)
        assert out.shape == W.shape
        assert max_rel(out, ref) < tol, splits
    if len(coeffs) == 5:   # the whole iteration did its job: singular values in the polynomial's band around 1
        s = np.linalg.svd(np.asarray(out[0], np.float64), compute_uv=False)
        assert 0.3 < s.min() and s.max() < 1.3


@pytest.mark.parametrize("right", [False, True])
def test_polar_kernel_runs_its_products_on_amx_where_the_cpu_has_it(right):
    W = _unit_stack(4, 160, 96) if right else _unit_stack(4, 96, 160)
    coeffs = muon.POLAR_EXPRESS_COEFFS
    out = {splits: np.asarray(attention_cpu.polar_iterate(W, coeffs, right, False, splits)) for splits in (0, 1, 3)}
    if not attention_cpu.amx_ready():   # no tile unit (or a build without it): every variant is the fp32 kernel
        assert np.array_equal(out[1], out[0]) and np.array_equal(out[3], out[0])
        assert attention_cpu.polar_splits() == 0
        return
    assert not np.array_equal(out[3], out[0])      # the tile products ran
    assert max_rel(out[3], out[0]) < 1e-4          # bf16x3: fp32-grade
    assert max_rel(out[1], out[0]) > 1e-3          # plain bf16 operands: bf16-grade
    assert max_rel(out[1], out[0]) < 1e-1
    assert attention_cpu.polar_splits() == 3


def test_polar_kernel_takes_stacks_of_two_matrices_per_core_with_sides_of_32():
    cores = len(os.sched_getaffinity(0))
    assert attention_cpu.supports_polar(jnp.zeros((2 * cores, 64, 96)))
    assert not attention_cpu.supports_polar(jnp.zeros((2 * cores - 1, 64, 96)))    # fewer matrices than threads x 2
    assert not attention_cpu.supports_polar(jnp.zeros((2 * cores, 48, 96)))        # a side not a multiple of 32
    assert not attention_cpu.supports_polar(jnp.zeros((2 * cores, 64, 96), jnp.bfloat16))


def test_muon_takes_the_polar_kernel_on_cpu_and_equals_its_xla_path(monkeypatch):
    cores = len(os.sched_getaffinity(0))
    n = 2 * cores
    keys = jax.random.split(jax.random.PRNGKey(3), 3 * n)
    shapes = [(64, 64)] * n + [(64, 256)] * n + [(256, 64)] * n    # squares; MLP c_fc and c_proj (Gram form)
    params = {str(i): jax.random.normal(keys[i], s) * 0.1 for i, s in enumerate(shapes)}
    grads = {str(i): jax.random.normal(keys[-1 - i], s) for i, s in enumerate(shapes)}
    tx = muon.muon(0.02, weight_decay=0.1)
    calls = []
    real = attention_cpu.polar_iterate
    monkeypatch.setattr(attention_cpu, "polar_iterate", lambda *a: calls.append(a[2:]) or real(*a))
    upd, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    assert sorted(calls) == [(False, False), (False, True), (True, True)]   # (right, gram) per stack
    monkeypatch.setattr(attention_cpu, "supports_polar", lambda w: False)
    ref, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    for key in params:
        assert max_rel(upd[key], ref[key]) < 1e-4, key


@pytest.mark.parametrize("lead,k,n", [
    ((1,), 512, 512),     # one row (w's rows summed in order); two threads' ranges of w's rows
    ((1,), 75, 96),       # one row, one thread, k not a multiple of the one-row kernel's 8 rows
    ((1, 1), 1030, 8192), # one row, threaded, wide (the head), ranges not a multiple of 8 rows
    ((3,), 100, 96),      # one thread (w under 64 KB); k not a multiple of the kernel's 16-row chunk
    ((8, 1), 300, 2048),  # a decode step's (B, 1, k) activations; threaded, k not a multiple of 16 either
    ((13,), 64, 8192),    # a full register group of rows and a remainder; wide
    ((16,), 2048, 64),    # the most rows it serves; tall
])
def test_small_matmul_equals_the_product(lead, k, n):
    kx, kw = jax.random.split(jax.random.PRNGKey(sum(lead) + k + n))
    x, w = jax.random.normal(kx, (*lead, k)), jax.random.normal(kw, (k, n))
    assert attention_cpu.supports_small(x, w)
    y = jax.jit(attention_cpu.small_matmul)(x, w)
    assert y.shape == (*lead, n)
    assert max_rel(np.asarray(y), np.asarray(x, np.float64) @ np.asarray(w, np.float64)) < 1e-5


@pytest.mark.parametrize("V", [1, 17, 8192, 8197])
def test_row_argmax_is_jnp_argmax(V):
    """First index of the largest value, ties and all: every value equal, all -inf, +inf twice, NaNs (the first
    NaN wins, as in jnp.argmax), a tie in the vector part and the scalar tail, leading dimensions."""
    rng = np.random.default_rng(V)
    z = rng.standard_normal((8, V)).astype(np.float32)
    z[1] = np.round(z[1])
    z[2] = -np.inf
    z[3, [V // 2, V - 1]] = np.nan
    z[4, [0, V - 1]] = np.inf
    z[5] = 0.0
    z[6, [V // 3, V - 1]] = 9.0
    got = jax.jit(attention_cpu.row_argmax)(jnp.asarray(z.reshape(2, 4, V)))
    assert got.dtype == jnp.int32 and got.shape == (2, 4)
    np.testing.assert_array_equal(np.asarray(got).reshape(-1), np.asarray(jnp.argmax(jnp.asarray(z), -1)))


def test_small_matmul_takes_up_to_16_rows_and_widths_of_32():
    w = jnp.zeros((64, 96))
    assert attention_cpu.supports_small(jnp.zeros((2, 8, 64)), w)
    assert not attention_cpu.supports_small(jnp.zeros((17, 64)), w)                    # a GEMM's work
    assert not attention_cpu.supports_small(jnp.zeros((8, 64)), jnp.zeros((64, 48)))   # width not a multiple of 32
    assert not attention_cpu.supports_small(jnp.zeros((8, 64), jnp.bfloat16), w.astype(jnp.bfloat16))
    assert not attention_cpu.supports_small(jnp.zeros((0, 64)), w)


def test_linear_takes_the_small_kernel_for_decode_rows_and_keeps_its_gradient(monkeypatch):
    calls = []
    real = attention_cpu.small_matmul
    monkeypatch.setattr(attention_cpu, "small_matmul", lambda x, w: calls.append(x.shape) or real(x, w))
    kx, kw, kg = jax.random.split(jax.random.PRNGKey(7), 3)
    x, w = jax.random.normal(kx, (4, 1, 128)), jax.random.normal(kw, (128, 256)) * 0.1
    g = jax.random.normal(kg, (4, 1, 256))
    loss = lambda f: lambda x, w: (f(x, w) * g).sum()   # noqa: E731
    y, grads = kernels_cpu.linear(x, w), jax.grad(loss(kernels_cpu.linear), argnums=(0, 1))(x, w)
    assert calls and calls[0] == (4, 1, 128)
    assert max_rel(np.asarray(y), np.asarray(jnp.dot(x, w))) < 1e-5
    for a, b in zip(grads, jax.grad(loss(jnp.dot), argnums=(0, 1))(x, w)):
        assert max_rel(np.asarray(a), np.asarray(b)) < 1e-5
    calls.clear()
    kernels_cpu.linear(jnp.ones((4, 32, 128)), w)    # a prefill or training batch: XLA's GEMM
    assert calls == []


@pytest.mark.parametrize("T,H,KV,window", [(256, 4, 4, 10_000), (256, 4, 2, 64)])
def test_rope_norm_kernel_equals_rotary_and_norm_then_attention(T, H, KV, window):
    config = ModelConfig.from_depth(4, max_seq_len=T, vocab_size=512, head_dim=64, window_pattern="L")
    cos, sin = ops.rotary_tables(config, T)
    kq, kk, kv, kg = jax.random.split(jax.random.PRNGKey(T + H + KV), 4)
    q, g = jax.random.normal(kq, (2, T, H, 64)), jax.random.normal(kg, (2, T, H, 64))
    k, v = jax.random.normal(kk, (2, T, KV, 64)), jax.random.normal(kv, (2, T, KV, 64))

    def plain(q, k, v):
        return kernels_cpu.causal_attention(ops.rms_norm(ops.apply_rotary(q, cos, sin)),
                                            ops.rms_norm(ops.apply_rotary(k, cos, sin)), v, window, config)

    def fused(q, k, v):
        return kernels_cpu.normed_causal_attention(q, k, v, cos, sin, window, config)

    loss = lambda fn: jax.jit(jax.value_and_grad(lambda q, k, v: (fn(q, k, v) * g).sum(), argnums=(0, 1, 2)))  # noqa: E731
    (l1, grads1), (l0, grads0) = loss(fused)(q, k, v), loss(plain)(q, k, v)
    assert max_rel(jax.jit(fused)(q, k, v), jax.jit(plain)(q, k, v)) < 1e-5
    np.testing.assert_allclose(l1, l0, rtol=1e-5)
    for a, b in zip(grads1, grads0):
        assert max_rel(a, b) < 1e-5
    assert "nanochat_attention_rope_fwd" in jax.jit(fused).lower(q, k, v).as_text()   # the kernel ran


# ---------------------------------------------------------------------------------------------------------------
# The large products on the AMX tile unit (bf16x3)

@pytest.mark.parametrize("at,bt", [(False, False), (True, False), (False, True), (True, True)])
def test_tile_matmul_equals_the_product_at_fp32_grade(at, bt):
    """288 rows: one full block of rows and a remainder; k = 544: a full k chunk and a remainder."""
    m, n, k = 288, 160, 544
    ka, kb = jax.random.split(jax.random.PRNGKey(m + n + k + 2 * at + bt))
    a = jax.random.normal(ka, (k, m) if at else (m, k))
    b = jax.random.normal(kb, (n, k) if bt else (k, n))
    ref = (np.asarray(a, np.float64).T if at else np.asarray(a, np.float64)) @ (
        np.asarray(b, np.float64).T if bt else np.asarray(b, np.float64))
    if not attention_cpu.amx_ready():   # no tile unit here: the model's products stay on XLA's fp32 GEMM
        assert not attention_cpu.supports_tile(m, n, k)
        return
    c = np.asarray(jax.jit(lambda a, b: attention_cpu.tile_matmul(a, b, at, bt))(a, b))
    assert c.shape == (m, n)
    assert max_rel(c, ref) < 2e-5                                          # bf16x3: fp32-grade
    assert not np.array_equal(c, np.asarray(jnp.dot(a.T if at else a, b.T if bt else b)))   # the tiles ran


def test_tile_matmul_takes_sides_of_at_least_128_in_multiples_of_32(monkeypatch):
    on = attention_cpu.amx_ready()
    assert attention_cpu.supports_tile(4096, 384, 1536) == on
    assert not attention_cpu.supports_tile(4096, 96, 384)      # a side below 128
    assert not attention_cpu.supports_tile(4096, 400, 384)     # a side not a multiple of 32
    monkeypatch.setenv("NANOCHAT_AMX", "0")
    assert not attention_cpu.supports_tile(4096, 384, 1536)


@pytest.mark.parametrize("amx", ["1", "0"])
def test_linear_and_the_head_take_the_tile_kernel_for_large_products_and_keep_their_gradients(monkeypatch, amx):
    """A training-sized linear and the LM head (logits, dx and dW on the tiles) against the plain products'
    autodiff. NANOCHAT_AMX=0: XLA's fp32 products only."""
    monkeypatch.setenv("NANOCHAT_AMX", amx)
    calls = []
    real = attention_cpu.tile_matmul
    monkeypatch.setattr(attention_cpu, "tile_matmul", lambda a, b, at=False, bt=False: calls.append((at, bt)) or
                        real(a, b, at, bt))
    kx, kw, kg = jax.random.split(jax.random.PRNGKey(11), 3)
    x, w = jax.random.normal(kx, (2, 128, 256)), jax.random.normal(kw, (256, 384)) * 0.1
    g = jax.random.normal(kg, (2, 128, 384))
    loss = lambda f: lambda x, w: (f(x, w) * g).sum()   # noqa: E731
    y = jax.jit(lambda x, w: kernels_cpu.linear(x, w))(x, w)   # a fresh function: traced under this environment
    grads = jax.grad(loss(kernels_cpu.linear), argnums=(0, 1))(x, w)
    tiles = attention_cpu.amx_ready() and amx == "1"
    assert calls == ([(False, False), (False, False), (False, True), (True, False)] if tiles else [])
    ref = jnp.dot(x, w)
    assert max_rel(y, ref) < 2e-5 and (tiles or np.array_equal(y, ref))
    for a, b in zip(grads, jax.grad(loss(jnp.dot), argnums=(0, 1))(x, w)):
        assert max_rel(a, b) < 2e-5

    calls.clear()
    hx, hw, targets = _head(256, 128, 4160, 4100)          # 4,160 columns: wider than TN_DW_MAX, padded
    hx, targets = hx.reshape(2, 128, 128), targets.reshape(2, 128)
    ours = jax.value_and_grad(lambda x, w: model.head_losses(x, w, targets, 4100).sum(), argnums=(0, 1))
    plain = lambda x, w: _plain_head(x.reshape(-1, 128), w, targets.reshape(-1), 4100).sum()  # noqa: E731
    (l1, (dx1, dw1)), (l0, (dx0, dw0)) = ours(hx, hw * 0.1), jax.value_and_grad(plain, argnums=(0, 1))(hx, hw * 0.1)
    assert calls == ([(False, False), (False, True), (True, False)] if tiles else [])   # logits, dx, dW
    np.testing.assert_allclose(l1, l0, rtol=2e-5)
    assert max_rel(dx1, dx0) < 2e-5 and max_rel(dw1, dw0) < 2e-5
