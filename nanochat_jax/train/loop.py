"""The host loop every stage (base, mid, SFT, RL) trains with: batches in, the jitted step, evaluations, checkpoints,
stop requests and logging.

    batches = MicroBatches(loader, accum, mesh)                  # (A, B, T) stacks, placed on the mesh
    state, loop_state, start, meta = resume_run(ckpt, state, batches, resume_step, num_steps)
    hooks = [Hook("val_bpb", 250, lambda state, step: {"val/bpb": ...})]
    result = run_loop(state, step_fn, batches, num_steps=N, tokens_per_step=..., hooks=hooks, ckpt=ckpt, ...)

The loop never waits on the device for a step it has just dispatched: it fetches the next batch while the step
runs, then reads the previous step's metrics (logging is one step late). Evaluations, checkpoints and the final
summary happen at a step boundary, counted in steps taken (0 = before training).
"""

from __future__ import annotations

import dataclasses
import math
import signal
import time
from typing import Any, Callable, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils

from nanochat_jax.core import sharding as shd
from nanochat_jax.core.common import UserError, print0
from nanochat_jax.data.loader import stack_microbatches
from nanochat_jax.train.stop import StopRequest

# bf16 dense peak FLOP/s per device (NVIDIA data sheets, SXM parts; nanochat uses 989e12 for H100)
PEAK_FLOPS_BF16 = (("B200", 2.25e15), ("H200", 989e12), ("H100", 989e12), ("A100", 312e12))
EMA_BETA = 0.9   # nanochat's smoothing of the logged train loss (debiased like Adam's moments)
STOP_SYNC_EVERY = 10   # several processes agree on a SIGTERM every N steps (a host sync; 1 would stall each step)


def peak_flops(device=None) -> float | None:
    """Peak bf16 dense FLOP/s of `device` (default: the first device), or None where unknown (CPU, TPU, ...)."""
    device = device or jax.devices()[0]
    kind = getattr(device, "device_kind", "") or ""
    for name, flops in PEAK_FLOPS_BF16:
        if name.lower() in kind.lower():
            return flops
    return None


def peak_memory_bytes() -> int | None:
    """The largest peak device memory over this process's devices (GPU/TPU), or None where not reported."""
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
# Batches: every process reads the same global rows and keeps its own share

def process_rows(x, axis: int = 0, process_index: int | None = None, process_count: int | None = None):
    """This process's contiguous share of the global rows of `x` along `axis` (all of them on one process).

    Every stage's loaders and rollouts yield the GLOBAL batch on every process, so the batches (and the run) are the
    same whatever the number of processes; each process then feeds only its own rows to the mesh."""
    pi = jax.process_index() if process_index is None else process_index
    pc = jax.process_count() if process_count is None else process_count
    if pc == 1:
        return x
    rows = x.shape[axis] // pc
    index = [slice(None)] * x.ndim
    index[axis] = slice(pi * rows, (pi + 1) * rows)
    return x[tuple(index)]


class MicroBatches:
    """`next()` -> {"inputs", "targets"}: int32 (A, B, T) global arrays sharded over `data`, from A loader batches.

    The loader yields the GLOBAL batch rows on every process (built with process_count=1), and each process keeps
    its own contiguous slice of rows (`process_rows`).
    The loader's state is the loop's data state: `get_state()` / `set_state()` delegate to it.
    """

    def __init__(self, loader, accum: int, mesh, process_index: int | None = None, process_count: int | None = None):
        self.loader, self.accum, self.mesh = loader, int(accum), mesh
        self.pi = jax.process_index() if process_index is None else process_index
        self.pc = jax.process_count() if process_count is None else process_count

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        stacked = stack_microbatches([next(self.loader) for _ in range(self.accum)])
        return shd.put_batch({k: process_rows(v, 1, self.pi, self.pc) for k, v in stacked.items()}, self.mesh)

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
# Resume

def resume_run(ckpt, state, batches, step: int | None, num_steps: int, *, fallback: bool = True):
    """Continue from checkpoint `step` of `ckpt` (None: a fresh start). Restores the train state, moves `batches` to
    where that step left the data, and reads the loop's own state. `fallback`: a damaged step falls back to the
    newest older one that verifies. -> (state, LoopState, start step, checkpoint meta)."""
    if step is None:
        return state, LoopState(), 0, {}
    state, loader_state, meta = ckpt.restore(state, step, fallback=fallback)
    if loader_state:
        batches.set_state(loader_state)
    start = int(meta.get("step", step))
    if start > num_steps:
        raise UserError(f"checkpoint step {start} is past the horizon of {num_steps} steps")
    print0(f"resumed from {ckpt.directory}/{start} (data position {batches.position}, epoch {batches.epoch})")
    return state, LoopState.from_dict(meta.get("loop")), start, meta


# ---------------------------------------------------------------------------------------------------------------
# The loop

def run_loop(state, step_fn, batches, *, num_steps: int, tokens_per_step: int, start_step: int = 0,
             loop_state: LoopState | None = None, flops_per_token: float | None = None, hooks=(),
             ckpt=None, save_every: int = -1, meta_fn=None, logger=None, log_every: int = 1,
             skip_timing_steps: int = 1, stop=None, on_step=None, show: Sequence[str] = ()) -> LoopResult:
    """Train from `start_step` to `num_steps` (steps taken) with `step_fn(state, batch) -> (state, metrics)`.

    batches: an iterator of placed batches with get_state() (e.g. MicroBatches); its state at a step boundary is
      what a checkpoint stores, so a resumed run sees exactly the batches it would have seen.
    hooks: Hook list, run at step boundaries (after the step's metrics are read).
    ckpt: a checkpoint.CheckpointManager or None; saves every `save_every` steps (<= 0: only at the end), at the
      end, and when `stop` (a stop.StopRequest; installed here if None) is requested.
    meta_fn(step, loop_state) -> dict: the checkpoint meta (model_config, ...); "loop" is added here.
    logger: metrics.MetricsLogger or None. on_step(step, metrics_dict): called one step late, for scripts/tests.
    metrics from step_fn: "loss" (required), "grad_norm", "lr" (the LR multiplier), "tokens" (the tokens the step
      trained on where that varies per step, as in RL; default tokens_per_step), any other scalars.
    show: names of other metrics printed on each log line (RL: its reward).
    """
    own_stop = stop is None
    stop = (StopRequest() if own_stop else stop).install()
    run = _Run(state, step_fn, batches, num_steps, tokens_per_step, start_step, loop_state or LoopState(),
               flops_per_token, tuple(hooks), ckpt, save_every, meta_fn, logger, log_every, skip_timing_steps, stop,
               on_step, tuple(show))
    try:
        run.train()
    finally:
        if own_stop:
            stop.uninstall()
    return run.result()


@dataclasses.dataclass
class _Run:
    """One call of run_loop: its arguments, and what changes as it runs."""
    state: Any
    step_fn: Callable
    batches: Any
    num_steps: int
    tokens_per_step: int
    start_step: int
    loop: LoopState
    flops_per_token: float | None
    hooks: tuple
    ckpt: Any
    save_every: int
    meta_fn: Callable | None
    logger: Any
    log_every: int
    skip_timing_steps: int
    stop: Any
    on_step: Callable | None
    show: tuple

    def __post_init__(self):
        self.fresh = self.start_step == 0
        self.peak = peak_flops()
        self.n_devices = jax.device_count()
        self.step, self.stopped, self.losses = self.start_step, False, []
        self.pending = None     # (step taken, metrics on device, dispatch time, epoch, position): not yet logged
        self.last_read = None   # when the last metrics were read (None: time the next step from its dispatch)
        self.t_run = time.time()

    # -- the steps ------------------------------------------------------------------------------------------------

    def train(self):
        """Boundaries and steps until num_steps or a stop request; then the last metrics and the final checkpoint."""
        nxt = self._fetch() if self.step < self.num_steps else None
        while True:
            # -- at the boundary `step` (steps taken): evaluations, checkpoint ---------------------------------
            self._run_hooks(self.step)
            data_state = nxt[1] if nxt is not None else self.batches.get_state()
            if self.step >= self.num_steps:
                break
            if self._stop_now(self.step):
                self.stopped = True
                break
            if self.save_every > 0 and self.step > self.start_step and self.step % self.save_every == 0:
                self._save(self.step, data_state)
            nxt = self._take_step(nxt[0])
        self._read_pending()
        if self.ckpt is not None:
            self._save(self.step, data_state, force=True)
            self.ckpt.wait()

    def _fetch(self):
        """(batch for the next step, the data state BEFORE it: the state a checkpoint at this boundary stores)."""
        before = self.batches.get_state()
        return next(self.batches), before

    def _take_step(self, batch):
        """Dispatch one step, prefetch the next batch while it runs, then log the previous step. -> next fetch."""
        t_dispatch = time.time()
        self.state, metrics = self.step_fn(self.state, batch)
        self.step += 1
        where = (self.batches.epoch, self.batches.position)   # the data consumed through this step (before prefetch)
        nxt = self._fetch() if self.step < self.num_steps else None
        self._read_pending()
        self.pending = (self.step, metrics, t_dispatch, *where)
        s = self.step
        if any(h.due(s, self.num_steps, self.fresh) for h in self.hooks) or s >= self.num_steps or \
                self.stop.requested or (self.save_every > 0 and s % self.save_every == 0):
            self._read_pending()   # the boundary work below needs this step's numbers
        return nxt

    # -- logging (one step late) ----------------------------------------------------------------------------------

    def _read_pending(self):
        """Block on the pending step's metrics, time the step and log it (the one-step-late read)."""
        if self.pending is None:
            return
        s, metrics, t_dispatch, epoch, position = self.pending
        self.pending = None
        m = {k: float(v) for k, v in jax.device_get(metrics).items()}
        now = time.time()
        dt = now - (self.last_read if self.last_read is not None else t_dispatch)
        self.last_read = now
        if s - self.start_step > self.skip_timing_steps:   # the first steps of a process compile: not timed
            self.loop.train_seconds += dt
            self.loop.timed_steps += 1
        smooth = self.loop.add_loss(m["loss"])
        self.losses.append((s, m["loss"]))
        self._log(s, m, smooth, dt, epoch, position)
        if self.on_step is not None:
            self.on_step(s, m)
        self.loop.results["train/loss"] = smooth

    def _mfu(self, tokens: float, seconds: float) -> float | None:
        """Model FLOPs utilisation (%) of `tokens` trained in `seconds`, where the peak is known."""
        if not (self.peak and self.flops_per_token and seconds > 0):
            return None
        return 100 * self.flops_per_token * tokens / seconds / (self.peak * self.n_devices)

    def _log(self, s: int, m: dict, smooth: float, dt: float, epoch: int, position: int):
        """Step `s`'s line (every log_every steps and the last) and its scalars to the logger."""
        tokens = m.get("tokens", self.tokens_per_step)
        tok_s = tokens / dt if dt > 0 else float("nan")
        mfu = self._mfu(tokens, dt)
        avg = self.loop.train_seconds / self.loop.timed_steps if self.loop.timed_steps else dt
        eta = avg * (self.num_steps - s)
        if s % self.log_every == 0 or s == self.num_steps:
            line = (f"step {s:05d}/{self.num_steps:05d} ({100 * s / self.num_steps:.2f}%) | loss {smooth:.6f} | "
                    f"lrm {m.get('lr', float('nan')):.2f} | dt {dt * 1000:.2f}ms | tok/s {tok_s:,.0f} | ")
            if mfu is not None:
                line += f"mfu {mfu:.2f} | "
            line += "".join(f"{k} {m[k]:.4f} | " for k in self.show if k in m)
            line += (f"epoch {epoch} pos {position} | elapsed {_fmt_minutes(time.time() - self.t_run)}"
                     f" | eta {_fmt_minutes(eta)}")
            print0(line)
        if self.logger is not None:
            vals = {"train/loss": smooth, "train/raw_loss": m["loss"], "train/tok_per_sec": tok_s,
                    "train/dt_ms": dt * 1000}
            if "lr" in m:
                vals["train/lrm"] = m["lr"]
            if "grad_norm" in m:
                vals["train/grad_norm"] = m["grad_norm"]
            if mfu is not None:
                vals["train/mfu"] = mfu
            vals.update({f"train/{k}": v for k, v in m.items() if k not in ("loss", "lr", "grad_norm")})
            self.logger.scalars(vals, s)

    # -- the boundary: evaluations, stop, checkpoints -------------------------------------------------------------

    def _run_hooks(self, s: int):
        for h in self.hooks:
            if not h.due(s, self.num_steps, self.fresh) or (s == self.start_step and not self.fresh
                                                            and s < self.num_steps):
                continue   # a resumed run does not redo the evaluations of the step it resumes from
            t0 = time.time()
            out = h.fn(self.state, s) or {}
            scalars = {k: v for k, v in out.items() if not isinstance(v, str)}
            for k, v in out.items():
                if isinstance(v, str):
                    if self.logger is not None:
                        self.logger.text(k, v, s)
                    else:
                        print0(f"[{k} @ step {s}]\n{v}")
            if scalars:
                shown = " | ".join(f"{k} {float(v):.6g}" for k, v in scalars.items())
                print0(f"step {s:05d} | {shown} | {h.name} took {time.time() - t0:.1f}s")
                if self.logger is not None:
                    self.logger.scalars(scalars, s)
                self.loop.results.update({k: float(v) for k, v in scalars.items()})
            self.last_read = None   # the evaluation's time is not a step's

    def _stop_now(self, s: int) -> bool:
        """Whether to stop at boundary `s`. Several processes stop together: every STOP_SYNC_EVERY steps they
        share their flags (a signal may reach only some of them), so none is left waiting in a collective."""
        if jax.process_count() == 1:
            return self.stop.requested
        if s % STOP_SYNC_EVERY:
            return False
        return bool(np.any(multihost_utils.process_allgather(np.int32(self.stop.requested))))

    def _save(self, s: int, data_state, force: bool = False):
        if self.ckpt is None:
            return
        meta = dict(self.meta_fn(s, self.loop) if self.meta_fn is not None else {})
        meta["loop"] = self.loop.to_dict()
        meta["step"] = s
        self.ckpt.save(s, self.state, data_state, meta, force=force)
        if self.logger is not None and hasattr(self.logger, "flush"):
            self.logger.flush()   # the metrics up to a checkpoint survive a crash after it
        self.last_read = None

    # -- the end --------------------------------------------------------------------------------------------------

    def result(self) -> LoopResult:
        """The run's key numbers (report.log material); says so when a stop request ended it."""
        loop, step = self.loop, self.step
        summary = {"steps": step, "train seconds": loop.train_seconds, "tokens": step * self.tokens_per_step,
                   "final train loss (smoothed)": loop.results.get("train/loss")}
        if loop.timed_steps:
            avg = loop.train_seconds / loop.timed_steps
            summary["avg step time (ms)"] = 1000 * avg
            summary["throughput (tok/s)"] = self.tokens_per_step / avg
            mfu = self._mfu(self.tokens_per_step, avg)
            if mfu is not None:
                summary["MFU (%)"] = mfu
        summary.update({k: v for k, v in loop.results.items() if k != "train/loss"})
        mem = peak_memory_bytes()
        if mem is not None:
            summary["peak device memory (GiB)"] = mem / 2 ** 30
        if self.stopped:
            by = signal.Signals(self.stop.signum).name if self.stop.signum else "a stop request"
            print0(f"stopped at step {step} by {by}" + ("; checkpoint saved" if self.ckpt is not None else ""))
        return LoopResult(self.state, step, loop, self.stopped, losses=self.losses, summary=summary)
