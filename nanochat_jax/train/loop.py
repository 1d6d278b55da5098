"""What base/mid/sft/rl training share: the train state, the jitted sharded train step (with gradient accumulation
inside the jit), and a jitted eval loss.

    state, shardings = init_train_state(params, tx, mesh, mode)            # mode: dp | fsdp | tp
    step = make_train_step(config, tx, mesh, shardings, lr_fn=optim.lr_multiplier(opt_cfg, num_steps))
    state, metrics = step(state, sharding.put_batch({"inputs": x, "targets": y}, mesh))   # x, y: (A, B, T) int32

One loss definition: Σ token losses / Σ valid tokens over the WHOLE accumulated batch. The count is
taken from the targets before the accumulation loop, so each micro-batch contributes its share of the final mean
gradient directly, and a fully masked micro-batch contributes exactly zero (no NaN).
float16 compute: dynamic loss scaling (x2 after `growth_interval` finite steps; on a non-finite gradient the step is
skipped and the scale halved), as torch's GradScaler in nanochat.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from nanochat_jax.core import sharding as shd
from nanochat_jax.core.common import UserError, compute_dtype

FP16_INIT_SCALE = 2.0 ** 16   # torch GradScaler defaults: init 2^16, growth x2 every 2000 finite steps, backoff 0.5
FP16_GROWTH_INTERVAL = 2000


class LossScale(NamedTuple):
    """Dynamic loss scale for float16 compute: scale (fp32 scalar), good_steps (int32 finite steps in a row)."""
    scale: jax.Array
    good_steps: jax.Array


class TrainState(NamedTuple):
    """Everything a step changes. step: int32 scalar (0-based, = steps taken); params: fp32 pytree; opt_state: the
    optax state; loss_scale: LossScale under float16 compute, else None."""
    step: jax.Array
    params: Any
    opt_state: Any
    loss_scale: LossScale | None = None


def _replicated(mesh):
    return NamedSharding(mesh, P())


def state_shardings(state, mesh, mode: str) -> TrainState:
    """NamedShardings for a TrainState (concrete or abstract): params and opt state by the rules table."""
    rep = _replicated(mesh)
    ls = None if state.loss_scale is None else LossScale(rep, rep)
    return TrainState(rep, shd.tree_shardings(state.params, mesh, mode),
                      shd.tree_shardings(state.opt_state, mesh, mode), ls)


def init_train_state(params, tx: optax.GradientTransformation, mesh, mode: str = "dp", *,
                     loss_scaling: bool | None = None, init_scale: float = FP16_INIT_SCALE
                     ) -> tuple[TrainState, TrainState]:
    """Place params on the mesh and build the optimizer state directly in its sharded layout.
    loss_scaling: None = on iff the compute dtype is float16. -> (state, state shardings)."""
    if loss_scaling is None:
        loss_scaling = compute_dtype() == jnp.float16

    def build(p):
        ls = LossScale(jnp.asarray(init_scale, jnp.float32), jnp.zeros((), jnp.int32)) if loss_scaling else None
        return TrainState(jnp.zeros((), jnp.int32), p, tx.init(p), ls)

    abstract = jax.eval_shape(build, params)
    shardings = state_shardings(abstract, mesh, mode)
    params = jax.device_put(params, shardings.params)
    state = jax.jit(build, in_shardings=(shardings.params,), out_shardings=shardings)(params)
    return state, shardings


def make_train_step(config, tx: optax.GradientTransformation, mesh, state_sharding: TrainState, *,
                    lr_fn: Callable | None = None, loss_fn: Callable | None = None,
                    growth_interval: int = FP16_GROWTH_INTERVAL, donate: bool = True):
    """One jitted `(state, batch) -> (state, metrics)`. batch = {"inputs", "targets"}: int32 (A, B, T), sharded as
    `sharding.batch_sharding(mesh)`; A micro-batches are accumulated inside the jit (lax.scan).
    metrics (replicated fp32 scalars): loss (whole-batch mean), grad_norm (global, before the update), lr
    (`lr_fn(step)`, e.g. optim.lr_multiplier; 0 without one), and under fp16 loss_scale and finite.
    loss_fn(params, inputs, targets) -> (sum of token losses, count); default model.loss_and_count."""
    if loss_fn is None:
        from nanochat_jax import model
        loss_fn = lambda p, x, y: model.loss_and_count(p, x, y, config)  # noqa: E731
    param_sharding = state_sharding.params

    def step_fn(state: TrainState, batch):
        inputs, targets = batch["inputs"], batch["targets"]
        if inputs.ndim != 3:
            raise UserError(f"train step wants (accum, batch, seq) inputs, got shape {inputs.shape}")
        count = jnp.sum(targets >= 0).astype(jnp.float32)
        denom = jnp.maximum(count, 1.0)                     # a fully masked batch: loss 0, grads 0
        scale = state.loss_scale.scale if state.loss_scale is not None else jnp.ones((), jnp.float32)

        def micro_grads(params, x, y):
            def f(p):
                s, _ = loss_fn(p, x, y)
                return s * (scale / denom), s
            return jax.grad(f, has_aux=True)(params)

        if inputs.shape[0] == 1:
            grads, loss_sum = micro_grads(state.params, inputs[0], targets[0])
        else:
            def body(carry, xy):
                g_acc, l_acc = carry
                g, s = micro_grads(state.params, *xy)
                return (jax.tree.map(jnp.add, g_acc, g), l_acc + s), None
            zeros = jax.tree.map(jnp.zeros_like, state.params)
            zeros = jax.lax.with_sharding_constraint(zeros, param_sharding)
            (grads, loss_sum), _ = jax.lax.scan(body, (zeros, jnp.zeros((), jnp.float32)), (inputs, targets))
        if state.loss_scale is not None:
            grads = jax.tree.map(lambda g: g / scale, grads)
        grads = jax.lax.with_sharding_constraint(grads, param_sharding)

        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        grad_norm = optax.tree.norm(grads)
        metrics = {"loss": loss_sum / denom, "grad_norm": grad_norm,
                   "lr": jnp.asarray(lr_fn(state.step) if lr_fn is not None else 0.0, jnp.float32)}
        loss_scale = state.loss_scale
        if loss_scale is not None:   # skip a non-finite step, halve the scale; grow it after a run of finite steps
            finite = jnp.isfinite(grad_norm)
            keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)  # noqa: E731
            params, opt_state = keep(params, state.params), keep(opt_state, state.opt_state)
            good = jnp.where(finite, loss_scale.good_steps + 1, 0)
            grow = good >= growth_interval
            new_scale = jnp.where(finite, jnp.where(grow, loss_scale.scale * 2, loss_scale.scale),
                                  loss_scale.scale * 0.5)
            loss_scale = LossScale(new_scale, jnp.where(grow, 0, good).astype(jnp.int32))
            metrics["loss_scale"] = scale
            metrics["finite"] = finite.astype(jnp.float32)
        return TrainState(state.step + 1, params, opt_state, loss_scale), metrics

    rep = _replicated(mesh)
    bs = shd.batch_sharding(mesh, 3)
    return jax.jit(step_fn, in_shardings=(state_sharding, {"inputs": bs, "targets": bs}),
                   out_shardings=(state_sharding, rep), donate_argnums=(0,) if donate else ())


def make_eval_loss(config, mesh, param_sharding, loss_fn: Callable | None = None):
    """Jitted `(params, inputs (B, T), targets (B, T)) -> (sum of token losses, count)`, batch split over data."""
    if loss_fn is None:
        from nanochat_jax import model
        loss_fn = lambda p, x, y: model.loss_and_count(p, x, y, config)  # noqa: E731
    bs = shd.batch_sharding(mesh, 2)
    rep = _replicated(mesh)
    return jax.jit(lambda p, x, y: loss_fn(p, x, y), in_shardings=(param_sharding, bs, bs),
                   out_shardings=(rep, rep))


# -----------------------------------------------------------------------------------------------------------------
# ---- The loop skeleton shared by base/mid/sft/rl ----
#
#     batches = MicroBatches(loader, accum, mesh)                  # (A, B, T) stacks, placed on the mesh
#     hooks = [Hook("val_bpb", 250, lambda state, step: {"val/bpb": ...})]
#     result = run_loop(state, step_fn, batches, num_steps=N, tokens_per_step=..., hooks=hooks, ckpt=ckpt, ...)
#
# The loop never waits on the device for a step it has just dispatched: it fetches the next batch while the step
# runs, then reads the previous step's metrics (logging is one step late). Evaluations, checkpoints and the final
# summary happen at a step boundary, counted in steps taken (0 = before training).

import dataclasses  # noqa: E402 (this section's imports)
import math  # noqa: E402 (this section's imports)
import time  # noqa: E402 (this section's imports)

import numpy as np  # noqa: E402 (this section's imports)

# bf16 dense peak FLOP/s per device (NVIDIA data sheets, SXM parts; nanochat uses 989e12 for H100)
PEAK_FLOPS_BF16 = (("B200", 2.25e15), ("H200", 989e12), ("H100", 989e12), ("A100", 312e12))
EMA_BETA = 0.9   # nanochat's smoothing of the logged train loss (debiased like Adam's moments)
STOP_SYNC_EVERY = 10   # several processes agree on a SIGTERM every N steps (a host sync; 1 would stall each step)


def peak_flops(device=None) -> float | None:
    """Peak bf16 dense FLOP/s of `device` (default: the first device), or None where unknown (CPU, TPU, ...)."""
    import jax
    device = device or jax.devices()[0]
    kind = getattr(device, "device_kind", "") or ""
    for name, flops in PEAK_FLOPS_BF16:
        if name.lower() in kind.lower():
            return flops
    return None


def peak_memory_bytes() -> int | None:
    """The largest peak device memory over this process's devices (GPU/TPU), or None where not reported."""
    import jax
    peaks = []
    for d in jax.local_devices():
        try:
            stats = d.memory_stats() or {}
        except Exception:  # not every backend implements it
            stats = {}
        if "peak_bytes_in_use" in stats:
            peaks.append(int(stats["peak_bytes_in_use"]))
    return max(peaks) if peaks else None


def _fmt_minutes(seconds: float) -> str:
    return f"{seconds / 60:.2f}m" if math.isfinite(seconds) else "?"


# ---------------------------------------------------------------------------------------------------------------
# Batches: a loader's micro-batches stacked to (A, B, T) and placed on the mesh

class MicroBatches:
    """`next()` -> {"inputs", "targets"}: int32 (A, B, T) global arrays sharded over `data`, from A loader batches.

    The loader yields the GLOBAL batch rows on every process (built with process_count=1), and each process keeps
    its own contiguous slice of rows: the batches (and so the run) are the same whatever the number of processes.
    The loader's state is the loop's data state: `get_state()` / `set_state()` delegate to it.
    """

    def __init__(self, loader, accum: int, mesh, process_index: int | None = None, process_count: int | None = None):
        import jax
        self.loader, self.accum, self.mesh = loader, int(accum), mesh
        self.pi = jax.process_index() if process_index is None else process_index
        self.pc = jax.process_count() if process_count is None else process_count

    def _local(self, x):
        if self.pc == 1:
            return x
        rows = x.shape[1] // self.pc
        return x[:, self.pi * rows:(self.pi + 1) * rows]

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        from nanochat_jax.core import sharding as shd
        from nanochat_jax.data.loader import stack_microbatches
        stacked = stack_microbatches([next(self.loader) for _ in range(self.accum)])
        return shd.put_batch({k: self._local(v) for k, v in stacked.items()}, self.mesh)

    def get_state(self) -> dict:
        return self.loader.get_state()

    def set_state(self, state: dict):
        self.loader.set_state(state)

    @property
    def epoch(self) -> int:
        return getattr(self.loader, "epoch", 0)

    @property
    def position(self) -> int:
        return getattr(self.loader, "position", 0)


# ---------------------------------------------------------------------------------------------------------------
# Hooks and loop state

@dataclasses.dataclass
class Hook:
    """A periodic evaluation: `fn(state, step) -> {tag: value}` at every `every` steps taken (<= 0: never), and at
    the last step if `at_end`. Float values are logged as scalars (e.g. "val/bpb"), str values as text (samples)."""
    name: str
    every: int
    fn: object
    at_end: bool = True
    at_start: bool = True   # also at step 0 of a fresh run (the curve's starting point)

    def due(self, step: int, num_steps: int, fresh_start: bool) -> bool:
        if self.every <= 0:
            return False
        if step == num_steps:
            return self.at_end
        if step == 0:
            return self.at_start and fresh_start
        return step % self.every == 0


@dataclasses.dataclass
class LoopState:
    """What the loop itself carries across a resume (saved in the checkpoint meta under "loop")."""
    smooth_loss: float = 0.0      # EMA of the train loss (biased; divide by 1 - EMA_BETA**ema_steps)
    ema_steps: int = 0
    train_seconds: float = 0.0    # wall time in train steps (evaluations and saves excluded)
    timed_steps: int = 0          # steps that went into train_seconds (the first, compiling, steps do not)
    results: dict = dataclasses.field(default_factory=dict)   # the latest value of every hook scalar

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict | None) -> "LoopState":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in (d or {}).items() if k in names})

    def add_loss(self, loss: float) -> float:
        self.smooth_loss = EMA_BETA * self.smooth_loss + (1 - EMA_BETA) * loss
        self.ema_steps += 1
        return self.smooth_loss / (1 - EMA_BETA ** self.ema_steps)


@dataclasses.dataclass
class LoopResult:
    state: object
    step: int                     # steps taken when the loop ended
    loop: LoopState
    stopped: bool                 # ended by SIGTERM/Ctrl+C before num_steps
    losses: list                  # (step, raw loss) of the steps this run took
    summary: dict                 # the key numbers (report.log material)


# ---------------------------------------------------------------------------------------------------------------
# The loop

def run_loop(state, step_fn, batches, *, num_steps: int, tokens_per_step: int, start_step: int = 0,
             loop_state: LoopState | None = None, flops_per_token: float | None = None, hooks=(),
             ckpt=None, save_every: int = -1, meta_fn=None, logger=None, log_every: int = 1,
             skip_timing_steps: int = 1, stop=None, on_step=None) -> LoopResult:
    """Train from `start_step` to `num_steps` (steps taken) with `step_fn(state, batch) -> (state, metrics)`.

    batches: an iterator of placed batches with get_state() (e.g. MicroBatches); its state at a step boundary is
      what a checkpoint stores, so a resumed run sees exactly the batches it would have seen.
    hooks: Hook list, run at step boundaries (after the step's metrics are read).
    ckpt: a checkpoint.CheckpointManager or None; saves every `save_every` steps (<= 0: only at the end), at the
      end, and when `stop` (a checkpoint.StopRequest; installed here if None) is requested.
    meta_fn(step, loop_state) -> dict: the checkpoint meta (model_config, ...); "loop" is added here.
    logger: metrics.MetricsLogger or None. on_step(step, metrics_dict): called one step late, for scripts/tests.
    metrics from step_fn: "loss" (required), "grad_norm", "lr" (the LR multiplier), any other scalars.
    """
    import jax
    from nanochat_jax.train.stop import StopRequest
    from nanochat_jax.core.common import print0

    loop = loop_state or LoopState()
    fresh = start_step == 0
    peak = peak_flops()
    n_devices = jax.device_count()
    own_stop = stop is None
    stop = (StopRequest() if own_stop else stop).install()
    losses, step, stopped = [], start_step, False
    t_run = time.time()

    def fetch():
        """(batch for the next step, the data state BEFORE it: the state a checkpoint at this boundary stores)."""
        before = batches.get_state()
        return next(batches), before

    pending = None   # (step taken, metrics on device, dispatch time) of the step not yet logged
    last_read = [None]

    def read_pending():
        """Block on the pending step's metrics and log them (the one-step-late read)."""
        nonlocal pending
        if pending is None:
            return
        s, metrics, t_dispatch, epoch, position = pending
        pending = None
        m = {k: float(v) for k, v in jax.device_get(metrics).items()}
        now = time.time()
        dt = now - (last_read[0] if last_read[0] is not None else t_dispatch)
        last_read[0] = now
        if s - start_step > skip_timing_steps:   # the first steps of a process compile: not timed
            loop.train_seconds += dt
            loop.timed_steps += 1
        smooth = loop.add_loss(m["loss"])
        losses.append((s, m["loss"]))
        tok_s = tokens_per_step / dt if dt > 0 else float("nan")
        mfu = (100 * flops_per_token * tokens_per_step / dt / (peak * n_devices)
               if peak and flops_per_token and dt > 0 else None)
        avg = loop.train_seconds / loop.timed_steps if loop.timed_steps else dt
        eta = avg * (num_steps - s)
        if s % log_every == 0 or s == num_steps:
            line = (f"step {s:05d}/{num_steps:05d} ({100 * s / num_steps:.2f}%) | loss {smooth:.6f} | "
                    f"lrm {m.get('lr', float('nan')):.2f} | dt {dt * 1000:.2f}ms | tok/s {tok_s:,.0f} | ")
            if mfu is not None:
                line += f"mfu {mfu:.2f} | "
            line += (f"epoch {epoch} pos {position} | elapsed {_fmt_minutes(time.time() - t_run)}"
                     f" | eta {_fmt_minutes(eta)}")
            print0(line)
        if logger is not None:
            vals = {"train/loss": smooth, "train/raw_loss": m["loss"], "train/tok_per_sec": tok_s,
                    "train/dt_ms": dt * 1000}
            if "lr" in m:
                vals["train/lrm"] = m["lr"]
            if "grad_norm" in m:
                vals["train/grad_norm"] = m["grad_norm"]
            if mfu is not None:
                vals["train/mfu"] = mfu
            vals.update({f"train/{k}": v for k, v in m.items() if k not in ("loss", "lr", "grad_norm")})
            logger.scalars(vals, s)
        if on_step is not None:
            on_step(s, m)
        loop.results["train/loss"] = smooth

    def run_hooks(s):
        for h in hooks:
            if not h.due(s, num_steps, fresh) or (s == start_step and not fresh and s < num_steps):
                continue   # a resumed run does not redo the evaluations of the step it resumes from
            t0 = time.time()
            out = h.fn(state, s) or {}
            scalars = {k: v for k, v in out.items() if not isinstance(v, str)}
            for k, v in out.items():
                if isinstance(v, str):
                    if logger is not None:
                        logger.text(k, v, s)
                    else:
                        print0(f"[{k} @ step {s}]\n{v}")
            if scalars:
                shown = " | ".join(f"{k} {float(v):.6g}" for k, v in scalars.items())
                print0(f"step {s:05d} | {shown} | {h.name} took {time.time() - t0:.1f}s")
                if logger is not None:
                    logger.scalars(scalars, s)
                loop.results.update({k: float(v) for k, v in scalars.items()})
            last_read[0] = None   # the evaluation's time is not a step's

    def stop_now(s) -> bool:
        """Whether to stop at boundary `s`. Several processes stop together: every STOP_SYNC_EVERY steps they
        share their flags (a signal may reach only some of them), so none is left waiting in a collective."""
        if jax.process_count() == 1:
            return stop.requested
        if s % STOP_SYNC_EVERY:
            return False
        from jax.experimental import multihost_utils
        return bool(np.any(multihost_utils.process_allgather(np.int32(stop.requested))))

    def save(s, data_state, force=False):
        if ckpt is None:
            return
        meta = dict(meta_fn(s, loop) if meta_fn is not None else {})
        meta["loop"] = loop.to_dict()
        meta["step"] = s
        ckpt.save(s, state, data_state, meta, force=force)
        if logger is not None and hasattr(logger, "flush"):
            logger.flush()   # the metrics up to a checkpoint survive a crash after it
        last_read[0] = None

    try:
        nxt = fetch() if step < num_steps else None
        while True:
            # -- at the boundary `step` (steps taken): evaluations, checkpoint ---------------------------------
            run_hooks(step)
            data_state = nxt[1] if nxt is not None else batches.get_state()
            if step >= num_steps:
                break
            if stop_now(step):
                stopped = True
                break
            if save_every > 0 and step > start_step and step % save_every == 0:
                save(step, data_state)
            # -- one step: dispatch, prefetch the next batch while it runs, then log the previous step ----------
            batch = nxt[0]
            t_dispatch = time.time()
            state, metrics = step_fn(state, batch)
            step += 1
            where = (batches.epoch, batches.position)   # the data consumed through this step (before prefetch)
            nxt = fetch() if step < num_steps else None
            read_pending()
            pending = (step, metrics, t_dispatch, *where)
            if any(h.due(step, num_steps, fresh) for h in hooks) or step >= num_steps or stop.requested or \
                    (save_every > 0 and step % save_every == 0):
                read_pending()   # the boundary work below needs this step's numbers
        read_pending()
        if ckpt is not None:
            save(step, data_state, force=True)
            ckpt.wait()
    finally:
        if own_stop:
            stop.uninstall()

    summary = {"steps": step, "train seconds": loop.train_seconds,
               "tokens": step * tokens_per_step,
               "final train loss (smoothed)": loop.results.get("train/loss")}
    if loop.timed_steps:
        avg = loop.train_seconds / loop.timed_steps
        summary["avg step time (ms)"] = 1000 * avg
        summary["throughput (tok/s)"] = tokens_per_step / avg
        if peak and flops_per_token:
            summary["MFU (%)"] = 100 * flops_per_token * tokens_per_step / avg / (peak * n_devices)
    summary.update({k: v for k, v in loop.results.items() if k != "train/loss"})
    mem = peak_memory_bytes()
    if mem is not None:
        summary["peak device memory (GiB)"] = mem / 2 ** 30
    if stopped:
        import signal
        by = signal.Signals(stop.signum).name if stop.signum else "a stop request"
        print0(f"stopped at step {step} by {by}" + ("; checkpoint saved" if ckpt is not None else ""))
    return LoopResult(state, step, loop, stopped, losses, summary)
