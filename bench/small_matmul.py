"""The few-rows product of a decode step, the C++ kernel against XLA's dot, side by side in one run.

    python -m bench.small_matmul                       # d8's shapes, 1 and 8 rows, 5 alternating rounds
    python -m bench.small_matmul --rows 1,2,8,16 --rounds 7

A decode step multiplies every weight matrix by one row per sequence, so it runs at the rate the weights stream
from memory. This times a jitted chain of (rows, k) x (k, n) products over enough distinct matrices (~160 MB) that
the weights come from DRAM, as in a decode step, each product depending on the one before (as layers do), once
through `jnp.dot` and once through `attention_cpu.small_matmul` (csrc/matmul_cpu.cc), alternating, and prints
the median time per product, the weight bytes read per second and the largest difference between the two.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from nanochat_jax.model import attention_cpu

SHAPES = ((512, 512), (512, 2048), (2048, 512), (512, 8192))   # d8: attention, MLP in and out, the LM head
TOTAL_BYTES = 160e6   # weights per chain: far above the L2 caches, so they stream from DRAM


def chain(product, rows, n):
    def run(x, ws):
        acc = jnp.zeros((rows, n), jnp.float32)
        for w in ws:
            acc = acc + product(x, w)
            x = x * (1.0 + 1e-6 * jnp.tanh(acc[:, :1]))   # the next product waits for this one
        return acc
    return jax.jit(run)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", default="1,8", help="comma-separated row counts (1 to 16: the kernel's range)")
    p.add_argument("--rounds", type=int, default=5, help="alternating timed rounds (the median is printed)")
    args = p.parse_args(argv)
    if not attention_cpu.available():
        raise SystemExit("the C++ kernels are unavailable on this machine (see the warning above)")
    rng = np.random.default_rng(0)
    print(f"backend {jax.default_backend()}, {jax.device_count()} device(s); "
          f"{TOTAL_BYTES / 1e6:.0f} MB of weights per chain (from DRAM)")
    for k, n in SHAPES:
        count = max(4, int(TOTAL_BYTES // (k * n * 4)))
        ws = [jnp.asarray(rng.standard_normal((k, n), np.float32) / np.sqrt(k)) for _ in range(count)]
        for rows in (int(r) for r in args.rows.split(",")):
            x = jnp.asarray(rng.standard_normal((rows, k), np.float32))
            variants = {"xla": chain(jnp.dot, rows, n), "kernel": chain(attention_cpu.small_matmul, rows, n)}
            outs = {name: f(x, ws).block_until_ready() for name, f in variants.items()}   # compile, warm up
            diff = float(jnp.max(jnp.abs(outs["kernel"] - outs["xla"])) / jnp.max(jnp.abs(outs["xla"])))
            times = {name: [] for name in variants}
            for _ in range(args.rounds):
                for name, f in variants.items():
                    t0 = time.perf_counter()
                    f(x, ws).block_until_ready()
                    times[name].append((time.perf_counter() - t0) / count)
            med = {name: float(np.median(t)) for name, t in times.items()}
            rate = {name: k * n * 4 / t / 1e9 for name, t in med.items()}
            print(f"({rows:2d}, {k:4d}) x ({k:4d}, {n:4d}), {count:3d} matrices: xla {med['xla'] * 1e6:7.1f} us "
                  f"({rate['xla']:4.1f} GB/s) | kernel {med['kernel'] * 1e6:7.1f} us ({rate['kernel']:4.1f} GB/s) | "
                  f"kernel speed-up {med['xla'] / med['kernel']:.2f}x | max rel diff {diff:.1e}", flush=True)


if __name__ == "__main__":
    main()
