"""The model's large products on the AMX tile unit (bf16x3, `attention_cpu.tile_matmul`) against XLA:CPU's fp32 GEMM,
side by side in one run, at the shapes of a training step (8 x 512 tokens, the harness's step; vocab 8,192).

    python -m bench.tile_matmul                    # d6's products, 5 alternating rounds
    python -m bench.tile_matmul --depths 4,8 --rounds 7
    python -m bench.tile_matmul --step             # also the jitted train step, NANOCHAT_AMX=0 against the default

Each product is timed as its own jitted call: the forward (tokens x C) @ (C x out), the input gradient g w^T and the
weight gradient x^T g of an attention projection (C x C), the MLP's two matrices (C x 4C, 4C x C) and the LM head
(C x V: logits and dx; its wide weight gradient stays on XLA, see kernels_cpu._cpu_matmul). Prints the medians, both
rates and the tile product's largest difference from the float64 product (relative to its largest entry) next to
fp32's. --step times `bench.train_step.build`'s jitted step in one process, NANOCHAT_AMX=0 (every product fp32,
Muon's included) and the default, alternating. Needs a CPU with AMX (`attention_cpu.amx_ready()`).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from nanochat_jax.model import attention_cpu

TOKENS = 8 * 512
VOCAB = 8192


def products(depth: int):
    """(name, m, n, k, at, bt) of a d`depth` training step's products (width 64 per layer, as ModelConfig)."""
    C = 64 * depth
    rows = []
    for name, k, n in (("attn C x C", C, C), ("mlp C x 4C", C, 4 * C), ("mlp 4C x C", 4 * C, C)):
        rows += [(f"{name} fwd", TOKENS, n, k, False, False), (f"{name} dx", TOKENS, k, n, False, True),
                 (f"{name} dW", k, n, TOKENS, True, False)]
    return rows + [("head logits", TOKENS, VOCAB, C, False, False), ("head dx", TOKENS, C, VOCAB, False, True)]


def time_products(depth: int, rounds: int):
    rng = np.random.default_rng(depth)
    print(f"d{depth}: product (m x n x k)          tile ms   GFLOP/s |  fp32 ms   GFLOP/s | speedup | err tile / fp32")
    for name, m, n, k, at, bt in products(depth):
        a = rng.standard_normal((k, m) if at else (m, k), np.float32)
        b = rng.standard_normal((n, k) if bt else (k, n), np.float32)
        dims = (((0 if at else 1,), (1 if bt else 0,)), ((), ()))
        tile = jax.jit(lambda a, b, at=at, bt=bt: attention_cpu.tile_matmul(a, b, at, bt))
        xla = jax.jit(lambda a, b, dims=dims: jax.lax.dot_general(a, b, dims))
        A, B = jnp.asarray(a), jnp.asarray(b)
        out = {f: np.asarray(f(A, B)) for f in (tile, xla)}
        times = {tile: [], xla: []}
        for _ in range(rounds):
            for f in (tile, xla):
                t = time.perf_counter()
                f(A, B).block_until_ready()
                times[f].append(time.perf_counter() - t)
        ref = (a.T if at else a).astype(np.float64) @ (b.T if bt else b).astype(np.float64)
        err = {f: np.abs(out[f] - ref).max() / np.abs(ref).max() for f in (tile, xla)}
        med = {f: float(np.median(times[f])) for f in (tile, xla)}
        flops = 2.0 * m * n * k
        print(f"  {name:15s} {m:5d} x {n:5d} x {k:5d}  {med[tile] * 1e3:7.1f} {flops / med[tile] / 1e9:9.0f} | "
              f"{med[xla] * 1e3:7.1f} {flops / med[xla] / 1e9:9.0f} | {med[xla] / med[tile]:6.2f}x | "
              f"{err[tile]:.1e} / {err[xla]:.1e}", flush=True)


def time_step(depth: int, rounds: int):
    """The jitted train step, NANOCHAT_AMX=0 and default, built in one process (the switch is read at trace)."""
    from bench import train_step
    built = {}
    for amx in ("0", "1"):
        os.environ["NANOCHAT_AMX"] = amx
        _, state, step, data, _ = train_step.build(depth, 512, 8, None, accum=1, vocab=VOCAB)
        for _ in range(2):
            state, metrics = step(state, data)
            jax.block_until_ready(metrics["loss"])
        built[amx] = [state, step, data]
    os.environ.pop("NANOCHAT_AMX")
    times = {"0": [], "1": []}
    for _ in range(rounds):
        for amx in ("0", "1"):
            state, step, data = built[amx]
            for _ in range(3):
                t = time.perf_counter()
                state, metrics = step(state, data)
                jax.block_until_ready(metrics["loss"])
                times[amx].append(time.perf_counter() - t)
            built[amx][0] = state
    fp32, tiles = (float(np.median(times[a])) for a in ("0", "1"))
    print(f"d{depth} train step (8 x 512 tokens): NANOCHAT_AMX=0 {fp32 * 1e3:.0f} ms, default {tiles * 1e3:.0f} ms "
          f"({fp32 / tiles:.2f}x)", flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depths", default="6", help="comma-separated depths")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds (median)")
    parser.add_argument("--step", action="store_true", help="also the train step, NANOCHAT_AMX=0 against default")
    args = parser.parse_args(argv)
    if not attention_cpu.amx_ready():
        sys.exit("bench.tile_matmul: this CPU (or its kernel build) has no AMX tile unit; nothing to compare")
    print(f"{jax.devices()[0].device_kind}, {os.cpu_count()} cores; tile = bf16x3 on AMX, fp32 = XLA's GEMM")
    depths = [int(d) for d in args.depths.split(",")]
    for d in depths:
        time_products(d, args.rounds)
    if args.step:
        for d in depths:
            time_step(d, max(args.rounds // 2, 2))


if __name__ == "__main__":
    main()
