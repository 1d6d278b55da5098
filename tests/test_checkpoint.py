"""train/checkpoint.py (with checkpoint_tree.py, stop.py) and train/load.py: Orbax save/restore of a train state (also
across meshes), atomic saves, resume rules, exports."""

import json
import os
import signal
import subprocess
import sys
import textwrap
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from nanochat_jax.train import checkpoint as ck
from nanochat_jax.train import load as ld
from nanochat_jax.train.checkpoint_tree import abstract_state
from nanochat_jax.train.stop import StopRequest
from nanochat_jax.core.common import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class TrainState(NamedTuple):  # stand-in for train.TrainState: the same fields
    step: jax.Array
    params: dict
    opt_state: object


class FakeTokenizer:
    def __init__(self, tag="t1"):
        self.tag = tag

    def fingerprint(self):
        return "fp-" + self.tag

    def save(self, path):
        os.makedirs(path, exist_ok=True)
        with open(os.path.join(path, "tok.json"), "w") as f:
            json.dump({"tag": self.tag}, f)

    @classmethod
    def from_directory(cls, path):
        with open(os.path.join(path, "tok.json")) as f:
            return cls(json.load(f)["tag"])


CONFIG = {"n_layer": 2, "n_embd": 16, "vocab_size": 64}


def make_params(seed=0):
    k = jax.random.split(jax.random.PRNGKey(seed), 4)
    return {"wte": jax.random.normal(k[0], (64, 16)), "lm_head": jax.random.normal(k[1], (16, 64)),
            "blocks": {"0": {"attn": {"c_q": jax.random.normal(k[2], (16, 16))}},
                       "1": {"attn": {"c_q": jax.random.normal(k[3], (16, 16))}}},
            "resid_lambdas": jnp.ones((2,))}


def make_state(params):
    tx = optax.adamw(1e-2)
    opt_state = tx.init(params)
    grads = jax.tree.map(lambda p: jnp.sin(p), params)
    updates, opt_state = tx.update(grads, opt_state, params)  # non-trivial moments
    return TrainState(step=jnp.int32(1), params=optax.apply_updates(params, updates), opt_state=opt_state)


def mesh_of(shape, names):
    return jax.make_mesh(shape, names, axis_types=(jax.sharding.AxisType.Auto,) * len(names))


def shard(state, mesh, spec_fn):
    return jax.tree.map(lambda x: jax.device_put(x, NamedSharding(mesh, spec_fn(x))), state)


def fsdp_spec(x):  # shard the first axis over 'data' where it divides, else replicate
    return P("data") if x.ndim >= 1 and x.shape[0] % 8 == 0 else P()


def tp_spec(x):
    if x.ndim == 2 and x.shape[1] % 2 == 0:
        return P("data" if x.shape[0] % 4 == 0 else None, "model")
    return P()


def assert_tree_equal(a, b):
    la, ta = jax.tree.flatten(a)
    lb, tb = jax.tree.flatten(b)
    assert ta == tb
    for x, y in zip(la, lb):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture
def fake_tokenizer(monkeypatch):
    monkeypatch.setattr(ld, "_load_tokenizer",
                        lambda d, meta: FakeTokenizer.from_directory(d / ck.TOKENIZER_DIR))
    monkeypatch.setattr(ld, "_make_config", lambda meta: meta["model_config"])


# ---------------------------------------------------------------------------------------------------------------

def test_save_restore_roundtrip_with_loader_state_and_meta(tmp_path):
    state = make_state(make_params())
    mngr = ck.CheckpointManager(tmp_path / "run", max_to_keep=2, tokenizer=FakeTokenizer())
    loader_state = {"shard": 3, "row": 17, "epoch": 1}
    for step in (2, 4, 6):
        assert mngr.save(step, state, loader_state, {"model_config": CONFIG, "val_bpb": 1.5})
    mngr.wait()
    assert mngr.all_steps() == [4, 6]           # keep the last 2
    assert mngr.latest_step() == 6
    restored, lstate, meta = mngr.restore(abstract_state(state))
    assert isinstance(restored, TrainState)
    assert_tree_equal(restored, state)
    assert lstate == loader_state
    assert meta["step"] == 6 and meta["val_bpb"] == 1.5 and meta["tokenizer_fingerprint"] == "fp-t1"
    assert (tmp_path / "run" / "tokenizer" / "tok.json").is_file()
    assert not mngr.save(6, state, loader_state, {})   # an existing step is not rewritten
    mngr.close()


def test_restore_state_with_different_layout_is_user_error(tmp_path):
    state = make_state(make_params())
    mngr = ck.CheckpointManager(tmp_path / "run")
    mngr.save(1, state, {}, {"model_config": CONFIG})
    mngr.wait()
    other = TrainState(step=state.step, params=state.params, opt_state=optax.sgd(0.1).init(state.params))
    with pytest.raises(UserError, match="different train state layout"):
        mngr.restore(abstract_state(other))
    mngr.close()


def test_restore_state_with_same_leaves_of_other_shapes_is_user_error(tmp_path):
    """Same leaf paths, other shapes (e.g. optimizer state laid out by another version): a one-line UserError from
    the shapes in the checkpoint's own metadata, before any array is read; the right shapes still restore."""
    opt = {"mu": jnp.ones((4, 6)), "nu": jnp.ones((3,))}
    state = {"params": {"w": jnp.ones((2, 3))}, "opt": opt}
    other = {"params": {"w": jnp.ones((2, 3))}, "opt": dict(opt, mu=jnp.ones((24,)))}
    mngr = ck.CheckpointManager(tmp_path / "run", async_save=False)
    mngr.save(1, state)
    with pytest.raises(UserError, match=r"\['mu'\] of shape \(4, 6\), this code wants \(24,\)"):
        mngr.restore(other)
    restored, _, _ = mngr.restore(state)
    np.testing.assert_array_equal(restored["opt"]["mu"], opt["mu"])
    mngr.close()


def test_fsdp_checkpoint_restores_on_one_device_and_on_data4_model2(tmp_path):
    assert jax.device_count() == 8
    state = make_state(make_params())
    mesh8 = mesh_of((8,), ("data",))
    sharded = shard(state, mesh8, fsdp_spec)
    assert len(sharded.params["wte"].sharding.device_set) == 8
    mngr = ck.CheckpointManager(tmp_path / "run")
    mngr.save(5, sharded, {"row": 1}, {"model_config": CONFIG})
    mngr.wait()

    # one device
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=one), state)
    r1, _, _ = mngr.restore(target)
    assert r1.params["wte"].sharding == one
    assert_tree_equal(r1, state)

    # data 4 x model 2
    mesh42 = mesh_of((4, 2), ("data", "model"))
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh42, tp_spec(x))),
                          state)
    r2, _, _ = mngr.restore(target)
    assert r2.params["lm_head"].sharding.spec == P("data", "model")
    assert_tree_equal(r2, state)

    # params alone, for inference
    params, meta = mngr.restore_params()
    assert meta["step"] == 5
    assert_tree_equal(params, state.params)
    mngr.close()


_KILL_SCRIPT = textwrap.dedent("""
    import os, signal, sys
    import jax, jax.numpy as jnp
    from nanochat_jax.train import checkpoint as ck
    d = sys.argv[1]
    mngr = ck.CheckpointManager(d, max_to_keep=5)
    big = {"params": {"w": jnp.ones((2048, 1024))}, "opt": {"m": jnp.zeros((2048, 1024))}}
    mngr.save(1, big, {"row": 1}, {"model_config": {"a": 1}})
    mngr.wait()
    mngr.save(2, {"params": {"w": big["params"]["w"] * 2}, "opt": big["opt"]}, {"row": 2}, {"model_config": {"a": 1}})
    os.kill(os.getpid(), signal.SIGKILL)   # mid-save: the background write of step 2 is cut off
""")


def test_interrupted_save_is_never_the_latest(tmp_path):
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": REPO, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", _KILL_SCRIPT, str(run)], env=env, capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    # also the leftovers of a save killed even earlier: a temporary step directory without a commit
    (run / "3.orbax-checkpoint-tmp-123456").mkdir()
    (run / "3.orbax-checkpoint-tmp-123456" / "params").mkdir()
    (run / "4").mkdir()  # a bare step dir with no metadata (killed before Orbax wrote any)
    mngr = ck.CheckpointManager(run)
    assert mngr.latest_step() == 1, sorted(os.listdir(run))
    template = {"params": {"w": jnp.zeros((2048, 1024))}, "opt": {"m": jnp.zeros((2048, 1024))}}
    state, loader_state, meta = mngr.restore(abstract_state(template))
    assert float(state["params"]["w"][0, 0]) == 1.0 and loader_state == {"row": 1}
    mngr.close()
    assert ck.check_output_dir(run, resume=True, overwrite=False, config={"a": 1}) == 1


def test_check_output_dir_rules(tmp_path):
    run = tmp_path / "run"
    assert ck.check_output_dir(run, resume=False, overwrite=False, config=CONFIG) is None   # fresh
    with pytest.raises(UserError, match="--resume: no checkpoint"):
        ck.check_output_dir(run, resume=True, overwrite=False, config=CONFIG)
    mngr = ck.CheckpointManager(run)
    mngr.save(3, make_state(make_params()), {}, {"model_config": CONFIG})
    mngr.close()
    with pytest.raises(UserError, match="already holds a checkpoint"):
        ck.check_output_dir(run, resume=False, overwrite=False, config=CONFIG)
    with pytest.raises(UserError, match="different model"):
        ck.check_output_dir(run, resume=True, overwrite=False, config={**CONFIG, "n_layer": 4})
    with pytest.raises(UserError, match="different model"):
        ck.check_output_dir(run, resume=False, overwrite=False, config={**CONFIG, "n_layer": 4})
    assert (run / "3").is_dir()   # refusing never deletes
    assert ck.check_output_dir(run, resume=True, overwrite=False, config=CONFIG) == 3
    assert ck.check_output_dir(run, resume=False, overwrite=True, config={**CONFIG, "n_layer": 4}) is None
    assert not (run / "3").exists()


def test_stop_request_turns_sigterm_into_a_flag():
    stop = StopRequest().install()
    try:
        assert not stop.requested
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested and stop.signum == signal.SIGTERM
    finally:
        stop.uninstall()
    assert signal.getsignal(signal.SIGTERM) is not stop._handler


def test_export_and_load_model_semantics(tmp_path, base_dir, fake_tokenizer):
    params = make_params()
    state = make_state(params)
    run = ck.checkpoint_dir("base", "d2")
    mngr = ck.CheckpointManager(run, tokenizer=FakeTokenizer("base"))
    for step in (10, 20):
        mngr.save(step, state._replace(params=jax.tree.map(lambda x: x * step, state.params)), {},
                  {"model_config": CONFIG})
    mngr.close()

    # a run dir -> newest step; a step dir -> that step; the stage via load_model
    p, cfg, tok, meta = ld.load_model_from_path(run)
    assert meta["step"] == 20 and cfg == CONFIG and tok.tag == "base"
    np.testing.assert_array_equal(p["wte"], state.params["wte"] * 20)
    p, _, _, meta = ld.load_model_from_path(run / "10")
    assert meta["step"] == 10
    np.testing.assert_array_equal(p["wte"], state.params["wte"] * 10)
    assert ld.load_model("base")[3]["step"] == 20
    assert ld.load_model("base", "d2", step=10)[3]["step"] == 10
    assert ld.load_model_from_path(base_dir / "checkpoints" / "base")[3]["step"] == 20   # stage dir: newest tag
    with pytest.raises(UserError, match="no checkpoint of step 15"):
        ld.load_model("base", "d2", step=15)
    with pytest.raises(UserError, match="no sft checkpoints"):
        ld.load_model("sft")
    with pytest.raises(UserError, match="does not exist"):
        ld.load_model_from_path(tmp_path / "nope")

    # weights-only export: bf16, no optimizer state, tokenizer files beside it
    out = ld.export_weights(tmp_path / "export", p, CONFIG, FakeTokenizer("base"), meta={"step": 10})
    assert sorted(os.listdir(out)) == ["export.json", "params", "tokenizer"]
    pe, cfg, tok, meta = ld.load_model_from_path(out, dtype=None)
    assert pe["wte"].dtype == jnp.bfloat16 and meta["dtype"] == "bfloat16" and meta["step"] == 10
    np.testing.assert_array_equal(np.asarray(pe["wte"]), np.asarray(p["wte"].astype(jnp.bfloat16)))
    pe32 = ld.load_model_from_path(out)[0]
    assert pe32["wte"].dtype == jnp.float32
    with pytest.raises(UserError, match="not empty"):
        ld.export_weights(tmp_path / "export", p, CONFIG)


def test_meta_with_numpy_values_is_saved_as_json(tmp_path):
    mngr = ck.CheckpointManager(tmp_path / "run")
    mngr.save(1, {"params": make_params()}, {"pos": np.int64(5)},
              {"model_config": CONFIG, "val_bpb": np.float32(1.5), "losses": jnp.arange(3.0), "shape": (1, 2)})
    mngr.wait()
    meta = mngr.read_meta()
    assert meta["val_bpb"] == 1.5 and meta["losses"] == [0.0, 1.0, 2.0] and meta["shape"] == [1, 2]
    _, loader_state, _ = mngr.restore({"params": make_params()})
    assert loader_state == {"pos": 5}
    mngr.close()


@pytest.mark.slow
def test_real_train_state_fsdp8_restores_on_one_device_and_tp_mesh(tmp_path):
    """The real TrainState (Muon + AdamW state after one step), FSDP over 8 devices -> 1 device and data4 x model2."""
    train = pytest.importorskip("nanochat_jax.train.step")
    shd = pytest.importorskip("nanochat_jax.core.sharding")
    from nanochat_jax import model
    from nanochat_jax import optim
    from nanochat_jax.core.config import ModelConfig
    config = ModelConfig.from_depth(2, d_model=64, n_heads=2, vocab_size=128, max_seq_len=16)
    params = model.init_params(config, jax.random.PRNGKey(0))
    mesh8 = shd.make_mesh("data=8")
    tx = optim.build_optimizer(params, config, num_steps=10, mesh=mesh8)
    state, shardings = train.init_train_state(params, tx, mesh8, "fsdp")
    step = train.make_train_step(config, tx, mesh8, shardings, donate=False)
    rng = np.random.default_rng(0)
    batch = {k: rng.integers(0, 128, (1, 8, 16)).astype(np.int32) for k in ("inputs", "targets")}
    state, _ = step(state, shd.put_batch(batch, mesh8))
    mngr = ck.CheckpointManager(tmp_path / "run")
    mngr.save(1, state, {"row": 8}, {"model_config": config.to_dict()})
    mngr.wait()
    host = jax.tree.map(np.asarray, state)
    for spec, mode, devices in (("data=1", "dp", jax.devices()[:1]), ("data=4,model=2", "tp", None)):
        mesh = shd.make_mesh(spec, devices=devices)
        abstract = jax.eval_shape(lambda: state)
        target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract,
                              train.state_shardings(abstract, mesh, mode))
        restored, loader_state, meta = mngr.restore(target)
        assert isinstance(restored, train.TrainState) and loader_state == {"row": 8}
        assert restored.params["wte"].sharding.mesh.shape == mesh.shape
        assert_tree_equal(jax.tree.map(np.asarray, restored), host)
    mngr.close()


# ---------------------------------------------------------------------------------------------------------------
# Integrity: sealed steps, damaged files, non-finite states, a full disk

def _saved_run(tmp_path, steps=(1, 2), keep=3):
    state = make_state(make_params())
    mngr = ck.CheckpointManager(tmp_path / "run", max_to_keep=keep)
    for s in steps:
        mngr.save(s, state, {"pos": s}, {"model_config": CONFIG})
    mngr.wait()
    return state, mngr


def _biggest_file(step_dir):
    return max((p for p in step_dir.rglob("*") if p.is_file() and p.name != ck.MANIFEST),
               key=lambda p: p.stat().st_size)


@pytest.mark.parametrize("damage", ["flip", "truncate", "zero"])
def test_a_damaged_step_is_one_clear_error_and_a_resume_falls_back(tmp_path, damage, capsys):
    state, mngr = _saved_run(tmp_path)
    assert all((tmp_path / "run" / str(s) / ck.MANIFEST).is_file() for s in (1, 2))
    f = _biggest_file(tmp_path / "run" / "2")
    data = bytearray(f.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0x01
    elif damage == "truncate":
        data = data[:len(data) // 2]
    else:
        data = bytearray(len(data))
    f.write_bytes(bytes(data))
    rel = str(f.relative_to(tmp_path / "run" / "2"))
    with pytest.raises(UserError, match=f"/2 is damaged: {rel}"):
        mngr.restore_params()                                   # an inference load: refused, in one line
    with pytest.raises(UserError, match="damaged"):
        mngr.restore(abstract_state(state), 2)               # an explicit step: no silent fallback
    restored, loader_state, meta = mngr.restore(abstract_state(state), 2, fallback=True)   # a resume
    assert meta["step"] == 1 and loader_state == {"pos": 1}
    assert_tree_equal(restored, state)
    assert "resuming from step 1" in capsys.readouterr().out
    mngr.close()


def test_a_non_finite_state_is_never_saved_and_older_steps_survive(tmp_path):
    state, mngr = _saved_run(tmp_path, steps=(1, 2), keep=2)
    bad = state._replace(params={**state.params, "wte": state.params["wte"].at[0, 0].set(jnp.nan)})
    with pytest.raises(UserError, match=r"step 3: .*\['wte'\] is not finite.*steps \[1, 2\] are intact"):
        mngr.save(3, bad, {}, {})
    mngr.wait()
    assert mngr.all_steps() == [1, 2] and mngr.verified_steps() == [1, 2]   # nothing rotated out
    mngr.save(3, state, {}, {})
    mngr.wait()
    assert mngr.all_steps() == [2, 3]                           # pruned only once step 3 is sealed
    mngr.close()


def test_a_full_disk_is_one_line_and_leaves_no_temp_dir(tmp_path, monkeypatch):
    import errno
    state, mngr = _saved_run(tmp_path, steps=(1,))

    def full(*a, **k):
        (tmp_path / "run" / "2.orbax-checkpoint-tmp-123").mkdir()
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(mngr._mngr, "save", full)
    with pytest.raises(UserError, match=r"no space left on device while saving step 2; steps \[1\] are intact"):
        mngr.save(2, state, {}, {})
    assert not list((tmp_path / "run").glob("*tmp*"))
    assert mngr.verified_steps() == [1]
