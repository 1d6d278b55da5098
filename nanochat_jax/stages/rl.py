"""nanochat's simplified GRPO (in truth REINFORCE with a mean baseline), as pure pieces the RL script wires up.

    rolls = [rollout(engine, tokenizer, task, i, num_samples=16, max_tokens=256, temperature=1.0, top_k=50, seed=s)
             for i in problem_indices]                   # k sampled completions per problem, with their rewards
    batch = rollout_batch(rolls, pad_id, rows_multiple=mesh.shape["data"], accum=A)
    state, metrics = rl_step(state, batch)                # one policy-gradient update on all of them

- reward: the task's `reward(conversation, completion)` (GSM8K: 1.0 for an exact `####` match), else `evaluate`;
- advantage: r - mean(r) over the k samples of one problem (no division by the std, no KL, no ratio clipping);
- loss: token-level normalised policy gradient, -Σ adv · log p(token) / Σ valid tokens over the whole step (every
  problem and micro-batch together: the one loss definition of train.py). Only sampled tokens count: the prompt,
  the tool outputs the engine forced in (engine mask 0) and the padding have target -1.
- pass@k: a problem is solved at k when any of its first k samples is right (`pass_at_k`).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

ROW_BUCKET = 64   # rollout rows are padded to a multiple of 64 tokens: a handful of compiled shapes, not one per step


@dataclasses.dataclass
class Rollout:
    """The k samples of one problem. sequences/masks: prompt + completion token ids and the engine's mask (0 for the
    prompt and forced tool output, 1 for sampled tokens); rewards (k,) float32; completions: decoded text."""
    index: int
    prompt_len: int
    sequences: list
    masks: list
    rewards: np.ndarray
    completions: list

    @property
    def advantages(self) -> np.ndarray:
        return advantages(self.rewards)


def advantages(rewards) -> np.ndarray:
    """r - mean(r) over one problem's samples (nanochat: no z-scoring)."""
    r = np.asarray(rewards, np.float32)
    return r - r.mean()


def task_reward(task, conversation, completion: str) -> float:
    fn = getattr(task, "reward", None)
    return float(fn(conversation, completion) if fn is not None else task.evaluate(conversation, completion))


def rollout(engine, tokenizer, task, index: int, num_samples: int, max_tokens: int, temperature: float = 1.0,
            top_k: int | None = 50, seed: int = 0) -> Rollout:
    """Sample `num_samples` completions of problem `index` with the engine (one shared prefill) and score them."""
    conversation = task[index]
    prompt = engine.fit_conversation(conversation, max_tokens)   # render_for_completion, cut to fit the context
    sequences, masks = engine.generate(prompt, num_samples=num_samples, max_tokens=max_tokens,
                                       temperature=temperature, top_k=top_k, seed=seed)
    texts = [tokenizer.decode(s[len(prompt):]) for s in sequences]
    rewards = np.asarray([task_reward(task, conversation, t) for t in texts], np.float32)
    return Rollout(index, len(prompt), sequences, masks, rewards, texts)


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def rollout_batch(rolls: list[Rollout], pad_id: int, *, rows_multiple: int = 1, accum: int = 1,
                  max_len: int | None = None, bucket: int = ROW_BUCKET) -> dict[str, np.ndarray]:
    """Rollouts -> {"inputs": int32 (A, B, T), "targets": int32 (A, B, T), "weights": float32 (A, B, T)}.

    Each sample is one row: inputs = seq[:-1], targets = seq[1:] where the engine's mask is 1, else -1; weights =
    that row's advantage on every position. T is the longest row rounded up to `bucket` (capped at max_len); rows
    are padded (targets -1) to A * B with B a multiple of `rows_multiple` (the mesh's data axis).
    """
    seqs = [(s, m, a) for r in rolls for s, m, a in zip(r.sequences, r.masks, r.advantages)]
    longest = max(len(s) for s, _, _ in seqs) - 1
    T = _round_up(max(longest, 1), bucket)
    if max_len is not None:
        T = min(T, max_len)
    B = _round_up(-(-len(seqs) // accum), rows_multiple)
    inputs = np.full((accum * B, T), pad_id, np.int32)
    targets = np.full((accum * B, T), -1, np.int32)
    weights = np.zeros((accum * B, T), np.float32)
    for i, (s, m, a) in enumerate(seqs):
        s, m = np.asarray(s[:T + 1], np.int32), np.asarray(m[:T + 1], np.int32)
        n = len(s) - 1
        inputs[i, :n] = s[:-1]
        targets[i, :n] = np.where(m[1:] > 0, s[1:], -1)
        weights[i, :] = a
    shape = (accum, B, T)
    return {"inputs": inputs.reshape(shape), "targets": targets.reshape(shape), "weights": weights.reshape(shape)}


# ---------------------------------------------------------------------------------------------------------------
# The loss and the jitted update

def pg_loss_and_count(params, inputs, targets, weights, config, forward_fn: Callable | None = None):
    """(Σ over valid tokens of -weight · log p(target), number of valid tokens): the policy-gradient surrogate."""
    from nanochat_jax import model
    logits = (forward_fn or (lambda p, x: model.forward(p, x, config)))(params, inputs)
    nll, valid = model.token_losses(logits, targets)          # -log p, 0 where target == -1
    return jnp.sum(nll * weights), valid.sum().astype(jnp.float32)


def make_rl_step(config, tx: optax.GradientTransformation, mesh, state_sharding, *, lr_fn: Callable | None = None,
                 donate: bool = True, forward_fn: Callable | None = None):
    """Jitted `(state, batch) -> (state, metrics)` for batches from `rollout_batch` (placed with
    sharding.put_batch). The A micro-batches are accumulated inside the jit; the loss is divided by the valid
    tokens of the whole batch (a micro-batch with none contributes zero, never NaN). metrics: loss, grad_norm, lr,
    tokens (valid tokens)."""
    from jax.sharding import NamedSharding, PartitionSpec as P
    from nanochat_jax.core import sharding as shd
    from nanochat_jax.train.loop import TrainState

    def step_fn(state, batch):
        inputs, targets, weights = batch["inputs"], batch["targets"], batch["weights"]
        count = jnp.sum(targets >= 0).astype(jnp.float32)
        denom = jnp.maximum(count, 1.0)

        def micro(params, x, y, w):
            def f(p):
                s, _ = pg_loss_and_count(p, x, y, w, config, forward_fn)
                return s / denom, s
            return jax.grad(f, has_aux=True)(params)

        def body(carry, xyw):
            g_acc, l_acc = carry
            g, s = micro(state.params, *xyw)
            return (jax.tree.map(jnp.add, g_acc, g), l_acc + s), None
        zeros = jax.lax.with_sharding_constraint(jax.tree.map(jnp.zeros_like, state.params), state_sharding.params)
        (grads, loss_sum), _ = jax.lax.scan(body, (zeros, jnp.zeros((), jnp.float32)), (inputs, targets, weights))
        grads = jax.lax.with_sharding_constraint(grads, state_sharding.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": loss_sum / denom, "grad_norm": optax.tree.norm(grads), "tokens": count,
                   "lr": jnp.asarray(lr_fn(state.step) if lr_fn is not None else 0.0, jnp.float32)}
        return TrainState(state.step + 1, params, opt_state, state.loss_scale), metrics

    rep = NamedSharding(mesh, P())
    bs = shd.batch_sharding(mesh, 3)
    return jax.jit(step_fn, in_shardings=(state_sharding, {"inputs": bs, "targets": bs, "weights": bs}),
                   out_shardings=(state_sharding, rep), donate_argnums=(0,) if donate else ())


# ---------------------------------------------------------------------------------------------------------------
# pass@k

def pass_at_k(outcomes: list[list[int]], k_max: int | None = None) -> dict[int, float]:
    """{k: fraction of problems with a right answer among their first k samples} for k = 1..k_max."""
    if not outcomes:
        return {}
    k_max = k_max or min(len(o) for o in outcomes)
    return {k: float(np.mean([any(o[:k]) for o in outcomes])) for k in range(1, k_max + 1)}


def evaluate_pass_at_k(engine, tokenizer, task, num_problems: int, num_samples: int, max_tokens: int,
                       temperature: float = 1.0, top_k: int | None = 50, seed: int = 0,
                       batch_size: int = 16) -> dict[int, float]:
    """pass@1..num_samples on the first `num_problems` problems of `task`, sampled in engine batches."""
    n = min(num_problems, len(task))
    outcomes = []
    per_batch = max(1, batch_size // num_samples)
    for start in range(0, n, per_batch):
        convs = [task[i] for i in range(start, min(n, start + per_batch))]
        prompts = [engine.fit_conversation(c, max_tokens) for c in convs]   # cut to fit the context
        completions = engine.generate_batch(prompts, num_samples=num_samples, max_tokens=max_tokens,
                                            temperature=temperature, top_k=top_k, seed=seed + start)
        for conv, samples in zip(convs, completions):
            outcomes.append([int(task.evaluate(conv, tokenizer.decode(s))) for s in samples])
    return pass_at_k(outcomes, num_samples)
