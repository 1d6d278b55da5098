"""Facts about nanochat_jax/core/sharding.py (on 8 fake CPU devices, see conftest): meshes, the rules table, and
one train step in dp / fsdp / data4 x model2 giving the single-device result."""

import os

# XLA:CPU's concurrency-optimised scheduler lets fake devices enter independent collectives (the model-axis
# all-reduces and the data-axis permutes of the data4 x model2 step) in different orders; on a loaded 2-core
# machine the device threads then wait on each other until the 40 s rendezvous timeout aborts the process.
# Test collection runs before any device is created, so the flag still takes effect here (conftest owns XLA_FLAGS).
if "xla_cpu_enable_concurrency_optimized_scheduler" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               " --xla_cpu_enable_concurrency_optimized_scheduler=false").strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from helpers import direct_muon  # noqa: E402

from nanochat_jax import optim
from nanochat_jax.core import sharding
from nanochat_jax.train import step as train  # noqa: E402
from nanochat_jax.core.common import UserError  # noqa: E402
from nanochat_jax.core.config import ModelConfig  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def _direct_muon():
    """Every comparison here in Muon's direct form (helpers.direct_muon says why)."""
    with direct_muon():
        yield


def tiny_config(**kw):
    # 3 layers: with 2, the backout layer is the last one and backout_lambda's gradient is exactly 0 (then fp noise
    # decides the sign of its first AdamW step, which is sign-like)
    base = dict(n_layer=3, n_embd=64, n_head=2, n_kv_head=2, head_dim=32, vocab_size=128, sequence_len=32)
    base.update(kw)
    return ModelConfig(**base)


def noisy_params(config, seed=0):
    """init_params plus N(0, 0.02) noise, so no tensor is zero (as in the nanochat fixtures)."""
    from nanochat_jax import model
    params = model.init_params(config, jax.random.PRNGKey(seed))
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(seed + 1), len(leaves))
    return treedef.unflatten([p + 0.02 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])


def random_batch(config, A, B, seed=0, mask_frac=0.1):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, config.vocab_size, (A, B, config.sequence_len), dtype=np.int32)
    y = rng.integers(0, config.vocab_size, (A, B, config.sequence_len), dtype=np.int32)
    y[rng.random(y.shape) < mask_frac] = -1
    return {"inputs": x, "targets": y}


def run_step(config, params, batch, mesh, mode, opt_cfg=None):
    # adam_eps 1e-4 instead of 1e-10: AdamW's first step is otherwise sign-like (g/|g|), so a gradient element at
    # fp32 noise level flips its update by 2*lr between two summation orders; with eps, d(update)/dg <= 1/eps keeps
    # that noise (~1e-10 absolute) below 1e-5 of the update. Muon's Polar Express runs in fp32.
    opt_cfg = opt_cfg or optim.OptConfig.for_recipe(config.recipe, warmup_steps=0, muon_dtype="float32",
                                                    adam_eps=1e-4)
    tx = optim.build_optimizer(params, config, opt_cfg, num_steps=10, mesh=mesh)
    state, shardings = train.init_train_state(params, tx, mesh, mode)
    step = train.make_train_step(config, tx, mesh, shardings, lr_fn=optim.lr_multiplier(opt_cfg, 10))
    state, metrics = step(state, sharding.put_batch(batch, mesh))
    return state, jax.device_get(metrics)


# ---------------------------------------------------------------------------------------------------------------
# Meshes

def test_make_mesh_shapes_and_errors():
    assert jax.device_count() == 8
    m = sharding.make_mesh(None)
    assert dict(m.shape) == {"data": 8, "model": 1}
    m = sharding.make_mesh("data=4,model=2")
    assert dict(m.shape) == {"data": 4, "model": 2}
    assert dict(sharding.make_mesh("model=2").shape) == {"data": 4, "model": 2}
    for bad in ("data=3", "data=4,model=4", "dp=8", "data=x"):
        with pytest.raises(UserError) as e:
            sharding.make_mesh(bad)
        assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="needs 3 devices, but 8"):
        sharding.make_mesh("data=3")


def test_mesh_mismatch_is_one_line_for_users(capsys):
    from nanochat_jax.core.common import run_main
    with pytest.raises(SystemExit) as e:
        run_main(lambda argv: sharding.make_mesh("data=16"))
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1


# ---------------------------------------------------------------------------------------------------------------
# Rules table

def test_rules_table_modes():
    config = tiny_config()
    params = jax.eval_shape(lambda: noisy_params(config))
    mesh = sharding.make_mesh("data=4,model=2")
    dp = sharding.param_specs(params, "dp", mesh)
    specs = jax.tree.leaves(dp, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
    assert specs and all(all(a is None for a in s) for s in specs)
    tp = sharding.param_specs(params, "tp", mesh)
    assert tp["blocks"]["0"]["attn"]["c_q"] == jax.sharding.PartitionSpec(None, "model")
    assert tp["blocks"]["0"]["attn"]["c_proj"] == jax.sharding.PartitionSpec("model")
    assert tp["blocks"]["0"]["mlp"]["c_proj"] == jax.sharding.PartitionSpec("model")
    assert tp["resid_lambdas"] == jax.sharding.PartitionSpec()
    fsdp = sharding.param_specs(params, "fsdp", mesh)
    assert "data" in tuple(fsdp["wte"]) and "data" in tuple(fsdp["blocks"]["1"]["mlp"]["c_fc"])
    with pytest.raises(UserError):
        sharding.param_specs(params, "zero3", mesh)


def test_fsdp_really_shards_params_and_optimizer_state():
    config = tiny_config()
    params = noisy_params(config)
    mesh = sharding.make_mesh("data=8")
    opt_cfg = optim.OptConfig.for_recipe("2026", muon_dtype="float32")
    tx = optim.build_optimizer(params, config, opt_cfg, 10, mesh=mesh)
    state, _ = train.init_train_state(params, tx, mesh, "fsdp")
    big = [x for x in jax.tree.leaves(state.params) if x.size >= 8 * 64]
    assert big and all(not x.sharding.is_fully_replicated for x in big)
    for x in big:   # each device holds 1/8 of the tensor
        assert x.addressable_shards[0].data.size * 8 == x.size
    opt_big = [x for x in jax.tree.leaves(state.opt_state) if x.size >= 8 * 64]
    # Adam mu/nu per AdamW matrix, Muon momentum for every block matrix (stacked per shape): more than the params
    assert sum(x.size for x in opt_big) > sum(x.size for x in big)
    assert all(not x.sharding.is_fully_replicated for x in opt_big)
    assert all(x.addressable_shards[0].data.size * 8 == x.size for x in opt_big)


# ---------------------------------------------------------------------------------------------------------------
# Sharded step == single-device step (fp32 throughout, Muon's Polar Express in fp32)

@pytest.fixture(scope="module")
def reference():
    config = tiny_config()
    params = noisy_params(config)
    batch = random_batch(config, A=2, B=8)
    one = sharding.make_mesh(None, devices=jax.devices()[:1])
    state, metrics = run_step(config, params, batch, one, "dp")
    return config, params, batch, jax.device_get(state.params), metrics


@pytest.mark.slow
@pytest.mark.parametrize("mesh_spec,mode", [("data=8", "dp"), ("data=8", "fsdp"), ("data=4,model=2", "tp")])
def test_sharded_step_equals_single_device(reference, mesh_spec, mode):
    config, params, batch, ref_params, ref_metrics = reference
    mesh = sharding.make_mesh(mesh_spec)
    state, metrics = run_step(config, params, batch, mesh, mode)
    assert abs(metrics["loss"] - ref_metrics["loss"]) <= 1e-5 * abs(ref_metrics["loss"])
    assert abs(metrics["grad_norm"] - ref_metrics["grad_norm"]) <= 1e-5 * ref_metrics["grad_norm"]
    # every param moves where the single-device step moved it: per tensor, rel. Frobenius error <= 1e-5, and
    # max|a-b|/max|b| <= 1e-5 for Muon's matrices (<= 1e-4 for AdamW's, whose step-1 update is ill-conditioned
    # in elements with near-zero gradient, even with eps 1e-4)
    labels = optim.param_labels(params)
    for (path, p), a, b, lab in zip(jax.tree_util.tree_flatten_with_path(params)[0], jax.tree.leaves(state.params),
                                    jax.tree.leaves(ref_params), jax.tree.leaves(labels)):
        got, want = np.asarray(a) - np.asarray(p), np.asarray(b) - np.asarray(p)
        ulp = 2 * np.spacing(np.abs(np.asarray(b)).max())   # the params themselves are stored to one fp32 ulp
        assert np.abs(want).max() > 0
        assert np.linalg.norm(got - want) <= 1e-5 * np.linalg.norm(want) + ulp, jax.tree_util.keystr(path)
        tol = 1e-5 if lab == "muon" else 1e-4
        assert np.abs(got - want).max() <= tol * np.abs(want).max() + ulp, jax.tree_util.keystr(path)


def test_muon_orthogonalisation_is_split_across_devices():
    """With the mesh, each device's compiled Muon update does ~1/8 of the flops it does without (every device
    repeating all the Newton-Schulz work)."""
    config = tiny_config(n_layer=4)
    params = noisy_params(config)
    mesh = sharding.make_mesh("data=8")
    muon_params = {k: v for k, v in params.items() if k == "blocks"}
    rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    flops = {}
    for name, m in (("split", mesh), ("repeated", None)):
        tx = optim.muon(0.02, recipe="2026", dtype=jnp.float32, mesh=m)
        st = tx.init(muon_params)
        fn = jax.jit(tx.update, in_shardings=rep, out_shardings=rep)
        cost = fn.lower(muon_params, st, muon_params).compile().cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        flops[name] = cost["flops"]
    assert flops["split"] < flops["repeated"] / 4, flops


@pytest.mark.parametrize("recipe", ["2025", "2026"])
def test_split_muon_equals_one_device_muon(recipe):
    """Muon split over 8 devices gives the single-device updates and state over two steps: for a stack the devices
    divide (9 c_fc-like + 7 c_proj-like matrices, iterated from the left and the right, device 4 getting one of
    each) its state is sharded, 1/8 per device; for one they do not (6 square matrices on devices 0-5) it stays
    whole, and the next such bucket starts at device 6 (3 of them: devices 6, 7 and 0)."""
    shapes = ([(64, 64)] * 6 + [(64, 256)] * 5 + [(256, 64)] * 4 + [(64, 256)] * 4 + [(256, 64)] * 3 + [(12, 2)] * 2
              + [(64, 128)] * 3)
    keys = jax.random.split(jax.random.PRNGKey(0), 3 * len(shapes))
    params = {f"w{i}": jax.random.normal(keys[i], s) * 0.05 for i, s in enumerate(shapes)}
    grads = [{f"w{i}": jax.random.normal(keys[(t + 1) * len(shapes) + i], s) for i, s in enumerate(shapes)}
             for t in range(2)]
    mesh = sharding.make_mesh("data=8")
    kw = dict(recipe=recipe, dtype=jnp.float32)
    single, split = optim.muon(0.02, 0.9, 0.1, **kw), optim.muon(0.02, 0.9, 0.1, mesh=mesh, **kw)
    rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    st_sh = sharding.tree_shardings(jax.eval_shape(split.init, params), mesh, "dp")
    fn = jax.jit(split.update, in_shardings=(rep, st_sh, rep), out_shardings=(rep, st_sh))
    s1, s8 = single.init(params), jax.jit(split.init, out_shardings=st_sh)(params)
    for g in grads:
        u1, s1 = single.update(g, s1, params)
        u8, s8 = fn(g, s8, params)
        for a, b in zip(jax.tree.leaves((u8, s8)), jax.tree.leaves((u1, s1))):
            a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
            assert np.abs(a - b).max() <= 1e-5 * max(np.abs(b).max(), 1e-30)
    wide = s8.momentum["muon_64x256"]
    assert wide.shape == (16, 64 * 256) and wide.addressable_shards[0].data.shape == (2, 64 * 256)
    assert s8.momentum["muon_64x64"].sharding.is_fully_replicated
    assert s8.momentum["muon_64x128"].shape == (3, 64 * 128) and s8.momentum["muon_64x128"].sharding.is_fully_replicated
