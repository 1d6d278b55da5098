"""The loop shared by base/mid/sft/rl (nanochat_jax/train/loop.py): cadences, resume, logging.

The loop is driven here by fakes (a counter "model", an in-memory checkpoint manager, a list-backed loader), so each
fact is checked in milliseconds; tests/test_base_train.py runs the real thing end to end.
"""

import math
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nanochat_jax.train import loop as loop_mod

Hook, LoopState, MicroBatches, run_loop = loop_mod.Hook, loop_mod.LoopState, loop_mod.MicroBatches, loop_mod.run_loop


# ---------------------------------------------------------------------------------------------------------------
# Fakes

class FakeBatches:
    """Batch i is {"inputs": [[i]]}; state = number of batches handed out."""

    def __init__(self):
        self.position, self.epoch = 0, 1

    def __iter__(self):
        return self

    def __next__(self):
        b = {"inputs": np.array([[self.position + 1]], np.int32)}
        self.position += 1
        return b

    def get_state(self):
        return {"position": self.position}

    def set_state(self, s):
        self.position = s["position"]


class FakeCkpt:
    def __init__(self):
        self.saves = {}

    def save(self, step, state, data_state, meta, force=False):
        self.saves[step] = (np.asarray(state).copy(), dict(data_state), meta)
        return True

    def wait(self):
        pass


class FakeStop:
    def __init__(self):
        self.requested, self.signum = False, None

    def install(self):
        return self

    def uninstall(self):
        pass


events = []


@jax.jit
def _jit_step(state, x):
    new = state * 0.5 + x.sum().astype(jnp.float32)
    return new, {"loss": new / 10.0, "lr": jnp.float32(1.0), "grad_norm": jnp.float32(2.0)}


def step_fn(state, batch):
    events.append(("step", int(batch["inputs"][0, 0])))
    return _jit_step(state, batch["inputs"])


def run(num_steps, **kw):
    kw.setdefault("tokens_per_step", 100)
    kw.setdefault("stop", FakeStop())
    batches = kw.pop("batches", FakeBatches())
    state = kw.pop("state", jnp.float32(0.0))
    return run_loop(state, step_fn, batches, num_steps=num_steps, **kw), batches


# ---------------------------------------------------------------------------------------------------------------
# Facts

def test_checkpoints_at_the_cadence_and_at_the_end_with_the_data_state_of_that_boundary():
    ckpt = FakeCkpt()
    res, _ = run(7, ckpt=ckpt, save_every=3, meta_fn=lambda s, loop: {"model_config": {"x": 1}})
    assert sorted(ckpt.saves) == [3, 6, 7]
    for s, (_, data_state, meta) in ckpt.saves.items():
        assert data_state == {"position": s}        # exactly the batches of steps 1..s consumed, no prefetch
        assert meta["step"] == s and meta["model_config"] == {"x": 1} and meta["loop"]["ema_steps"] == s
    assert res.step == 7 and not res.stopped and [s for s, _ in res.losses] == list(range(1, 8))


def test_stop_request_saves_at_the_next_boundary_and_a_resume_reproduces_the_straight_run():
    straight, _ = run(8)

    stop = FakeStop()
    ckpt = FakeCkpt()

    def stepping(state, batch):                      # a SIGTERM arrives during step 4
        if int(batch["inputs"][0, 0]) == 4:
            stop.requested = True
        return step_fn(state, batch)

    b1 = FakeBatches()
    first = run_loop(jnp.float32(0.0), stepping, b1, num_steps=8, tokens_per_step=100, stop=stop, ckpt=ckpt)
    assert first.stopped and first.step == 4 and sorted(ckpt.saves) == [4]
    saved_state, data_state, meta = ckpt.saves[4]

    b2 = FakeBatches()
    b2.set_state(data_state)
    second, _ = run(8, batches=b2, state=jnp.asarray(saved_state), start_step=4,
                    loop_state=LoopState.from_dict(meta["loop"]))
    assert first.losses + second.losses == straight.losses
    assert float(second.state) == float(straight.state)
    assert second.loop.smooth_loss == straight.loop.smooth_loss and second.loop.ema_steps == 8


def test_metrics_are_read_one_step_late():
    events.clear()
    run(4, on_step=lambda s, m: events.append(("log", s)))
    # step k is logged only after step k+1 was dispatched (the last one at the end)
    assert events == [("step", 1), ("step", 2), ("log", 1), ("step", 3), ("log", 2), ("step", 4), ("log", 3),
                      ("log", 4)]


def test_hooks_run_at_their_cadence_at_the_start_and_at_the_end_and_their_values_are_logged():
    calls = []
    logged = SimpleNamespace(scalars=[], texts=[])
    logger = SimpleNamespace(scalars=lambda v, s: logged.scalars.append((s, v)),
                             text=lambda t, x, s: logged.texts.append((s, t, x)))
    hooks = [Hook("val", 3, lambda st, s: calls.append(("val", s)) or {"val/bpb": 1.0 / (s + 1)}),
             Hook("samples", 5, lambda st, s: calls.append(("samples", s)) or {"samples": f"text {s}"})]
    res, _ = run(7, hooks=hooks, logger=logger)
    assert calls == [("val", 0), ("samples", 0), ("val", 3), ("samples", 5), ("val", 6), ("val", 7),
                     ("samples", 7)]
    assert ("samples", "text 5") in [(t, x) for s, t, x in logged.texts if s == 5]
    assert res.loop.results["val/bpb"] == pytest.approx(1 / 8)
    assert res.summary["val/bpb"] == pytest.approx(1 / 8)
    train_tags = set().union(*[set(v) for s, v in logged.scalars if "train/loss" in v])
    assert {"train/loss", "train/raw_loss", "train/lrm", "train/grad_norm", "train/tok_per_sec"} <= train_tags


def test_a_resumed_run_does_not_repeat_the_evaluations_of_its_first_step():
    calls = []
    hooks = [Hook("val", 2, lambda st, s: calls.append(s) or {"val/bpb": 1.0})]
    run(6, hooks=hooks, start_step=4)
    assert calls == [6]


def test_hook_due():
    h = Hook("x", 10, None)
    assert h.due(0, 100, True) and not h.due(0, 100, False)
    assert h.due(20, 100, False) and not h.due(21, 100, False) and h.due(100, 100, False)
    assert not Hook("x", -1, None).due(100, 100, True)
    assert not Hook("x", 10, None, at_end=False).due(95, 95, False)


def test_smoothed_loss_is_nanochats_debiased_ema():
    ls, smooth, out = LoopState(), 0.0, []
    for i, loss in enumerate([5.0, 4.0, 3.5, 3.0]):
        smooth = 0.9 * smooth + 0.1 * loss
        out.append((ls.add_loss(loss), smooth / (1 - 0.9 ** (i + 1))))
    assert out[0][0] == pytest.approx(5.0)
    assert all(a == pytest.approx(b) for a, b in out)
    assert LoopState.from_dict(ls.to_dict()) == ls


def test_peak_flops_table():
    dev = lambda kind: SimpleNamespace(device_kind=kind)  # noqa: E731
    assert loop_mod.peak_flops(dev("NVIDIA H100 80GB HBM3")) == 989e12
    assert loop_mod.peak_flops(dev("NVIDIA H200")) == 989e12
    assert loop_mod.peak_flops(dev("NVIDIA A100-SXM4-80GB")) == 312e12
    assert loop_mod.peak_flops(dev("NVIDIA B200")) == 2.25e15
    assert loop_mod.peak_flops(dev("cpu")) is None


def test_mfu_appears_only_with_a_known_peak(monkeypatch):
    res, _ = run(4, flops_per_token=1e6)
    assert "MFU (%)" not in res.summary                     # CPU: no peak
    monkeypatch.setattr(loop_mod, "peak_flops", lambda device=None: 1e12)
    res, _ = run(4, flops_per_token=1e6)
    avg = res.summary["train seconds"] / res.loop.timed_steps
    assert res.summary["MFU (%)"] == pytest.approx(100 * 1e6 * 100 / avg / (1e12 * jax.device_count()))


def test_microbatches_stack_accumulation_steps_and_keep_this_process_rows():
    from nanochat_jax.core import sharding as shd

    class Rows:
        position, epoch = 0, 1

        def __next__(self):
            self.position += 1
            x = np.arange(4 * 3, dtype=np.int32).reshape(4, 3) + 100 * self.position
            return {"inputs": x, "targets": x + 1}

        def get_state(self):
            return {"position": self.position}

    mesh = shd.make_mesh(None, devices=jax.devices()[:1])
    mb = MicroBatches(Rows(), 2, mesh, process_index=1, process_count=2)
    b = next(mb)
    x = np.asarray(b["inputs"])
    assert x.shape == (2, 2, 3)                       # (accum, rows of process 1 of 2, T)
    assert x[0].tolist() == (np.arange(12).reshape(4, 3)[2:] + 100).tolist()
    assert x[1].tolist() == (np.arange(12).reshape(4, 3)[2:] + 200).tolist()
    assert mb.get_state() == {"position": 2} and math.isclose(np.asarray(b["targets"])[0, 0, 0], x[0, 0, 0] + 1)
