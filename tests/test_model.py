"""Facts about nanochat_jax/model: parity with nanochat's own numbers, and what a GPT must do."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import load_ref, max_rel, ref_state_dict
from nanochat_jax.core import common
from nanochat_jax.interop import convert
from nanochat_jax import model
from nanochat_jax.model import attention_cpu, kernels_cpu
from nanochat_jax.core.config import ModelConfig, flops_per_token, num_params

FIXTURES = ["orig_d2", "head_d4", "head_d4_gqa", "head_d6_gqa2"]

forward = jax.jit(model.forward, static_argnums=2)
loss_and_grad = jax.jit(jax.value_and_grad(model.loss), static_argnums=3)


def _converted(name):
    arrays, meta = load_ref(name)
    params, config = convert.from_nanochat(ref_state_dict(arrays), meta["config"])
    return arrays, meta, jax.tree.map(jnp.asarray, params), config


def _noisy_params(config, seed=0):
    """init_params + N(0, 0.02) everywhere, like the fixtures, so no projection is zero (else facts are vacuous)."""
    params = model.init_params(config, jax.random.PRNGKey(seed))
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(seed + 1), len(leaves))
    return jax.tree.unflatten(tree, [p + 0.02 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])


# ---------------------------------------------------------------------------------------------------------------
# Parity with nanochat (tolerances from the fixture README: logits/loss atol 1e-5, grads rtol 1e-4 of max|g|)

@pytest.mark.parametrize("name", FIXTURES)
def test_logits_loss_and_grads_match_nanochat(name):
    arrays, meta, params, config = _converted(name)
    idx, targets = jnp.asarray(arrays["idx"]), jnp.asarray(arrays["targets"])
    logits = forward(params, idx, config)
    assert logits.shape == arrays["logits"].shape
    np.testing.assert_allclose(logits, arrays["logits"], rtol=0, atol=1e-5)
    loss, grads = loss_and_grad(params, idx, targets, config)
    assert abs(float(loss) - float(arrays["loss"])) <= 1e-5
    ours = convert.to_nanochat(jax.tree.map(np.asarray, grads), config)
    assert set(ours) == set(meta["param_shapes"])
    for key, g in ours.items():
        err = max_rel(g, arrays[f"grad/{key}"])
        assert err <= 1e-4, f"grad {key}: max_rel {err:.2e}"


@pytest.mark.parametrize("name", FIXTURES)
def test_rotary_tables_match_nanochat(name):
    arrays, meta, _, config = _converted(name)
    cos, sin = model.rotary_tables(config, arrays["idx"].shape[1])
    if config.recipe == "2025":  # bf16-rounded tables: must be bitwise, one flipped rounding moves grads by 3e-4
        np.testing.assert_array_equal(cos, arrays["rope/cos"])
        np.testing.assert_array_equal(sin, arrays["rope/sin"])
    else:
        np.testing.assert_allclose(cos, arrays["rope/cos"], rtol=0, atol=1e-6)
        np.testing.assert_allclose(sin, arrays["rope/sin"], rtol=0, atol=1e-6)


def test_converted_config_matches_fixture_derived_values():
    for name in ["head_d4", "head_d4_gqa", "head_d6_gqa2"]:
        _, meta, _, config = _converted(name)
        d = meta["derived"]
        assert list(config.window_sizes) == [w for w, _ in d["window_sizes"]]
        assert list(config.ve_layers) == d["value_embed_layers"]
        assert config.backout_layer == d["backout_layer"]
        assert config.padded_vocab_size == d["padded_vocab_size"] and config.rope_base == d["rotary_base"]


def test_param_counts_match_the_fixture_shapes():
    for name in FIXTURES:
        _, meta, params, config = _converted(name)
        actual = sum(int(np.prod(s)) for s in meta["param_shapes"].values())
        assert num_params(config)["total"] == actual == sum(p.size for p in jax.tree.leaves(params))


# ---------------------------------------------------------------------------------------------------------------
# Model facts

SMALL_2025 = ModelConfig.from_depth(2, d_model=128, n_heads=2, vocab_size=512, max_seq_len=64, recipe="2025")
SMALL_2026 = ModelConfig.from_depth(2, d_model=128, n_heads=4, n_kv_heads=2, vocab_size=500, max_seq_len=64)


@pytest.mark.parametrize("config", [SMALL_2025, SMALL_2026], ids=["2025", "2026"])
def test_causal_changing_token_t_never_changes_logits_before_t(config):
    params = _noisy_params(config)
    tokens = jax.random.randint(jax.random.PRNGKey(3), (2, 64), 0, config.vocab_size)
    t = 37
    changed = tokens.at[:, t].set((tokens[:, t] + 1) % config.vocab_size)
    a, b = forward(params, tokens, config), forward(params, changed, config)
    np.testing.assert_array_equal(a[:, :t], b[:, :t])
    assert float(jnp.abs(a[:, t:] - b[:, t:]).max()) > 1e-3


def test_sliding_window_a_key_outside_the_window_has_no_effect():
    config = ModelConfig.from_depth(2, d_model=128, n_heads=4, n_kv_heads=2, max_seq_len=256)
    B, T, window = 1, 200, 32
    q, k, v = (jax.random.normal(key, (B, T, n, 32)) for key, n in zip(jax.random.split(jax.random.PRNGKey(0), 3),
                                                                         (4, 2, 2)))
    y = model.causal_attention(q, k, v, window, config)
    i = 150
    for j, inside in [(i - window - 1, False), (i - window, True)]:
        k2, v2 = k.at[:, j].add(1.0), v.at[:, j].add(1.0)
        y2 = model.causal_attention(q, k2, v2, window, config)
        moved = float(jnp.abs(y2[:, i] - y[:, i]).max())
        assert (moved > 1e-4) if inside else (moved == 0.0), (j, moved)


def test_window_layers_are_really_windowed_in_the_model():
    """A 2026 model's short-window layers ignore keys older than the window: with the last (full) layer's
    attention projection zeroed, a token more than S back cannot reach the logits."""
    config = ModelConfig.from_depth(2, d_model=128, n_heads=2, vocab_size=512, max_seq_len=256,
                                    window_pattern="S")
    assert config.window_sizes == (128, 256)
    params = _noisy_params(config)
    last = str(config.n_layer - 1)
    params["blocks"][last]["attn"]["c_proj"] = jnp.zeros_like(params["blocks"][last]["attn"]["c_proj"])
    tokens = jax.random.randint(jax.random.PRNGKey(1), (1, 256), 0, 512)
    j, i = 20, 20 + 128 + 1 + 1  # i - j > window + 1 (smear reaches one token further back)
    changed = tokens.at[:, j].set((tokens[:, j] + 7) % 512)
    a, b = forward(params, tokens, config), forward(params, changed, config)
    np.testing.assert_array_equal(a[:, i:], b[:, i:])
    assert float(jnp.abs(a[:, j + 1:j + 100] - b[:, j + 1:j + 100]).max()) > 1e-4


@pytest.mark.parametrize("config", [SMALL_2025, SMALL_2026], ids=["2025", "2026"])
def test_loss_at_init_is_about_ln_vocab(config):
    params = model.init_params(config, jax.random.PRNGKey(0))
    tokens = jax.random.randint(jax.random.PRNGKey(1), (4, 64), 0, config.vocab_size)
    targets = jnp.roll(tokens, -1, axis=1).at[:, -1].set(-1)
    loss = float(jax.jit(model.loss, static_argnums=3)(params, tokens, targets, config))
    assert abs(loss - math.log(config.vocab_size)) < 0.02, loss


def test_loss_and_count_ignores_minus_one_and_survives_all_masked():
    params = _noisy_params(SMALL_2026)
    tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 16), 0, 500)
    targets = tokens.at[0, :5].set(-1)
    fn = jax.jit(model.loss_and_count, static_argnums=3)
    total, count = fn(params, tokens, targets, SMALL_2026)
    assert float(count) == 2 * 16 - 5
    losses, _ = model.token_losses(forward(params, tokens, SMALL_2026), targets)
    np.testing.assert_allclose(total, losses.sum(), rtol=1e-6)
    total, count = fn(params, tokens, jnp.full_like(targets, -1), SMALL_2026)
    assert float(total) == 0.0 and float(count) == 0.0
    mean = jax.jit(model.loss, static_argnums=3)
    assert float(mean(params, tokens, jnp.full_like(targets, -1), SMALL_2026)) == 0.0
    np.testing.assert_allclose(mean(params, tokens, targets, SMALL_2026), losses.sum() / (2 * 16 - 5), rtol=1e-6)


@pytest.mark.parametrize("vocab, padded", [(96, 96), (90, 96)])
def test_softcap_xent_values_and_grads_equal_autodiff_of_the_plain_loss(vocab, padded):
    """The hand-written cross-entropy (shared tanh, one-hot term added per row) against autodiff through
    softcap + token_losses, with ignored rows, a target in the last column and padded vocab columns."""
    z = jax.random.normal(jax.random.PRNGKey(0), (3, 8, padded)) * 20        # large enough to saturate the cap
    targets = jax.random.randint(jax.random.PRNGKey(1), (3, 8), 0, vocab)
    targets = targets.at[0, :3].set(-1).at[1, 0].set(vocab - 1).at[2].set(-1)
    w = jax.random.uniform(jax.random.PRNGKey(2), (3, 8))

    def plain(z):
        return model.token_losses(model.softcap(z)[..., :vocab], targets)[0]

    ours = jax.jit(jax.value_and_grad(lambda z: (model.softcap_xent(z, targets, vocab) * w).sum()))
    ref = jax.jit(jax.value_and_grad(lambda z: (plain(z) * w).sum()))
    (l1, g1), (l0, g0) = ours(z), ref(z)
    np.testing.assert_allclose(l1, l0, rtol=1e-6)
    assert max_rel(g1, g0) < 1e-6
    assert float(jnp.abs(g1[2]).max()) == 0.0 and float(jnp.abs(g1[0, :3]).max()) == 0.0   # ignored rows
    assert float(jnp.abs(g1[..., vocab:]).max(initial=0.0)) == 0.0                           # padded columns


def test_blocked_causal_attention_equals_sdpa_values_and_grads_with_gqa(monkeypatch):
    """Without the C++ kernel, on CPU a full causal layer (T a multiple of 4 blocks of >= 64) runs as query blocks over their key prefixes,
    with its own softmax gradient: the same attention as jax.nn.dot_product_attention, forward and backward."""
    config = ModelConfig.from_depth(2, d_model=128, n_heads=4, n_kv_heads=2, max_seq_len=256)
    monkeypatch.setattr(attention_cpu, "available", lambda: False)   # the path where the C++ kernel cannot be built
    calls = []
    real = kernels_cpu.blocked_causal_attention
    monkeypatch.setattr(kernels_cpu, "blocked_causal_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    kq, kk, kv, kg = jax.random.split(jax.random.PRNGKey(5), 4)
    q, g = jax.random.normal(kq, (2, 256, 4, 32)), jax.random.normal(kg, (2, 256, 4, 32))
    k, v = jax.random.normal(kk, (2, 256, 2, 32)), jax.random.normal(kv, (2, 256, 2, 32))
    ours = lambda q, k, v: model.causal_attention(q, k, v, 256, config)  # noqa: E731
    ref = lambda q, k, v: model.sdpa(q, k, v, config, is_causal=True)  # noqa: E731
    assert max_rel(np.asarray(ours(q, k, v)), np.asarray(ref(q, k, v))) <= 1e-5
    assert calls, "the full-causal layer did not take the blocked path"
    grads = [jax.grad(lambda *a, f=f: (f(*a) * g).sum(), argnums=(0, 1, 2))(q, k, v) for f in (ours, ref)]
    for a, b in zip(*grads):
        assert max_rel(np.asarray(a), np.asarray(b)) <= 1e-5


@pytest.mark.parametrize("tn_max", [4096, 0], ids=["token-contracting", "transposed-copy"])
@pytest.mark.parametrize("k,m", [(24, 40), (40, 8)])   # x smaller than g, and larger (g is transposed then)
def test_cpu_matmul_gradient_equals_autodiffs_in_every_layout(k, m, tn_max, monkeypatch):
    monkeypatch.setattr(kernels_cpu, "TN_DW_MAX", tn_max)
    kx, kw, kg = jax.random.split(jax.random.PRNGKey(4), 3)
    x, w = jax.random.normal(kx, (3, 16, k)), jax.random.normal(kw, (k, m))
    g = jax.random.normal(kg, (3, 16, m))
    ours = jax.grad(lambda x, w: (kernels_cpu._cpu_matmul(x, w) * g).sum(), argnums=(0, 1))(x, w)
    plain = jax.grad(lambda x, w: (jnp.dot(x, w, precision="highest") * g).sum(), argnums=(0, 1))(x, w)
    for a, b in zip(ours, plain):
        assert max_rel(np.asarray(a), np.asarray(b)) <= 1e-6


def test_init_params_shapes_and_dtypes_follow_the_contract():
    config = ModelConfig.from_depth(4, d_model=256, n_heads=4, n_kv_heads=2, vocab_size=500, mlp="swiglu")
    p = model.init_params(config, jax.random.PRNGKey(0))
    C, V, KVD = 256, 512, 128
    assert p["wte"].shape == (V, C) and p["lm_head"].shape == (C, V)
    a = p["blocks"]["1"]["attn"]
    assert a["c_q"].shape == (C, C) and a["c_k"].shape == (C, KVD) and a["c_proj"].shape == (C, C)
    assert a["ve_gate"].shape == (12, 2) and "ve_gate" not in p["blocks"]["0"]["attn"]
    assert set(p["value_embeds"]) == {"1", "3"} and p["value_embeds"]["3"].shape == (V, KVD)
    assert p["blocks"]["0"]["mlp"]["c_gate"].shape == (C, config.mlp_hidden)
    assert p["resid_lambdas"].shape == (4,) and p["smear_gate"].shape == (24, 1)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(p))
    assert num_params(config)["total"] == sum(x.size for x in jax.tree.leaves(p))
    assert float(jnp.abs(p["blocks"]["0"]["mlp"]["c_proj"]).max()) == 0.0  # output projections start at zero


# ---------------------------------------------------------------------------------------------------------------
# Parameter counts and FLOPs (nanochat's published numbers and formulas)

@pytest.mark.parametrize("depth,expected", [(20, 560_988_160), (32, 1_879_048_192)])
def test_param_counts_equal_nanochats_published(depth, expected):
    config = ModelConfig.from_depth(depth, recipe="2025", vocab_size=65536)
    assert num_params(config)["total"] == expected
    shapes = jax.eval_shape(lambda: model.init_params(config, jax.random.PRNGKey(0)))
    assert sum(int(np.prod(s.shape)) for s in jax.tree.leaves(shapes)) == expected


def test_flops_per_token_follow_nanochats_formulas():
    c = ModelConfig.from_depth(20, recipe="2025", vocab_size=65536)
    p = num_params(c)
    assert flops_per_token(c) == 6 * (p["total"] - p["wte"]) + 12 * 20 * 10 * 128 * 2048
    h = ModelConfig.from_depth(24, max_seq_len=2048)  # 2026: SSSL windows, last layer full
    p = num_params(h)
    attended = sum(512 if ch == "S" else 2048 for ch in ("SSSL" * 6)[:23]) + 2048
    matmul = p["total"] - p["wte"] - p["value_embeds"] - p["scalars"]
    assert flops_per_token(h) == 6 * matmul + 12 * h.n_head * h.head_dim * attended


# ---------------------------------------------------------------------------------------------------------------
# Compute dtypes

@pytest.fixture
def dtype_env(monkeypatch):
    def use(name):
        monkeypatch.setenv("NANOCHAT_DTYPE", name)
        common.compute_dtype.cache_clear()
    yield use
    common.compute_dtype.cache_clear()


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_low_precision_forward_and_grads_work(dtype_env, dtype):
    arrays, _, params, config = _converted("head_d4_gqa")
    idx, targets = jnp.asarray(arrays["idx"]), jnp.asarray(arrays["targets"])
    dtype_env(dtype)
    fwd = jax.jit(model.forward, static_argnums=2)  # fresh jit: the dtype is read at trace time
    logits = fwd(params, idx, config)
    assert logits.dtype == jnp.float32 and bool(jnp.isfinite(logits).all())
    assert float(jnp.abs(logits - arrays["logits"]).max()) < 0.1  # fp16/bf16 rounding, not a different model
    loss, grads = jax.jit(jax.value_and_grad(model.loss), static_argnums=3)(params, idx, targets, config)
    assert abs(float(loss) - float(arrays["loss"])) < 0.02
    assert all(bool(jnp.isfinite(g).all()) and g.dtype == jnp.float32 for g in jax.tree.leaves(grads))


def test_attention_implementation_choice():
    assert model.attention_impl(jnp.float32, 128) == "xla"  # never cuDNN for fp32, nor on CPU
    expect = "cudnn" if jax.default_backend() == "gpu" else "xla"
    assert model.attention_impl(jnp.bfloat16, 128) == expect
    assert model.attention_impl(jnp.bfloat16, 100) == "xla"


# ---------------------------------------------------------------------------------------------------------------
# Cached decode

def test_cached_decode_equals_full_forward_with_gqa_windows_and_ragged_rows():
    """head_d4_gqa: GQA (2 heads, 1 kv head), windows of 128 over T=256. Row 1 also writes an abandoned
    continuation and is then rewound, so rows sit at different positions."""
    arrays, _, params, config = _converted("head_d4_gqa")
    seqs = np.asarray(arrays["idx"])  # (2, 256)
    full = np.asarray(forward(params, jnp.asarray(seqs), config))
    step = jax.jit(model.forward_cached, static_argnums=4, donate_argnums=2)
    cache = model.init_cache(config, 2, 256, jnp.float32)

    def check(logits, pos, n):
        for r in range(len(pos)):
            np.testing.assert_allclose(logits[r], full[r, pos[r]:pos[r] + n], rtol=0, atol=1e-5)

    # prefill both rows with 100 tokens
    logits, cache = step(params, jnp.asarray(seqs[:, :100]), cache, jnp.array([0, 0], jnp.int32), config)
    check(np.asarray(logits), [0, 0], 100)
    # row 1 writes 40 garbage tokens at 100..139 (row 0 its real ones), then row 1 is rewound to 60
    junk = seqs[:, 100:140].copy()
    junk[1] = (junk[1] * 7 + 3) % 512
    logits, cache = step(params, jnp.asarray(junk), cache, jnp.array([100, 100], jnp.int32), config)
    check(np.asarray(logits)[:1], [100], 40)
    pos = np.array([140, 60])
    chunk = np.stack([seqs[0, 140:150], seqs[1, 60:70]])
    logits, cache = step(params, jnp.asarray(chunk), cache, jnp.asarray(pos, jnp.int32), config)
    check(np.asarray(logits), pos, 10)
    pos = pos + 10
    # one token at a time to the end of row 0 (row 0 passes the 128 window; row 1 keeps overwriting its junk)
    while pos[0] < 256:
        tok = jnp.asarray(np.stack([seqs[0, pos[0]], seqs[1, pos[1]]])[:, None])
        logits, cache = step(params, tok, cache, jnp.asarray(pos, jnp.int32), config)
        check(np.asarray(logits), pos, 1)
        pos = pos + 1


def test_cached_decode_2025_recipe():
    arrays, _, params, config = _converted("orig_d2")
    seqs = np.asarray(arrays["idx"])[:, :40]
    full = np.asarray(forward(params, jnp.asarray(seqs), config))
    step = jax.jit(model.forward_cached, static_argnums=4)
    cache = model.init_cache(config, 2, 64, jnp.float32)
    logits, cache = step(params, jnp.asarray(seqs[:, :30]), cache, jnp.zeros(2, jnp.int32), config)
    np.testing.assert_allclose(logits, full[:, :30], rtol=0, atol=1e-5)
    for p in range(30, 40):
        logits, cache = step(params, jnp.asarray(seqs[:, p:p + 1]), cache, jnp.full(2, p, jnp.int32), config)
        np.testing.assert_allclose(logits[:, 0], full[:, p], rtol=0, atol=1e-5)
    assert len(cache.k) == len(cache.v) == 2 and cache.tokens.shape == (2, 64)
    assert cache.k[0].shape == (2, 2, 64, 64) and cache.v[0].shape == (2, 2, 64, 64)   # (B, KV, D, T), (B, KV, T, D)
    # a prefill that wants one position's logits per row (`last`) gets those, and the same cache
    cache2 = model.init_cache(config, 2, 64, jnp.float32)
    last, cache2 = step(params, jnp.asarray(seqs[:, :30]), cache2, jnp.zeros(2, jnp.int32), config,
                        jnp.asarray([29, 7], jnp.int32))
    assert last.shape == (2, 1, full.shape[-1])
    np.testing.assert_allclose(last[:, 0], full[[0, 1], [29, 7]], rtol=0, atol=1e-5)
    _, ref_cache = step(params, jnp.asarray(seqs[:, :30]), model.init_cache(config, 2, 64, jnp.float32),
                        jnp.zeros(2, jnp.int32), config)
    for a, b in zip(jax.tree.leaves(cache2), jax.tree.leaves(ref_cache)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN attention needs a GPU")
def test_cudnn_attention_matches_xla_with_windows_and_gqa():
    """On a GPU (run with JAX_PLATFORMS=cuda): the cuDNN flash path agrees with XLA's in bf16, windows and GQA."""
    config = ModelConfig.from_depth(4, max_seq_len=1024, n_kv_heads=2)  # 4 heads of 128, 2 kv heads
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    q, k, v = (jax.random.normal(key, (2, 1024, n, 128), jnp.bfloat16) for key, n in zip(keys, (4, 2, 2)))
    for window in (256, 1024):
        local = (window, 0) if window < 1023 else None
        a = model.sdpa(q, k, v, config, is_causal=True, local_window_size=local, implementation="cudnn")
        b = model.sdpa(q, k, v, config, is_causal=True, local_window_size=local, implementation="xla")
        err = float(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32)).max())
        assert err < 2e-2, (window, err)


def test_2025_recipe_attends_to_the_whole_context_past_sequence_len():
    """nanochat 2025 is plain causal attention: a row longer than sequence_len (a CORE item, a long chat) sees every
    earlier token. The params do not depend on sequence_len, so a seq-32 model must give a seq-64 model's logits."""
    short = ModelConfig.from_depth(2, d_model=64, head_dim=16, vocab_size=128, max_seq_len=32, recipe="2025")
    long_ = ModelConfig.from_depth(2, d_model=64, head_dim=16, vocab_size=128, max_seq_len=64, recipe="2025")
    params = model.init_params(short, jax.random.PRNGKey(0))
    params = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.PRNGKey(1), x.shape), params)
    tokens = jax.random.randint(jax.random.PRNGKey(2), (2, 64), 0, 128)
    a, b = forward(params, tokens, short), forward(params, tokens, long_)
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)
    # and the KV-cached decode past sequence_len agrees with it
    step = jax.jit(model.forward_cached, static_argnums=4)
    cache = model.init_cache(short, 2, 64, jnp.float32)
    logits, cache = step(params, tokens[:, :40], cache, jnp.zeros(2, jnp.int32), short)
    for p in range(40, 64):
        logits, cache = step(params, tokens[:, p:p + 1], cache, jnp.full(2, p, jnp.int32), short)
        np.testing.assert_allclose(logits[:, 0], b[:, p], rtol=0, atol=1e-5)
