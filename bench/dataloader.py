"""Pretraining loader throughput vs. what a d8 train step consumes on this machine, and the best-fit packer's crop.

    PYTHONPATH=. python bench/dataloader.py                       # defaults: T=2048, B=8, d8 step at T=1024
    PYTHONPATH=. python bench/dataloader.py --step-seq-len 2048 --workers 2

Corpora: (1) the embedded corpus (real English; short documents) tokenized with the tokenizer in the base dir, or
one trained here on it (vocab 4096; byte tokenizer if bpe_rs is missing); (2) synthetic documents with FineWeb-like
lengths (log-normal, median 600 tokens). The loader's crop fraction covers only the batches timed, while its
1000-document buffer still absorbs the long documents; the packer alone over many rows gives the steady state
(nanochat reports ~35% of tokens cropped on FineWeb-Edu at T=2048).
The goal: the loader at least 20x faster than the step, so it never stalls training.
"""

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from nanochat_jax.data.loader import pretrain_loader  # noqa: E402
from nanochat_jax.data.packing import BestFitPacker  # noqa: E402
from nanochat_jax.data.shards import write_shard  # noqa: E402


def find(state, key):
    """Sum of `key` over a nested grain state (one per packer: several with workers)."""
    if isinstance(state, dict):
        return sum(find(v, key) for k, v in state.items() if k != key) + (state.get(key, 0) or 0)
    if isinstance(state, (list, tuple)):
        return sum(find(v, key) for v in state)
    return 0


def loader_rate(shards, B, T, bos, packing, workers, batches):
    loader = pretrain_loader(shards, B, T, bos, packing=packing, num_workers=workers, process_index=0,
                             process_count=1)
    next(loader)                                   # start-up (workers spawn) not counted
    t0 = time.perf_counter()
    for _ in range(batches):
        next(loader)
    dt = time.perf_counter() - t0
    st = loader.get_state()
    loader.close()
    cropped, packed = find(st, "cropped"), find(st, "packed")
    crop = cropped / (cropped + packed) if packed else 0.0
    return batches * B * T / dt, crop


def steady_crop(lengths, T, rows, buffer_size=1000):
    """Crop fraction of the best-fit packer alone over `rows` rows (documents cycled), measured over the second
    half: the first rows crop little because the buffer still absorbs the documents longer than a row."""
    p = BestFitPacker(T + 1, buffer_size, bos=0)
    i, mark = 0, None
    for r in range(rows):
        while len(p) < buffer_size:
            p.add(i, 0, np.zeros(lengths[i % len(lengths)], np.int32))
            i += 1
        p.pop_row()
        if r == rows // 2:
            mark = (p.cropped, p.packed)
    c, k = p.cropped - mark[0], p.packed - mark[1]
    return c / (c + k)


def get_bench_tokenizer():
    from nanochat_jax.data.documents import embedded_corpus
    from nanochat_jax.data.tokenizer import Tokenizer, get_tokenizer
    try:
        return get_tokenizer(), "base dir tokenizer"
    except Exception:
        pass
    try:
        return Tokenizer.train_from_iterator(embedded_corpus(), 4096), "bpe_rs vocab 4096 on the embedded corpus"
    except Exception as e:  # bpe_rs not built: the byte tokenizer still gives real document lengths (in bytes)
        return Tokenizer({bytes([i]): i for i in range(256)}), f"byte tokenizer ({type(e).__name__})"


def step_rate(depth, T, steps):
    """Tokens/s of the real jitted train step (d`depth`, one row of T tokens per step, one CPU device)."""
    try:
        import jax
        from nanochat_jax import model
        from nanochat_jax import optim
        from nanochat_jax.core import sharding
        from nanochat_jax.train import step as train
        from nanochat_jax.core.config import ModelConfig
    except ImportError as e:
        return None, f"train step not available ({e})"
    config = ModelConfig.from_depth(depth, max_seq_len=T)
    mesh = sharding.make_mesh(None, devices=jax.devices()[:1])
    params = model.init_params(config, jax.random.PRNGKey(0))
    tx = optim.build_optimizer(params, config, num_steps=1000)
    state, shardings = train.init_train_state(params, tx, mesh)
    step = train.make_train_step(config, tx, mesh, shardings)
    rng = np.random.default_rng(0)
    x = rng.integers(0, config.vocab_size, size=(1, 1, T + 1)).astype(np.int32)
    batch = sharding.put_batch({"inputs": x[..., :-1], "targets": x[..., 1:]}, mesh)
    state, m = step(state, batch)                  # compile
    jax.block_until_ready(m)
    t0 = time.perf_counter()
    for _ in range(steps):
        state, m = step(state, batch)
    jax.block_until_ready(m)
    return steps * T / (time.perf_counter() - t0), f"d{depth} (vocab {config.vocab_size}), 1x{T} tokens per step"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--batches", type=int, default=200)
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--crop-rows", type=int, default=20000, help="rows for the packer's steady-state crop")
    ap.add_argument("--depth", type=int, default=8)
    ap.add_argument("--step-seq-len", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=3)
    args = ap.parse_args()
    B, T = args.batch, args.seq_len

    from nanochat_jax.data.shards import pretokenize
    tmp = Path(tempfile.mkdtemp(prefix="bench_dataloader_"))
    tok, how = get_bench_tokenizer()
    t0 = time.perf_counter()
    info = pretokenize("embedded", tmp / "embedded", tok, val_fraction=0.0, workers=min(2, os.cpu_count() or 1))
    emb = [tmp / "embedded" / n for n in info["train"]]
    n_docs, n_tok = info["docs"]["train"], info["tokens"]["train"]
    print(f"embedded corpus: {n_docs:,} docs, {n_tok:,} tokens ({how}), pretokenized in "
          f"{time.perf_counter() - t0:.1f}s, mean {n_tok / n_docs:.0f} tokens/doc")

    rng = np.random.default_rng(0)
    lengths = np.clip(rng.lognormal(np.log(600), 1.0, size=20_000), 20, 100_000).astype(int)
    docs = [rng.integers(1, 32768, size=n) for n in lengths]
    syn = [write_shard(tmp / f"syn_{i}.bin", docs[i::4], 32768, "bench") for i in range(4)]
    print(f"synthetic corpus: {len(docs):,} docs, {lengths.sum():,} tokens, mean {lengths.mean():.0f} "
          f"median {np.median(lengths):.0f} tokens/doc")

    bos = tok.get_bos_token_id()
    rows = []
    for name, shards, b in (("embedded", emb, bos), ("synthetic", syn, 0)):
        for packing in ("bestfit", "concat"):
            rate, crop = loader_rate(shards, B, T, b, packing, args.workers, args.batches)
            rows.append(rate)
            print(f"loader {name:9s} {packing:7s} B={B} T={T} workers={args.workers}: {rate / 1e6:6.2f}M tokens/s"
                  + (f", cropped {crop:.1%} of tokens" if packing == "bestfit" else ""))

    print(f"best-fit packer alone, synthetic lengths, {args.crop_rows:,} rows of T={T}: steady-state cropped "
          f"{steady_crop(lengths, T, args.crop_rows):.1%} of tokens (nanochat reports ~35% on FineWeb-Edu at 2048)")

    rate, what = step_rate(args.depth, args.step_seq_len, args.steps)
    if rate is None:
        print(f"train step: {what}")
        return
    slowest = min(rows)
    print(f"train step {what}: {rate:,.0f} tokens/s")
    print(f"slowest loader / step = {slowest / rate:,.0f}x  (goal >= 20x): {'OK' if slowest >= 20 * rate else 'TOO SLOW'}")


if __name__ == "__main__":
    main()
