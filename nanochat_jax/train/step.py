"""The one jitted train step of every stage (base, mid, SFT, RL), the state it updates, and a jitted eval loss.

    state, shardings, step = setup_train(params, config, opt_cfg, num_steps, mesh, mode)   # mode: dp | fsdp | tp
    state, metrics = step(state, sharding.put_batch({"inputs": x, "targets": y}, mesh))   # x, y: (A, B, T) int32

One loss definition: Σ token losses / Σ valid tokens over the WHOLE accumulated batch. The count is
taken from the targets before the accumulation loop, so each micro-batch contributes its share of the final mean
gradient directly, and a fully masked micro-batch contributes exactly zero (no NaN).
float16 compute: dynamic loss scaling (x2 after `growth_interval` finite steps; on a non-finite gradient the step is
skipped and the scale halved), as torch's GradScaler in nanochat.
The loss is a function of the params and one micro-batch: the language-model loss by default; RL passes its
policy-gradient loss (`stages.rl.pg_loss`), whose batches carry per-token "weights" next to inputs and targets.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from nanochat_jax import model, optim
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


def lm_loss(config) -> Callable:
    """The language-model loss of one micro-batch: `(params, {"inputs", "targets"}) -> (Σ token losses, count)`."""
    return lambda p, b: model.loss_and_count(p, b["inputs"], b["targets"], config)


def _update_loss_scale(state: TrainState, params, opt_state, grad_norm, growth_interval: int):
    """float16: keep the old params and opt state when the gradient is not finite and halve the scale; double it
    after `growth_interval` finite steps in a row. -> (params, opt_state, loss_scale, finite)."""
    loss_scale = state.loss_scale
    finite = jnp.isfinite(grad_norm)
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)  # noqa: E731
    params, opt_state = keep(params, state.params), keep(opt_state, state.opt_state)
    good = jnp.where(finite, loss_scale.good_steps + 1, 0)
    grow = good >= growth_interval
    new_scale = jnp.where(finite, jnp.where(grow, loss_scale.scale * 2, loss_scale.scale), loss_scale.scale * 0.5)
    return params, opt_state, LossScale(new_scale, jnp.where(grow, 0, good).astype(jnp.int32)), finite


def make_train_step(config, tx: optax.GradientTransformation, mesh, state_sharding: TrainState, *,
                    lr_fn: Callable | None = None, loss_fn: Callable | None = None,
                    growth_interval: int = FP16_GROWTH_INTERVAL, donate: bool = True):
    """One jitted `(state, batch) -> (state, metrics)`. batch: {"inputs", "targets", ...}, each (A, B, T), sharded
    as `sharding.batch_sharding(mesh)`; A micro-batches are accumulated inside the jit (lax.scan).
    metrics (replicated fp32 scalars): loss (whole-batch mean), grad_norm (global, before the update), lr
    (`lr_fn(step)`, e.g. optim.lr_multiplier; 0 without one), and under fp16 loss_scale and finite.
    loss_fn(params, micro-batch of (B, T) entries) -> (sum of token losses, count); default `lm_loss(config)`."""
    loss_fn = loss_fn or lm_loss(config)
    param_sharding = state_sharding.params

    def step_fn(state: TrainState, batch):
        inputs, targets = batch["inputs"], batch["targets"]
        if inputs.ndim != 3:
            raise UserError(f"train step wants (accum, batch, seq) inputs, got shape {inputs.shape}")
        count = jnp.sum(targets >= 0).astype(jnp.float32)
        denom = jnp.maximum(count, 1.0)                     # a fully masked batch: loss 0, grads 0
        scale = state.loss_scale.scale if state.loss_scale is not None else jnp.ones((), jnp.float32)

        def micro_grads(params, micro):
            def f(p):
                s, _ = loss_fn(p, micro)
                return s * (scale / denom), s
            return jax.grad(f, has_aux=True)(params)

        if inputs.shape[0] == 1:
            grads, loss_sum = micro_grads(state.params, {k: v[0] for k, v in batch.items()})
        else:
            def body(carry, micro):
                g_acc, l_acc = carry
                g, s = micro_grads(state.params, micro)
                return (jax.tree.map(jnp.add, g_acc, g), l_acc + s), None
            zeros = jax.tree.map(jnp.zeros_like, state.params)
            zeros = jax.lax.with_sharding_constraint(zeros, param_sharding)
            (grads, loss_sum), _ = jax.lax.scan(body, (zeros, jnp.zeros((), jnp.float32)), batch)
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
            params, opt_state, loss_scale, finite = _update_loss_scale(state, params, opt_state, grad_norm,
                                                                       growth_interval)
            metrics["loss_scale"] = scale
            metrics["finite"] = finite.astype(jnp.float32)
        return TrainState(state.step + 1, params, opt_state, loss_scale), metrics

    rep = _replicated(mesh)
    bs = shd.batch_sharding(mesh, 3)   # a prefix: every entry of the batch dict is split on its rows
    return jax.jit(step_fn, in_shardings=(state_sharding, bs), out_shardings=(state_sharding, rep),
                   donate_argnums=(0,) if donate else ())


def setup_train(params, config, opt_cfg, num_steps: int, mesh, mode: str, *, loss_fn: Callable | None = None
                ) -> tuple[TrainState, TrainState, Callable]:
    """What every stage builds before its loop: the optimizer for `opt_cfg` over `num_steps`, the train state placed
    on the mesh, and the jitted step with its LR schedule. -> (state, state shardings, step). The caller drops its
    own reference to `params` afterwards (the state holds the placed copy)."""
    tx = optim.build_optimizer(params, config, opt_cfg, num_steps, mesh=mesh)
    state, shardings = init_train_state(params, tx, mesh, mode)
    step = make_train_step(config, tx, mesh, shardings, lr_fn=optim.lr_multiplier(opt_cfg, num_steps),
                           loss_fn=loss_fn)
    return state, shardings, step


def make_eval_loss(config, mesh, param_sharding, loss_fn: Callable | None = None):
    """Jitted `(params, inputs (B, T), targets (B, T)) -> (sum of token losses, count)`, batch split over data."""
    if loss_fn is None:
        loss_fn = lambda p, x, y: model.loss_and_count(p, x, y, config)  # noqa: E731
    bs = shd.batch_sharding(mesh, 2)
    rep = _replicated(mesh)
    return jax.jit(lambda p, x, y: loss_fn(p, x, y), in_shardings=(param_sharding, bs, bs),
                   out_shardings=(rep, rep))
