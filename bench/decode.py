"""Decode speed of the engine (KV cache, jitted step) against recomputing the whole sequence for every token, and
continuous batching against serving requests one after another.

    PYTHONPATH=. python bench/decode.py                           # d4, 256 new tokens, batches 1, 8, 32 (CPU)
    PYTHONPATH=. python bench/decode.py --depth 12 --vocab-size 32768 --max-len 2048 --batches 1,8,32,128   # GPU

Random weights, greedy decoding with the stop tokens switched off, so every row generates exactly --new-tokens.
Figures (compile time excluded: every shape is warmed up first):
- the longest wait between two streamed tokens (`Engine.stream` hands tokens over in device chunks);
- cached decode tokens/s at each batch size (B x new tokens / median wall time of `Engine.generate` over
  --repeats runs, prefill included), time to first token
  (prefill of one prompt, then the first token out of `Engine.stream`);
- the no-cache baseline in the same run: each token recomputes a full forward over the sequence so far (padded to
  a power of two, jitted once per length), batch 1;
- 8 concurrent streams through one `BatchScheduler` vs the same 8 requests one after another (batch-1 streams).
Goal: cached decode >= 10x the recompute baseline at 256 new tokens on CPU.
"""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from nanochat_jax import model  # noqa: E402
from nanochat_jax.core.common import ArgumentParser, print0, run_main  # noqa: E402
from nanochat_jax.core.config import ModelConfig  # noqa: E402
from nanochat_jax.infer.engine import Engine  # noqa: E402
from nanochat_jax.infer.scheduler import BatchScheduler  # noqa: E402

SPECIALS = ["<|bos|>", "<|user_start|>", "<|user_end|>", "<|assistant_start|>", "<|assistant_end|>",
            "<|python_start|>", "<|python_end|>", "<|output_start|>", "<|output_end|>"]


class ByteTokenizer:
    """Bytes 0..255 and the specials after them: all the engine needs, with no trained tokenizer on disk."""

    def encode_special(self, name):
        return 256 + SPECIALS.index(name)

    def get_bos_token_id(self):
        return 256

    def encode(self, text, prepend=None, append=None):
        return list(text.encode("utf-8"))

    def decode(self, ids):
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


# ---------------------------------------------------------------------------------------------------------------
# Arguments

def build_parser():
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--depth", type=int, default=4, help="model depth (width 64*depth)")
    p.add_argument("--vocab-size", type=int, default=4096, help="vocab size of the random model")
    p.add_argument("--head-dim", type=int, default=None, help="attention head size (default: the recipe's, 128)")
    p.add_argument("--max-len", type=int, default=512, help="KV cache length (prompt + new tokens)")
    p.add_argument("--prompt-len", type=int, default=32, help="prompt tokens")
    p.add_argument("--new-tokens", type=int, default=256, help="tokens generated per row")
    p.add_argument("--batches", type=str, default="1,8,32", help="cached decode batch sizes")
    p.add_argument("--concurrent", type=int, default=8, help="requests for the continuous-batching comparison")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per batch size (the median is reported)")
    p.add_argument("--baseline-tokens", type=int, default=0,
                   help="tokens the recompute baseline generates (default: --new-tokens)")
    return p


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


# ---------------------------------------------------------------------------------------------------------------
# The no-cache baseline: a full forward per token

def recompute_generate(params, config, prompt, new_tokens, max_len):
    """Greedy generation recomputing the whole sequence each token (padded to a power of two: one compile per
    length, not per token)."""
    @jax.jit
    def next_token(params, tokens, n):
        logits = model.forward(params, tokens, config)
        return jnp.argmax(jax.lax.dynamic_index_in_dim(logits[0], n - 1, keepdims=False))

    def pad(seq):
        L = min(max_len, 1 << (len(seq) - 1).bit_length())
        out = np.zeros((1, L), np.int32)
        out[0, :len(seq)] = seq
        return out

    def run(seq, n_new):
        seq = list(seq)
        for _ in range(n_new):
            seq.append(int(next_token(params, pad(seq), np.int32(len(seq)))))
        return seq

    # warm up every padded length the timed run will meet
    L = 1 << (len(prompt) - 1).bit_length()
    while L < len(prompt) + new_tokens:
        next_token(params, np.zeros((1, min(L, max_len)), np.int32), np.int32(1)).block_until_ready()
        L *= 2
    next_token(params, np.zeros((1, min(L, max_len)), np.int32), np.int32(1)).block_until_ready()
    return run(prompt, new_tokens)


# ---------------------------------------------------------------------------------------------------------------
# Main

def main(argv=None):
    args = build_parser().parse_args(argv)
    batches = [int(b) for b in args.batches.split(",") if b]
    cfg = ModelConfig.from_depth(args.depth, vocab_size=args.vocab_size, max_seq_len=args.max_len,
                                 head_dim=args.head_dim)
    params = model.init_params(cfg, jax.random.PRNGKey(0))
    tok = ByteTokenizer()
    engine = Engine(params, cfg, tok, max_batch=max(batches + [args.concurrent]), max_len=args.max_len)
    engine.stop_tokens = frozenset()  # random weights: every row runs to --new-tokens
    engine.python_start = -1          # and never calls the tool
    rng = np.random.default_rng(0)
    prompt = [256] + rng.integers(0, 256, args.prompt_len - 1).tolist()
    N = args.new_tokens
    print0(f"backend {jax.default_backend()} | d{cfg.n_layer} width {cfg.n_embd} heads {cfg.n_head} "
           f"vocab {cfg.vocab_size} | cache {args.max_len} | prompt {len(prompt)} + {N} new tokens")

    # -- time to first token, batch 1
    for _ in range(2):  # the first pass compiles
        stream = engine.stream(prompt, max_tokens=N, temperature=0.0)
        t0 = time.perf_counter()
        next(stream)
        ttft = time.perf_counter() - t0
        stream.close()
    print0(f"time to first token (prefill {len(prompt)} tokens, batch 1): {ttft * 1e3:.1f} ms")
    # -- streaming cadence: tokens arrive in device chunks; the longest wait between two arrivals
    for _ in range(2):  # the first pass compiles the batch-1 chunk
        arrivals, t0 = [], time.perf_counter()
        for _ in engine.stream(prompt, max_tokens=N, temperature=0.0):
            arrivals.append(time.perf_counter())
    gaps = np.diff(arrivals)
    chunks = 1 + int((gaps > 5e-4).sum())   # tokens of one chunk arrive microseconds apart
    print0(f"streaming, batch 1: {len(arrivals)} tokens in {chunks} device chunks, longest wait between arrivals "
           f"{gaps.max() * 1e3:.1f} ms")

    # -- cached decode at each batch size
    rates = {}
    for B in batches:
        engine.generate(prompt, num_samples=B, max_tokens=4, temperature=0.0)  # compile this batch size
        times = []
        for _ in range(args.repeats):
            (out, _), dt = timed(lambda: engine.generate(prompt, num_samples=B, max_tokens=N, temperature=0.0))
            assert all(len(r) == len(prompt) + N for r in out)
            times.append(dt)
        dt = float(np.median(times))
        rates[B] = B * N / dt
        print0(f"cached decode, batch {B:3d}: {rates[B]:10.1f} tokens/s  ({dt / N * 1e3:.2f} ms/step)")

    # -- the no-cache baseline, batch 1
    nb = args.baseline_tokens or N
    seq, dt = timed(lambda: recompute_generate(params, cfg, prompt, nb, args.max_len))
    base = nb / dt
    cached_seq, _ = engine.generate(prompt, max_tokens=nb, temperature=0.0)
    same = seq == cached_seq[0]
    print0(f"recompute (no cache), batch 1: {base:10.1f} tokens/s  ({dt / nb * 1e3:.2f} ms/token) | "
           f"same greedy tokens as the cached engine: {same}"
           + ("" if same or engine.dtype == np.float32 else f" (expected in {engine.dtype}: rounding flips ties)"))
    if 1 in rates:
        print0(f"speed-up of cached decode at batch 1 over recompute: {rates[1] / base:.1f}x (goal >= 10x)")

    # -- continuous batching: K concurrent requests vs the same K one after another
    K = args.concurrent
    prompts = [[256] + rng.integers(0, 256, args.prompt_len - 1 + 3 * i).tolist() for i in range(K)]
    sched = BatchScheduler(engine, batch_size=K)
    for p in prompts:  # compile every prefill bucket these prompts use, and the scheduler's batch size
        engine.generate(p, max_tokens=2, temperature=0.0)
        sched.generate(p, max_tokens=2, temperature=0.0)

    def sequential():
        return sum(sum(1 for _ in engine.stream(p, max_tokens=N, temperature=0.0)) for p in prompts)

    def concurrent():
        counts = [0] * K

        def client(i):
            counts[i] = sum(1 for _ in sched.stream(prompts[i], max_tokens=N, temperature=0.0))

        threads = [threading.Thread(target=client, args=(i,)) for i in range(K)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return sum(counts)

    n_seq, t_seq = timed(sequential)
    n_con, t_con = timed(concurrent)
    sched.close()
    print0(f"{K} requests one after another: {n_seq / t_seq:10.1f} tokens/s total ({t_seq:.2f} s)")
    print0(f"{K} concurrent requests, continuous batching: {n_con / t_con:10.1f} tokens/s total ({t_con:.2f} s), "
           f"{t_seq / t_con:.1f}x faster")


if __name__ == "__main__":
    run_main(main)
