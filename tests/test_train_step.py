"""Facts about the train step in nanochat_jax/train/step.py: gradient accumulation is exact (the one loss over the
whole accumulated batch, fully masked micro-batches included), a tiny model overfits one batch, and float16 runs
with dynamic loss scaling."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import direct_muon

from nanochat_jax.core import common
from nanochat_jax import optim
from nanochat_jax.core import sharding
from nanochat_jax.train import step as train
from nanochat_jax.core.config import ModelConfig


def tiny_config(**kw):
    base = dict(n_layer=3, n_embd=64, n_head=2, n_kv_head=1, head_dim=32, vocab_size=128, sequence_len=32)
    base.update(kw)
    return ModelConfig(**base)


def noisy_params(config, seed=0):
    from nanochat_jax import model
    params = model.init_params(config, jax.random.PRNGKey(seed))
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(seed + 1), len(leaves))
    return treedef.unflatten([p + 0.02 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])


def one_device_mesh():
    return sharding.make_mesh(None, devices=jax.devices()[:1])


def setup(config, params, mesh, opt_cfg, num_steps=10, **kw):
    tx = optim.build_optimizer(params, config, opt_cfg, num_steps=num_steps, mesh=mesh)
    state, shardings = train.init_train_state(params, tx, mesh, "dp", **{k: v for k, v in kw.items()
                                                                        if k in ("loss_scaling", "init_scale")})
    step = train.make_train_step(config, tx, mesh, shardings, lr_fn=optim.lr_multiplier(opt_cfg, num_steps),
                                 **{k: v for k, v in kw.items() if k == "growth_interval"})
    return state, step


# eps 1e-4: AdamW's first step is otherwise sign-like, so fp32 summation-order noise in a near-zero gradient element
# flips its update (see tests/test_sharding.py); Muon in fp32
OPT = optim.OptConfig.for_recipe("2026", warmup_steps=0, muon_dtype="float32", adam_eps=1e-4)


def test_accumulation_equals_one_big_batch():
    """4 micro-batches of 2 rows (valid counts 57, 64, 0 and 12 per row-pair... all different, one fully masked)
    give the loss and the step of one batch of 8 rows."""
    config = tiny_config()
    params = noisy_params(config)
    rng = np.random.default_rng(0)
    A, B, T = 4, 2, config.sequence_len
    x = rng.integers(0, config.vocab_size, (A, B, T), dtype=np.int32)
    y = rng.integers(0, config.vocab_size, (A, B, T), dtype=np.int32)
    y[0][rng.random((B, T)) < 0.1] = -1
    y[2] = -1                                   # a fully masked micro-batch
    y[3][:, 6:] = -1                            # a mostly masked one
    counts = (y >= 0).reshape(A, -1).sum(1)
    assert counts[2] == 0 and len(set(counts.tolist())) == 4
    mesh = one_device_mesh()

    with direct_muon():   # the two steps' gradients differ by rounding (helpers.direct_muon)
        state, step = setup(config, params, mesh, OPT)
        state, m_acc = step(state, sharding.put_batch({"inputs": x, "targets": y}, mesh))
        acc_params = jax.device_get(state.params)
        state, step = setup(config, params, mesh, OPT)
        big = {"inputs": x.reshape(1, A * B, T), "targets": y.reshape(1, A * B, T)}
        state, m_big = step(state, sharding.put_batch(big, mesh))
        big_params = jax.device_get(state.params)

    m_acc, m_big = jax.device_get(m_acc), jax.device_get(m_big)
    assert np.isfinite(m_acc["loss"]) and np.isfinite(m_acc["grad_norm"])
    assert m_acc["loss"] == pytest.approx(m_big["loss"], rel=1e-6)
    assert m_acc["grad_norm"] == pytest.approx(m_big["grad_norm"], rel=1e-5)
    # and it is the mean over all valid tokens, not a mean of micro-batch means
    from nanochat_jax import model
    s, n = model.loss_and_count(params, jnp.asarray(x.reshape(A * B, T)), jnp.asarray(y.reshape(A * B, T)), config)
    assert m_acc["loss"] == pytest.approx(float(s / n), rel=1e-5)
    for (path, p), a, b in zip(jax.tree_util.tree_flatten_with_path(params)[0], jax.tree.leaves(acc_params),
                               jax.tree.leaves(big_params)):
        got, want = np.asarray(a) - np.asarray(p), np.asarray(b) - np.asarray(p)
        ulp = 2 * np.spacing(np.abs(np.asarray(b)).max())
        assert np.linalg.norm(got - want) <= 1e-5 * np.linalg.norm(want) + ulp, jax.tree_util.keystr(path)


def test_fully_masked_batch_gives_zero_loss_not_nan():
    config = tiny_config()
    params = noisy_params(config)
    mesh = one_device_mesh()
    state, step = setup(config, params, mesh, OPT)
    x = np.zeros((2, 2, config.sequence_len), np.int32)
    state, m = step(state, sharding.put_batch({"inputs": x, "targets": np.full_like(x, -1)}, mesh))
    m = jax.device_get(m)
    assert m["loss"] == 0.0 and m["grad_norm"] == 0.0
    assert all(np.isfinite(np.asarray(v)).all() for v in jax.tree.leaves(jax.device_get(state.params)))
    assert int(state.step) == 1


@pytest.mark.slow
def test_d4_overfits_one_batch():
    """d4 (vocab 512, batch 2 x 64 tokens): loss < 0.5 within 300 steps with nanochat's 2026 optimizer."""
    config = ModelConfig.from_depth(4, vocab_size=512, max_seq_len=64)
    from nanochat_jax import model
    params = model.init_params(config, jax.random.PRNGKey(0))
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 512, (1, 2, 65), dtype=np.int32)
    batch = {"inputs": tokens[..., :-1], "targets": tokens[..., 1:]}
    mesh = one_device_mesh()
    opt_cfg = optim.OptConfig.for_recipe("2026")
    state, step = setup(config, params, mesh, opt_cfg, num_steps=300)
    batch = sharding.put_batch(batch, mesh)
    losses = []
    for i in range(300):
        state, m = step(state, batch)
        if i == 0 or i % 10 == 9:
            losses.append(float(m["loss"]))
            if losses[-1] < 0.5:
                break
    assert losses[0] > 5.0 and losses[-1] < 0.5, losses     # from ~ln(512) = 6.2


def test_float16_dynamic_loss_scaling(monkeypatch):
    """float16 compute: an overflowing scale is halved and its step skipped; after `growth_interval` finite steps
    the scale doubles; params stay finite and do train."""
    monkeypatch.setenv("NANOCHAT_DTYPE", "float16")
    common.compute_dtype.cache_clear()
    try:
        assert common.compute_dtype() == jnp.float16
        config = tiny_config()
        params = noisy_params(config)
        mesh = one_device_mesh()
        state, step = setup(config, params, mesh, OPT, loss_scaling=None, init_scale=2.0 ** 30, growth_interval=2)
        assert state.loss_scale is not None          # on by default under float16
        rng = np.random.default_rng(0)
        x = rng.integers(0, config.vocab_size, (1, 4, config.sequence_len), dtype=np.int32)
        batch = sharding.put_batch({"inputs": x, "targets": np.roll(x, -1, axis=-1)}, mesh)
        scales, finite, losses = [], [], []
        p0 = jax.device_get(state.params)["wte"]
        for i in range(24):   # enough to come down from 2^30 and grow back whatever the init's draws
            prev = jax.device_get(state.params)["wte"]
            state, m = step(state, batch)
            m = jax.device_get(m)
            scales.append(float(m["loss_scale"]))
            finite.append(bool(m["finite"]))
            losses.append(float(m["loss"]))
            if not finite[-1]:   # a skipped step leaves the params as they were
                np.testing.assert_array_equal(jax.device_get(state.params)["wte"], prev)
        assert not finite[0] and scales[1] == scales[0] / 2          # 2^30 overflows fp16 grads: skip and halve
        assert any(finite)
        grew = [b == 2 * a for a, b in zip(scales, scales[1:])]
        assert any(grew), scales                                    # ... and grows back after finite steps
        assert all(np.isfinite(np.asarray(v)).all() for v in jax.tree.leaves(jax.device_get(state.params)))
        assert not np.array_equal(jax.device_get(state.params)["wte"], p0)
        assert np.isfinite([l for l, f in zip(losses, finite) if f]).all()
    finally:
        monkeypatch.undo()
        common.compute_dtype.cache_clear()


def test_eval_loss_is_sum_and_count():
    config = tiny_config()
    params = noisy_params(config)
    mesh = sharding.make_mesh("data=8")
    shardings = sharding.tree_shardings(params, mesh, "fsdp")
    eval_loss = train.make_eval_loss(config, mesh, shardings)
    rng = np.random.default_rng(1)
    x = rng.integers(0, config.vocab_size, (8, config.sequence_len), dtype=np.int32)
    y = np.where(rng.random(x.shape) < 0.2, -1, x).astype(np.int32)
    s, n = eval_loss(jax.device_put(params, shardings), x, y)
    from nanochat_jax import model
    s_ref, n_ref = model.loss_and_count(params, jnp.asarray(x), jnp.asarray(y), config)
    assert float(n) == float(n_ref) == float((y >= 0).sum())
    assert float(s) == pytest.approx(float(s_ref), rel=1e-5)
