"""Muon's update on a model's block matrices, its orthogonalisation paths side by side in one run.

    python -m bench.muon_step                      # d4, d6, d8 (2026 recipe, fp32 on CPU), 7 alternating rounds
    python -m bench.muon_step --depths 6 --rounds 11

`optim/muon.py` runs the Polar Express polynomial of the wide (MLP) matrices through their Gram matrix
(`_iterate_gram`) and the square ones directly, and on CPU both through the C++ kernel (`polar_iterate`: one matrix
per thread, symmetric products by halves; on a CPU with AMX its products run on the tile unit as bf16x3). This times
the jitted update on one device in four variants, alternating: XLA with the direct form for every matrix (the plain
formula), XLA with the Gram form, the kernel with fp32 products, and the default (the kernel where it is built, with
the tile products where the CPU has them), and prints the medians and each variant's largest difference from the
first (relative to the update's largest entry).
"""

from __future__ import annotations

import argparse
import importlib
import time

import jax
import jax.numpy as jnp
import numpy as np

from nanochat_jax import model, optim
from nanochat_jax.core.config import ModelConfig
from nanochat_jax.model import attention_cpu

muon_mod = importlib.import_module("nanochat_jax.optim.muon")


def block_matrices(depth: int, seed: int = 0):
    """The block matrices (Muon's parameters) of a fresh d`depth` model, and gradient-like random ones."""
    config = ModelConfig.from_depth(depth, max_seq_len=512, vocab_size=8192, head_dim=64, window_pattern="L")
    params = model.init_params(config, jax.random.PRNGKey(seed))
    blocks = {k: v for k, v in params["blocks"].items()}
    leaves, treedef = jax.tree.flatten(blocks)
    keys = jax.random.split(jax.random.PRNGKey(seed + 1), len(leaves))
    grads = treedef.unflatten([jax.random.normal(k, p.shape, p.dtype) for k, p in zip(keys, leaves)])
    matrices = lambda t: jax.tree.map(lambda x: x if x.ndim == 2 else None, t)   # noqa: E731
    return config, matrices(blocks), matrices(grads)


VARIANTS = {"XLA direct": (False, False, False), "XLA Gram": (True, False, False),   # (Gram, kernel, tiles)
            "kernel fp32": (True, True, False), "default": (True, True, True)}


def compiled_update(config, params, grads, gram: bool, kernel: bool, tiles: bool = True):
    """Muon's jitted update with the Gram form, the CPU kernel and its tile products allowed or not, compiled now
    (all are chosen at trace time)."""
    saved = muon_mod.GRAM_MIN_ASPECT, attention_cpu.supports_polar, attention_cpu.polar_splits
    muon_mod.GRAM_MIN_ASPECT = saved[0] if gram else float("inf")
    if not kernel:
        attention_cpu.supports_polar = lambda w: False
    if not tiles:
        attention_cpu.polar_splits = lambda: 0
    try:
        tx = optim.muon(0.02, recipe=config.recipe)
        state = tx.init(params)
        fn = jax.jit(tx.update).lower(grads, state, params).compile()
    finally:
        muon_mod.GRAM_MIN_ASPECT, attention_cpu.supports_polar, attention_cpu.polar_splits = saved
    return fn, state


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depths", default="4,6,8", help="comma-separated depths")
    parser.add_argument("--rounds", type=int, default=7, help="alternating timed rounds (median)")
    args = parser.parse_args(argv)
    print(f"{jax.devices()[0].device_kind}, {jax.device_count()} device(s); ms per Muon update, median of "
          f"{args.rounds} alternating rounds")
    names = list(VARIANTS)
    print("| depth | " + " | ".join(names) + " | max |diff| / max |update| vs " + names[0] + " |")
    print("|---|" + "---|" * (len(names) + 1))
    for depth in (int(d) for d in args.depths.split(",")):
        config, params, grads = block_matrices(depth)
        fns = {name: compiled_update(config, params, grads, *VARIANTS[name]) for name in names}
        outs = {name: jax.tree.leaves(jax.block_until_ready(fn(grads, state, params)[0]))
                for name, (fn, state) in fns.items()}
        times = {name: [] for name in names}
        for _ in range(args.rounds):
            for name, (fn, state) in fns.items():
                t0 = time.perf_counter()
                jax.block_until_ready(fn(grads, state, params))
                times[name].append(time.perf_counter() - t0)
        ref = outs[names[0]]
        top = max(float(jnp.max(jnp.abs(x))) for x in ref)
        diffs = [max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(ref, outs[n])) / top for n in names[1:]]
        ms = " | ".join(f"{np.median(times[n]) * 1e3:,.0f}" for n in names)
        print(f"| {depth} | {ms} | " + ", ".join(f"{d:.1e}" for d in diffs) + " |", flush=True)


if __name__ == "__main__":
    main()
