"""nanochat's simplified GRPO (in truth REINFORCE with a mean baseline), as pure pieces the RL script wires up.

    rolls = [rollout(engine, tokenizer, task, i, num_samples=16, max_tokens=256, temperature=1.0, top_k=50, seed=s)
             for i in problem_indices]                   # k sampled completions per problem, with their rewards
    batch = rollout_batch(rolls, pad_id, rows_multiple=mesh.shape["data"], accum=A)
    train_step = make_train_step(config, tx, mesh, shardings, loss_fn=pg_loss(config))   # the shared step
    state, metrics = train_step(state, batch)             # one policy-gradient update on all of them

In a run, `Problems` is run_loop's batch iterator and `on_policy_step` its step (rollouts, then the train step), so
RL has the loop's checkpoints, stop handling and logging; `pass_at_k_hook` is its evaluation.

- reward: the task's `reward(conversation, completion)` (GSM8K: 1.0 for an exact `####` match), else `evaluate`;
- advantage: r - mean(r) over the k samples of one problem (no division by the std, no KL, no ratio clipping);
- loss: token-level normalised policy gradient, -Σ adv · log p(token) / Σ valid tokens over the whole step (every
  problem and micro-batch together: the one loss definition of train/step.py). Only sampled tokens count: the prompt,
  the tool outputs the engine forced in (engine mask 0) and the padding have target -1.
- pass@k: a problem is solved at k when any of its first k samples is right (`pass_at_k`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from nanochat_jax import model
from nanochat_jax.core import sharding as shd
from nanochat_jax.train.loop import process_rows

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
# The loss (the shared train step's loss_fn) and the on-policy step

def pg_loss_and_count(params, inputs, targets, weights, config, forward_fn: Callable | None = None):
    """(Σ over valid tokens of -weight · log p(target), number of valid tokens): the policy-gradient surrogate."""
    logits = (forward_fn or (lambda p, x: model.forward(p, x, config)))(params, inputs)
    nll, valid = model.token_losses(logits, targets)          # -log p, 0 where target == -1
    return jnp.sum(nll * weights), valid.sum().astype(jnp.float32)


def pg_loss(config, forward_fn: Callable | None = None) -> Callable:
    """The loss_fn of `train.step.make_train_step` for batches from `rollout_batch`: one micro-batch
    {"inputs", "targets", "weights"} -> `pg_loss_and_count`. The shared step divides by the valid tokens of the
    whole batch, accumulates micro-batches and, under float16, scales the loss."""
    return lambda p, b: pg_loss_and_count(p, b["inputs"], b["targets"], b["weights"], config, forward_fn)


def policy_params(params):
    """The policy's params on this process's first device, for the engine (gathered across hosts)."""
    if jax.process_count() > 1:
        params = multihost_utils.process_allgather(params, tiled=True)
    return jax.device_put(params, jax.local_devices()[0])


class Problems:
    """RL's data for run_loop: `next()` -> the indices of the next `per_step` problems of a task of `n` (in order,
    wrapping round). State {"cursor": problems handed out}: what a checkpoint stores."""

    def __init__(self, n: int, per_step: int):
        self.n, self.per_step, self.cursor = n, per_step, 0

    def __iter__(self):
        return self

    def __next__(self) -> list[int]:
        out = [(self.cursor + i) % self.n for i in range(self.per_step)]
        self.cursor += self.per_step
        return out

    def get_state(self) -> dict:
        return {"cursor": self.cursor}

    def set_state(self, state: dict):
        self.cursor = int(state.get("cursor", 0))

    @property
    def epoch(self) -> int:   # 1-based, of the newest problem handed out (as the loaders count)
        return max(self.cursor - 1, 0) // self.n + 1

    @property
    def position(self) -> int:
        return self.cursor


def on_policy_step(train_step, engine, tokenizer, task, mesh, *, num_samples: int, max_new_tokens: int,
                   temperature: float = 1.0, top_k: int | None = 50, accum: int = 1, max_len: int | None = None):
    """`(state, problem indices) -> (state, metrics)` for run_loop: samples each problem's `num_samples` completions
    with the params in `state` (on policy: every rollout uses the params of the step it trains), scores them, and
    takes one `train_step` (make_train_step with loss_fn=pg_loss) on them. Every process samples the same rollouts
    (same params and seeds) and feeds its own share of rows. metrics: the train step's, and reward (mean over the
    samples), completion_len (mean sampled tokens per completion), tokens (trained tokens)."""
    pad_id = tokenizer.encode_special("<|assistant_end|>")
    rows_multiple = math.lcm(mesh.shape["data"], jax.process_count())

    def step(state, indices):
        engine.params = policy_params(state.params)
        taken = int(state.step)
        rolls = [rollout(engine, tokenizer, task, i, num_samples, max_new_tokens, temperature, top_k,
                         seed=hash((taken, i)) & 0x7FFFFFFF) for i in indices]
        batch = rollout_batch(rolls, pad_id, rows_multiple=rows_multiple, accum=accum, max_len=max_len)
        state, metrics = train_step(state, shd.put_batch({k: process_rows(v, 1) for k, v in batch.items()}, mesh))
        return state, {**metrics, "reward": float(np.mean([r.rewards.mean() for r in rolls])),
                       "completion_len": float(np.mean([len(s) - r.prompt_len for r in rolls for s in r.sequences])),
                       "tokens": float((batch["targets"] >= 0).sum())}
    return step


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


def pass_at_k_hook(engine, tokenizer, task, num_problems: int, num_samples: int, max_tokens: int,
                   top_k: int | None = 50) -> Callable:
    """fn(state, step) -> {"eval/pass@k": ...} for run_loop: pass@1..num_samples on the first `num_problems`
    problems of `task`, sampled (temperature 1) with the params in `state`."""
    def fn(state, step):
        engine.params = policy_params(state.params)
        r = evaluate_pass_at_k(engine, tokenizer, task, num_problems, num_samples, max_tokens, temperature=1.0,
                               top_k=top_k, seed=10_000 + step)
        return {f"eval/pass@{k}": v for k, v in r.items()}
    return fn
