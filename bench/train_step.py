"""Train-step throughput: tokens/s, model FLOP/s and its ratio to a plain large matmul measured in the same run
(a utilisation figure that holds on any machine), MFU against the peak table on GPUs, and Muon's share of the
step on 1 device and on 8 (fake CPU) devices.

    python -m bench.train_step                                   # CPU: d4, d6, d8 at seq 512, 8 x 2 rows, fp32
    python -m bench.train_step --depths 4 --accum 1 --steps 3    # quick
    python -m bench.train_step --depths 12,20 --seq 2048 --batch 16 --accum 1   # GPU (bf16 by default there)

Goal on CPU: model FLOP/s >= 65% of the matmul rate at d8 in fp32 (nanochat's PyTorch reaches ~59% of its own
matmul rate on our 2-core machines), and Muon's share on 8 devices no larger than on 1.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

# peak dense bf16 FLOP/s per device (vendor datasheets, without sparsity)
PEAK_BF16 = {"B200": 2.25e15, "H200": 989e12, "H100": 989e12, "A100": 312e12}


def peak_flops(device) -> float | None:
    kind = getattr(device, "device_kind", "")
    for name, peak in PEAK_BF16.items():
        if name.lower() in kind.lower():
            return peak
    return None


def timeit(fn, *args, steps=5, warmup=1):
    """Median seconds per call of fn(*args) (blocks on the result)."""
    import jax
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


def matmul_rate(dtype, n: int, steps: int = 5) -> float:
    """FLOP/s of one large square jnp.dot in `dtype` on the default device."""
    import jax
    import jax.numpy as jnp
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32).astype(dtype)
    b = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.float32).astype(dtype)
    f = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=dtype))
    return 2 * n ** 3 / timeit(f, a, b, steps=steps)


def build(depth, seq, batch, mesh_spec=None, devices=None, mode="dp", vocab=None, accum=1, split_muon=True):
    """(config, state, step fn, batch, muon-only update fn + args) for a fresh d`depth` model."""
    import jax
    import numpy as np
    from nanochat_jax import model
    from nanochat_jax import optim
    from nanochat_jax.core import sharding
    from nanochat_jax.train import step as train
    from nanochat_jax.core.config import ModelConfig
    config = ModelConfig.from_depth(depth, max_seq_len=seq, **({"vocab_size": vocab} if vocab else {}))
    mesh = sharding.make_mesh(mesh_spec, devices=devices)
    params = model.init_params(config, jax.random.PRNGKey(0))
    opt_cfg = optim.OptConfig.for_recipe(config.recipe)
    tx = optim.build_optimizer(params, config, opt_cfg, num_steps=1000, mesh=mesh)
    state, shardings = train.init_train_state(params, tx, mesh, mode)
    step = train.make_train_step(config, tx, mesh, shardings, lr_fn=optim.lr_multiplier(opt_cfg, 1000))
    rng = np.random.default_rng(0)
    x = rng.integers(0, config.vocab_size, (accum, batch, seq + 1), dtype=np.int32)
    data = sharding.put_batch({"inputs": x[..., :-1], "targets": x[..., 1:]}, mesh)
    # Muon alone, on the block matrices, with the same shardings as inside the step
    blocks = jax.tree.map(lambda a: a.copy(), {"blocks": state.params["blocks"]})   # the step donates state
    return config, state, step, data, muon_fn(config, blocks, mesh, mode, split_muon)


def muon_fn(config, blocks, mesh, mode="dp", split_muon=True):
    """(jitted Muon update, its args) on `blocks`; split over the mesh's devices, or every device repeating all of it
    (its state then whole on every device too)."""
    import jax
    from nanochat_jax import optim
    from nanochat_jax.core import sharding
    muon = optim.muon(0.02, recipe=config.recipe, mesh=mesh if split_muon else None)
    bsh = jax.tree.map(lambda a: a.sharding, blocks)
    msh = sharding.tree_shardings(jax.eval_shape(muon.init, blocks), mesh, mode)
    if not split_muon:
        msh = jax.tree.map(lambda s: jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()), msh)
    mstate = jax.jit(muon.init, out_shardings=msh)(blocks)
    mfn = jax.jit(muon.update, in_shardings=(bsh, msh, bsh), out_shardings=(bsh, msh))
    return mfn, (blocks, mstate, blocks)


def bench_depth(depth, seq, batch, steps, dot_rate, peak, accum=1, vocab=None):
    """One depth's row. `dot_rate()` measures the reference matmul: once before the first timed step and again
    after each one, so that the ratio compares the two under the same machine conditions (a shared VM's matmul
    rate drifts by 10% within a minute); the row takes the median of each."""
    import jax
    import numpy as np
    from nanochat_jax.core.config import flops_per_token
    config, state, step, data, _ = build(depth, seq, batch, accum=accum, vocab=vocab)
    holder = {"state": state}

    def run(d):
        holder["state"], m = step(holder["state"], d)
        return m["loss"]
    for _ in range(2):                 # compile and warm up before the first reference
        jax.block_until_ready(run(data))
    refs, times = [dot_rate()], []
    for _ in range(steps):
        t0 = time.perf_counter()
        jax.block_until_ready(run(data))
        times.append(time.perf_counter() - t0)
        refs.append(dot_rate())
    dt, ref = float(np.median(times)), float(np.median(refs))
    tok_s = accum * batch * seq / dt
    flops = flops_per_token(config) * tok_s
    row = dict(depth=depth, width=config.n_embd, tokens_per_step=accum * batch * seq, step_ms=dt * 1e3, tok_s=tok_s,
               model_flops=flops, ref_flops=ref, vs_matmul=flops / ref)
    if peak:
        row["mfu"] = flops / peak
    return row


def muon_share(depth, seq, batch, steps, mesh_spec=None, accum=1, vocab=None) -> dict:
    """Muon's update time / the whole step's time, on the default devices (all of them, data parallel)."""
    import jax
    config, state, step, data, (mfn, margs) = build(depth, seq, batch, mesh_spec, accum=accum, vocab=vocab)
    mesh = jax.tree.leaves(margs[0])[0].sharding.mesh
    holder = {"state": state}
    del state

    def run(d):
        holder["state"], m = step(holder["state"], d)
        return m["loss"]
    t_step = timeit(run, data, steps=steps, warmup=2)
    t_muon = timeit(lambda *a: mfn(*a)[0], *margs, steps=steps, warmup=2)
    out = dict(devices=jax.device_count(), step_ms=t_step * 1e3, muon_ms=t_muon * 1e3, share=t_muon / t_step)
    if jax.device_count() > 1:   # the same Muon with every device repeating all of it, for comparison
        holder.clear()   # the train state's memory (8 fake devices at d8 hold 8 copies)
        rfn, rargs = muon_fn(config, margs[0], mesh, split_muon=False)
        out["repeated_ms"] = timeit(lambda *a: rfn(*a)[0], *rargs, steps=steps, warmup=2) * 1e3
    return out


def main(argv=None):
    from nanochat_jax.core.common import ArgumentParser, parse_args, print0
    parser = ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--depths", default="4,6,8", help="comma-separated depths")
    parser.add_argument("--seq", type=int, default=512, help="sequence length")
    parser.add_argument("--batch", type=int, default=2, help="rows per micro-batch (global); 2 x 512 tokens is the "
                        "fastest CPU micro-batch we measured for d8: 4 rows was 8%% slower in 6 of 6 paired steps")
    parser.add_argument("--accum", type=int, default=8, help="micro-batches per optimizer step (Muon runs once per "
                        "step, as in training, where nanochat accumulates to 0.5M tokens)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps (median)")
    parser.add_argument("--vocab", type=int, default=None, help="vocab size (default: the recipe's)")
    parser.add_argument("--dot-size", type=int, default=0, help="matmul reference size (default 2048 CPU, 8192 GPU)")
    parser.add_argument("--muon-depth", type=int, default=4, help="model for the Muon-share figure (0 = skip)")
    parser.add_argument("--muon-child", action="store_true", help="internal: print the Muon share as JSON")
    args = parse_args(parser, "bench_train_step", argv)

    import jax
    from nanochat_jax.core.common import compute_dtype, enable_compilation_cache
    enable_compilation_cache()
    if args.muon_child:
        print(json.dumps(muon_share(args.muon_depth, args.seq, args.batch, args.steps, accum=args.accum,
                                    vocab=args.vocab)))
        return
    dev = jax.devices()[0]
    dtype = compute_dtype()
    on_gpu = dev.platform == "gpu"
    n = args.dot_size or (8192 if on_gpu else 2048)
    dot_rate = matmul_rate(dtype, n, steps=15)
    peak = peak_flops(dev) if on_gpu else None
    print0(f"device {dev.device_kind} x{jax.device_count()} | compute {dtype.name} | jax {jax.__version__}")
    print0(f"reference: {n}x{n} jnp.dot in {dtype.name}: {dot_rate / 1e9:,.1f} GFLOP/s"
           + (f" ({dot_rate / peak:.0%} of the {peak / 1e12:.0f} TFLOP/s bf16 peak)" if peak else "")
           + " (and again after each timed step of every row)")
    print0(f"train step: seq {args.seq}, {args.accum} x {args.batch} rows per step (accumulated in the jit)")
    print0(f"{'depth':>5} {'width':>5} {'tok/step':>8} {'step ms':>9} {'tok/s':>10} {'model GFLOP/s':>14} "
           f"{'ref GFLOP/s':>11} {'vs matmul':>9}" + (f" {'MFU':>6}" if peak else ""))
    rows = []
    for d in [int(x) for x in args.depths.split(",") if x]:
        r = bench_depth(d, args.seq, args.batch, args.steps, lambda: matmul_rate(dtype, n, steps=15), peak,
                        accum=args.accum, vocab=args.vocab)
        rows.append(r)
        print0(f"{r['depth']:>5} {r['width']:>5} {r['tokens_per_step']:>8} {r['step_ms']:>9.1f} {r['tok_s']:>10,.0f} "
               f"{r['model_flops'] / 1e9:>14,.1f} {r['ref_flops'] / 1e9:>11,.1f} {r['vs_matmul']:>9.1%}"
               + (f" {r['mfu']:>6.1%}" if peak else ""))

    if args.muon_depth:
        batch8 = -(-args.batch // 8) * 8   # the same global batch on 1 and on 8 devices
        one = muon_share(args.muon_depth, args.seq, batch8, args.steps, accum=args.accum, vocab=args.vocab)
        print0(f"Muon share d{args.muon_depth}, 1 device (batch {batch8}): {one['muon_ms']:.1f} ms of {one['step_ms']:.1f} ms "
               f"= {one['share']:.1%}")
        if not on_gpu:   # 8 fake CPU devices in a fresh process (the device count is fixed at backend start)
            env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=(
                os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
                " --xla_cpu_enable_concurrency_optimized_scheduler=false").strip())
            cmd = [sys.executable, "-m", "bench.train_step", "--muon-child", "--muon-depth", str(args.muon_depth),
                   "--seq", str(args.seq), "--batch", str(batch8), "--steps", str(args.steps),
                   "--accum", str(args.accum)] + (["--vocab", str(args.vocab)] if args.vocab else [])
            out = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if out.returncode != 0:
                print0(f"8-device run failed:\n{out.stderr[-2000:]}")
            else:
                eight = json.loads(out.stdout.strip().splitlines()[-1])
                print0(f"Muon share d{args.muon_depth}, 8 fake devices (batch {batch8}): {eight['muon_ms']:.1f} ms of "
                       f"{eight['step_ms']:.1f} ms = {eight['share']:.1%} "
                       f"({'<=' if eight['share'] <= one['share'] else '>'} 1 device); every device repeating all "
                       f"of Muon instead: {eight['repeated_ms']:.1f} ms")


if __name__ == "__main__":
    from nanochat_jax.core.common import run_main
    run_main(main)
