"""Compile time of the training loss-and-gradient at several depths, on the shapes alone (no weights allocated).

    python -m bench.compile_time                          # d4, d12, d20; 1 x 2048 tokens; the 2026 recipe
    python -m bench.compile_time --depths 4,8 --seq 512
    PYTHONPATH=OTHER_CHECKOUT python bench/compile_time.py   # the same figures for another checkout of the project

Prints, per depth, the seconds to trace and lower `jax.jit(jax.value_and_grad(model.loss))` and the seconds XLA
takes to compile it for the default backend: the part of the first training step that grows with depth. Each
depth runs in a fresh process (no compilation cache), `--repeats` times, and the median is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time


def measure(depth: int, seq: int, recipe: str) -> dict:
    import jax
    import jax.numpy as jnp

    from nanochat_jax import model

    config = model.ModelConfig.from_depth(depth, max_seq_len=seq, recipe=recipe)
    params = jax.eval_shape(model.init_params, config, jax.random.PRNGKey(0))
    tokens = jax.ShapeDtypeStruct((1, seq), jnp.int32)
    step = jax.jit(jax.value_and_grad(model.loss), static_argnums=3)
    t0 = time.perf_counter()
    lowered = step.lower(params, tokens, tokens, config)
    t1 = time.perf_counter()
    lowered.compile()
    t2 = time.perf_counter()
    return {"lower_s": t1 - t0, "compile_s": t2 - t1, "package": os.path.dirname(model.__file__)}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--depths", default="4,12,20", help="comma-separated depths")
    p.add_argument("--seq", type=int, default=2048, help="sequence length")
    p.add_argument("--recipe", default="2026", choices=["2025", "2026"])
    p.add_argument("--repeats", type=int, default=1, help="fresh processes per depth (the median is printed)")
    p.add_argument("--child", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args.seq, args.recipe)))
        return
    env = dict(os.environ, JAX_ENABLE_COMPILATION_CACHE="false")
    print(f"{'depth':>5} {'trace+lower s':>14} {'compile s':>10}  package")
    for depth in [int(d) for d in args.depths.split(",")]:
        runs = []
        for _ in range(args.repeats):
            out = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", str(depth), "--seq",
                                  str(args.seq), "--recipe", args.recipe], env=env, check=True,
                                 capture_output=True, text=True).stdout
            runs.append(json.loads(out.strip().splitlines()[-1]))
        lower = statistics.median(r["lower_s"] for r in runs)
        comp = statistics.median(r["compile_s"] for r in runs)
        print(f"{depth:>5} {lower:>14.2f} {comp:>10.2f}  {runs[0]['package']}", flush=True)


if __name__ == "__main__":
    main()
