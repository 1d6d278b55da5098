"""Chat evaluation: accuracy of a chat model on tasks, and ChatCORE.

Categorical tasks (ARC, MMLU) take one batched forward per batch of prompts; the answer is the argmax of the
last position's logits restricted to the answer-letter tokens. Generative tasks (GSM8K, HumanEval, SpellingBee)
sample completions with the jitted engine, a batch of prompts at a time, and score them with the task;
pass@k counts a problem solved when any of its k samples is right.

ChatCORE = mean over tasks of the centered accuracy (acc - baseline) / (1 - baseline), as nanochat.
"""

from __future__ import annotations

import math
import time

import jax
import jax.numpy as jnp
import numpy as np

from nanochat_jax import model as model_lib
from nanochat_jax.infer.execution import sandbox_problem
from nanochat_jax.tasks import TaskDataUnavailable, get_task

PROGRESS_SECONDS = 30   # a task still running prints how far it got at most this often (GSM8K takes minutes)


def _bucket(n: int, limit: int) -> int:
    """Padded length: the next power of two >= n (at least 32), capped at `limit` (fixed shapes, few compiles)."""
    return min(limit, max(32, 1 << max(0, math.ceil(math.log2(max(n, 1))))))


_FORWARD = {}


def _forward(config):
    if config not in _FORWARD:
        _FORWARD[config] = jax.jit(lambda p, t: model_lib.forward(p, t, config))
    return _FORWARD[config]


def letter_ids(tokenizer, letters) -> list[int]:
    ids = []
    for letter in letters:
        enc = tokenizer.encode(letter)
        if len(enc) != 1:
            raise ValueError(f"answer letter {letter!r} is not a single token ({enc})")
        ids.append(enc[0])
    return ids


def run_categorical(task, params, config, tokenizer, batch_size=8, max_problems=None, progress=None):
    """(num correct, num total) on a categorical task; one forward per batch of prompts."""
    n = len(task) if max_problems is None else min(len(task), max_problems)
    forward = _forward(config)
    correct = 0
    for start in range(0, n, batch_size):
        convs = [task[i] for i in range(start, min(n, start + batch_size))]
        prompts = [tokenizer.render_for_completion(c)[-config.sequence_len:] for c in convs]
        T = _bucket(max(len(p) for p in prompts), config.sequence_len)
        tokens = np.zeros((batch_size, T), np.int32)
        for r, p in enumerate(prompts):
            tokens[r, :len(p)] = p
        logits = np.asarray(forward(params, jnp.asarray(tokens)))
        for r, (conv, p) in enumerate(zip(convs, prompts)):
            ids = letter_ids(tokenizer, conv["letters"])
            choice = int(np.argmax(logits[r, len(p) - 1, ids]))
            correct += task.evaluate(conv, conv["letters"][choice])
        if progress:
            progress(min(n, start + batch_size), n)
    return correct, n


def run_generative(task, engine, tokenizer, batch_size=16, max_problems=None, num_samples=1, max_tokens=256,
                   temperature=0.0, top_k=None, seed=0, progress=None):
    """(num solved, num total) on a generative task; a problem is solved when any of its samples is right."""
    n = len(task) if max_problems is None else min(len(task), max_problems)
    solved = 0
    per_batch = max(1, batch_size // num_samples)
    for start in range(0, n, per_batch):
        convs = [task[i] for i in range(start, min(n, start + per_batch))]
        prompts = [engine.fit_conversation(c, max_tokens) for c in convs]   # render_for_completion, cut to fit
        completions = engine.generate_batch(prompts, num_samples=num_samples, max_tokens=max_tokens,
                                            temperature=temperature, top_k=top_k, seed=seed + start)
        for conv, samples in zip(convs, completions):
            solved += int(any(task.evaluate(conv, tokenizer.decode(s)) for s in samples))
        if progress:
            progress(min(n, start + per_batch), n)
    return solved, n


def centered(acc: float, baseline: float) -> float:
    return (acc - baseline) / (1.0 - baseline)


def chatcore(results: dict, baselines: dict) -> float | None:
    """Mean centered accuracy over `baselines`' tasks; None unless every one of them ran."""
    if any(results.get(name) is None for name in baselines):
        return None
    return float(np.mean([centered(results[name], b) for name, b in baselines.items()]))


def progress_lines(name: str, log, every: float = PROGRESS_SECONDS):
    """A `progress(done, total)` callback for the runners: logs `name: done/total problems (Ns)` when `every`
    seconds have passed since the task started or since its last line (nothing for the last batch: the result
    line follows)."""
    t0 = last = time.time()

    def progress(done, total):
        nonlocal last
        now = time.time()
        if done < total and now - last >= every:
            last = now
            log(f"{name}: {done}/{total} problems ({now - t0:.0f}s)")
    return progress


def evaluate_tasks(task_names, params, config, tokenizer, engine_factory, max_problems=None, batch_size=16,
                   num_samples=1, max_tokens=256, temperature=0.0, top_k=None, split="test", log=print,
                   progress_every: float = PROGRESS_SECONDS):
    """Run each named task; returns {name: accuracy or None (skipped)} and {name: note}. `log` gets a line per
    task, and a progress line every `progress_every` seconds while a task runs."""
    results, notes, engine = {}, {}, None
    for name in task_names:
        t0 = time.time()
        try:
            task = get_task(name, split)
        except TaskDataUnavailable as e:
            results[name], notes[name] = None, f"skipped: data not available offline ({e})"
            log(f"{name}: {notes[name]}")
            continue
        problem = sandbox_problem() if getattr(task, "needs_sandbox", False) else None
        if problem:   # the task runs model-written code: without the sandbox it is skipped, never run unsandboxed
            results[name], notes[name] = None, f"skipped: no code sandbox ({problem})"
            log(f"{name}: {notes[name]}")
            continue
        progress = progress_lines(name, log, progress_every)
        if task.eval_type == "categorical":
            correct, total = run_categorical(task, params, config, tokenizer, batch_size, max_problems,
                                             progress=progress)
        else:
            engine = engine or engine_factory()
            correct, total = run_generative(task, engine, tokenizer, batch_size, max_problems, num_samples,
                                            max_tokens, temperature, top_k, progress=progress)
        results[name] = correct / max(total, 1)
        notes[name] = f"{correct}/{total}" + (f" (pass@{num_samples})" if num_samples > 1 else "")
        log(f"{name}: {results[name]:.4f} ({notes[name]}) in {time.time() - t0:.1f}s")
    return results, notes
