"""Facts about the token shard format (nanochat_jax/data/shards.py), the packers (data/packing.py), the grain
loaders (data/loader.py: determinism, exact resume with and without workers, disjoint reading across processes) and
placing batches on a mesh."""

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from nanochat_jax.core.common import UserError
from nanochat_jax.data.loader import pretrain_loader, sft_loader, stack_microbatches, to_global
from nanochat_jax.data.packing import BestFitPacker
from nanochat_jax.data.shards import TokenShard, write_shard
from nanochat_jax.data.tokenizer import Tokenizer

REPO = Path(__file__).resolve().parent.parent
BOS = 0


@pytest.fixture(scope="module")
def tok():
    return Tokenizer({bytes([i]): i for i in range(256)})


def id_docs(n, rng, lo=5, hi=120):
    """Document d is the token d + 1 repeated (so any token says which document it came from)."""
    return [np.full(rng.integers(lo, hi), d + 1) for d in range(n)]


@pytest.fixture()
def shards(tmp_path):
    rng = np.random.default_rng(0)
    docs = id_docs(300, rng)
    paths = [write_shard(tmp_path / f"s{i}.bin", docs[i * 100:(i + 1) * 100], 1024, "fp-a") for i in range(3)]
    return paths, docs


def conversations(n, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        q = f"question {i}: " + "why " * int(rng.integers(1, 10))
        a = f"answer {i}: " + "because " * int(rng.integers(1, 12))
        out.append({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})
    return out


def take(loader, n):
    return [next(loader) for _ in range(n)]


def same(a, b):
    return all(np.array_equal(x["inputs"], y["inputs"]) and np.array_equal(x["targets"], y["targets"])
               for x, y in zip(a, b, strict=True))


# ---------------------------------------------------------------------------------------------------------------
# Shard files

@pytest.mark.parametrize("vocab, dtype", [(1024, np.uint16), (65536, np.uint16), (100_000, np.uint32)])
def test_shards_round_trip(tmp_path, vocab, dtype):
    rng = np.random.default_rng(1)
    docs = [rng.integers(0, vocab, size=rng.integers(0, 50)) for _ in range(40)] + [[vocab - 1]]
    p = write_shard(tmp_path / "a.bin", docs, vocab, "abc123")
    s = TokenShard(p, fingerprint="abc123")
    assert s.dtype == dtype and len(s) == 41 and s.n_tokens == sum(map(len, docs))
    assert all(np.array_equal(s[i], d) for i, d in enumerate(docs))
    assert np.array_equal(s.doc_lengths(), [len(d) for d in docs])
    import pickle
    s2 = pickle.loads(pickle.dumps(s))          # pickles without its memmaps
    assert len(pickle.dumps(s)) < 1000 and np.array_equal(s2[3], docs[3])


def test_truncated_and_foreign_shards_are_refused(tmp_path, shards):
    paths, _ = shards
    raw = paths[0].read_bytes()
    (tmp_path / "cut.bin").write_bytes(raw[:-10])
    with pytest.raises(UserError, match="truncated or corrupt"):
        pretrain_loader([tmp_path / "cut.bin"], 2, 16, BOS, process_index=0, process_count=1)
    (tmp_path / "junk.bin").write_bytes(b"hello" * 50)
    with pytest.raises(UserError, match="bad magic"):
        TokenShard(tmp_path / "junk.bin")
    with pytest.raises(UserError, match="another tokenizer"):
        pretrain_loader(paths, 2, 16, BOS, fingerprint="fp-b", process_index=0, process_count=1)


def test_corpus_too_small_for_one_batch(tmp_path):
    p = write_shard(tmp_path / "a.bin", [[1, 2, 3], [4, 5]], 16, "fp")
    with pytest.raises(UserError, match="corpus too small"):
        pretrain_loader([p], 4, 64, BOS, process_index=0, process_count=1)
    with pytest.raises(UserError, match="not divisible"):
        pretrain_loader([p], 3, 2, BOS, process_index=0, process_count=2)
    with pytest.raises(UserError, match="corpus too small"):
        sft_loader(conversations(3), Tokenizer({bytes([i]): i for i in range(256)}), 4, 32, packing="pad",
                   process_index=0, process_count=1)


# ---------------------------------------------------------------------------------------------------------------
# Packers

def test_best_fit_takes_the_largest_fitting_document_then_crops_the_shortest():
    p = BestFitPacker(capacity=10, buffer_size=3, bos=BOS)
    for d, n in enumerate([3, 8, 5]):              # with bos: 4, 9, 6
        p.add(d, 0, np.full(n, d + 1))
    row, mask, _ = p.pop_row()
    # the 9-token doc fits first; 1 slot left, nothing fits: the shortest (doc 0) is cropped to its bos
    assert row.tolist() == [BOS] + [2] * 8 + [BOS]
    assert p.cropped == 3 and p.packed == 10 and p.buffered() == [[2, 0]]


def test_best_fit_rows_start_with_bos_are_full_and_use_each_document_once():
    rng = np.random.default_rng(2)
    docs = id_docs(500, rng, 3, 200)
    p = BestFitPacker(capacity=65, buffer_size=500, bos=BOS)
    for d, toks in enumerate(docs):
        p.add(d, 0, toks)
    seen = []
    while len(p) > 0:
        row, mask, _ = p.pop_row()
        assert row[0] == BOS
        if len(p) > 0:
            assert mask[1:].all() or True
            starts = np.flatnonzero(row == BOS)
            seen += [int(row[s + 1]) - 1 for s in starts if s + 1 < len(row)]
    assert len(seen) == len(set(seen))              # no document twice
    assert p.packed + p.cropped == sum(len(d) + 1 for d in docs)


def test_pretrain_loader_rows(shards):
    paths, docs = shards
    loader = pretrain_loader(paths, 4, 32, BOS, seed=3, buffer_size=50, process_index=0, process_count=1)
    batches = take(loader, 20)
    ids = []
    for b in batches:
        x, y = b["inputs"], b["targets"]
        assert x.shape == y.shape == (4, 32) and x.dtype == y.dtype == np.int32
        assert (x[:, 0] == BOS).all()                               # every row starts with bos
        assert (y >= 0).all()                                       # full rows: every position is trained on
        assert np.array_equal(x[:, 1:], y[:, :-1])                  # targets are the inputs shifted by one
        row = np.concatenate([x, y[:, -1:]], axis=1)
        for r in row:
            for seg in np.split(r, np.flatnonzero(r == BOS))[1:]:
                body = seg[1:]
                if len(body):
                    d = int(body[0]) - 1
                    assert (body == d + 1).all() and len(body) <= len(docs[d])
                    ids.append(d)
    assert len(ids) == len(set(ids)) and len(ids) < 300 - 50      # within the first epoch: no document twice
    assert loader.epoch == 1 and loader.position == 20


def test_concat_loader_streams_documents_back_to_back(shards):
    paths, docs = shards
    loader = pretrain_loader(paths, 2, 40, BOS, packing="concat", shuffle=False, process_index=0,
                             process_count=1)
    stream = np.concatenate([np.concatenate([b["inputs"], b["targets"][:, -1:]], 1).ravel() for b in take(loader, 30)])
    want = np.concatenate([np.concatenate([[BOS], d]) for d in docs])[:len(stream)]
    assert np.array_equal(stream, want)


def test_loader_is_deterministic_for_a_seed(shards):
    paths, _ = shards
    kw = dict(B=2, T=32, bos=BOS, process_index=0, process_count=1)
    a = take(pretrain_loader(paths, seed=5, **kw), 5)
    b = take(pretrain_loader(paths, seed=5, **kw), 5)
    c = take(pretrain_loader(paths, seed=6, **kw), 5)
    assert same(a, b) and not same(a, c)


def test_epochs_reshuffle_and_count(tmp_path):
    docs = [np.full(15, d + 1) for d in range(8)]            # 16 tokens with bos: one per row of T + 1 = 16
    p = write_shard(tmp_path / "a.bin", docs, 64, "fp")
    loader = pretrain_loader([p], 1, 15, BOS, packing="concat", seed=0, process_index=0, process_count=1)
    order = [int(next(loader)["inputs"][0, 1]) for _ in range(16)]
    assert sorted(order[:8]) == sorted(order[8:]) == list(range(1, 9)) and order[:8] != order[8:]
    assert loader.epoch == 2


def test_pass_batches_is_one_pass_over_the_corpus(tmp_path):
    """`pass_batches`: the whole batches one pass fills; reading that many stays in the first epoch, one more does
    not (an evaluation stops there instead of reading a small split again and again)."""
    docs = [np.full(15, d + 1) for d in range(10)]           # 10 x 16 tokens with bos = 160: 2 batches of 4 x 16
    p = write_shard(tmp_path / "a.bin", docs, 64, "fp")
    loader = pretrain_loader([p], 4, 15, BOS, packing="concat", shuffle=False, process_index=0, process_count=1)
    assert loader.pass_batches == 2
    take(loader, 2)
    assert loader.epoch == 1
    take(loader, 1)
    assert loader.epoch == 2
    small = pretrain_loader([p], 8, 63, BOS, shuffle=False, require_full_batch=False, process_index=0,
                            process_count=1)
    assert small.pass_batches == 1                            # less than one batch: that one batch is still read


def test_sft_rows_mask_everything_but_the_assistant(tok):
    convs = conversations(20)
    loader = sft_loader(convs, tok, 4, 96, packing="pad", shuffle=False, process_index=0, process_count=1)
    b = next(loader)
    for r in range(4):
        ids, mask = tok.render_conversation(convs[r], max_tokens=97)
        n = len(ids)
        assert b["inputs"][r, :n - 1].tolist() == ids[:-1]
        want = [t if m else -1 for t, m in zip(ids[1:], mask[1:])]
        assert b["targets"][r, :n - 1].tolist() == want
        assert (b["targets"][r, n - 1:] == -1).all()               # padding is never trained on
    packed = next(sft_loader(convs, tok, 4, 256, packing="pack", shuffle=False, process_index=0,
                             process_count=1))
    bos = tok.get_bos_token_id()
    assert (packed["inputs"][:, 0] == bos).all()
    assert (packed["inputs"] == bos).sum() > 4                     # several conversations share a row
    assert (packed["targets"] >= 0).sum() > 2 * (b["targets"] >= 0).sum()


# ---------------------------------------------------------------------------------------------------------------
# Resume exactness: 7 batches, save the state (through JSON), a fresh loader, the next 5 are the same

def make_loader(kind, shards, tok, workers):
    common = dict(seed=11, num_workers=workers, process_index=0, process_count=1)
    if kind == "bestfit":
        return pretrain_loader(shards, 4, 32, BOS, buffer_size=40, **common)
    if kind == "concat":
        return pretrain_loader(shards, 4, 32, BOS, packing="concat", **common)
    return sft_loader(conversations(60), tok, 4, 96, packing="pack" if kind == "sft_pack" else "pad",
                      buffer_size=10, **common)


@pytest.mark.parametrize("workers", [0, pytest.param(2, marks=pytest.mark.slow)])
@pytest.mark.parametrize("kind", ["bestfit", "concat", "sft_pack", "sft_pad"])
def test_resume_is_exact(kind, workers, shards, tok):
    paths, _ = shards
    a = make_loader(kind, paths, tok, workers)
    first = take(a, 7)
    state = json.loads(json.dumps(a.get_state()))
    rest = take(a, 5)
    a.close()
    b = make_loader(kind, paths, tok, workers)
    b.set_state(state)
    assert b.position == 7
    assert same(take(b, 5), rest)
    b.close()
    assert not same(first[:5], rest)


WORKERS_UNDER_A_SIGNAL = """
import signal, sys, time
import numpy as np
from nanochat_jax.data.loader import pretrain_loader
from nanochat_jax.data.shards import write_shard

if __name__ == "__main__":                      # grain's workers are spawned: they import this file again
    stop = []
    signal.signal(signal.SIGINT, lambda *a: stop.append(1))    # as training does (train/stop.py): finish, close
    signal.signal(signal.SIGTERM, lambda *a: stop.append(1))
    docs = [np.full(5 + i % 100, i + 1) for i in range(300)]
    loader = pretrain_loader([write_shard(sys.argv[1], docs, 1024, "fp")], 4, 32, 0, num_workers=2,
                             process_index=0, process_count=1)
    next(loader)
    print("ready", flush=True)
    while not stop:
        next(loader)
        time.sleep(0.01)
    loader.close()
    print("closed", flush=True)
"""


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_workers_survive_a_signal_to_the_group_and_close_leaves_no_shared_memory(tmp_path, signum):
    """Ctrl+C (SIGINT to the whole process group) or `kill -TERM -PGID` while a loader with grain workers runs: the
    main process closes the loader, and no shared-memory block is left for the resource tracker to report
    ("leaked shared_memory objects") - the workers ignore the signal and are stopped by the close."""
    script = tmp_path / "workers.py"
    script.write_text(WORKERS_UNDER_A_SIGNAL)
    p = subprocess.Popen([sys.executable, str(script), str(tmp_path / "a.bin")], cwd=REPO, text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert p.stdout.readline().strip() == "ready", p.stderr.read()
        time.sleep(0.5)                          # the workers fill their buffers
        os.killpg(p.pid, signum)
        out, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    assert p.returncode == 0 and "closed" in out, err[-3000:]
    assert "leaked" not in err, err[-3000:]


def test_resume_refuses_another_worker_count(shards, tok):
    paths, _ = shards
    state = make_loader("bestfit", paths, tok, 0).get_state()
    state["num_workers"] = 2
    with pytest.raises(UserError, match="same --loader-workers"):
        make_loader("bestfit", paths, tok, 0).set_state(state)


# ---------------------------------------------------------------------------------------------------------------
# Onto the mesh; several processes

def test_to_global_shards_rows_over_data():
    import jax
    from jax.sharding import Mesh
    mesh = Mesh(np.array(jax.devices()[:8]), ("data",))
    x = np.arange(8 * 4, dtype=np.int32).reshape(8, 4)
    g = to_global({"inputs": x, "targets": x + 1}, mesh)
    assert g["inputs"].shape == (8, 4) and np.array_equal(np.asarray(g["targets"]), x + 1)
    assert g["inputs"].addressable_shards[3].data.tolist() == [x[3].tolist()]
    st = to_global(stack_microbatches([{"inputs": x, "targets": x}] * 3), mesh)
    assert st["inputs"].shape == (3, 8, 4) and st["inputs"].sharding.spec[1] == "data"


TWO_PROC = textwrap.dedent("""
    import json, sys
    import jax, numpy as np
    jax.distributed.initialize(f"127.0.0.1:{sys.argv[1]}", num_processes=2, process_id=int(sys.argv[2]))
    from jax.sharding import Mesh
    from nanochat_jax.data.loader import pretrain_loader, to_global
    paths = json.loads(sys.argv[3])
    # 40 docs of 7 tokens + bos = 8; T + 1 = 16: each row holds exactly two whole documents
    loader = pretrain_loader(paths, 4, 15, 0, packing="concat", seed=1)
    ids, b = [], None
    for _ in range(5):                       # 5 batches x 2 local rows x 2 docs = 20 docs = this process's half
        b = next(loader)
        ids += [int(t) - 1 for t in np.concatenate([b["inputs"], b["targets"][:, -1:]], 1)[:, [1, 9]].ravel()]
    mesh = Mesh(np.array(jax.devices()), ("data",))
    g = to_global(b, mesh)
    local = sorted((s.index[0].start, s.data.tolist()) for s in g["inputs"].addressable_shards)
    ok = g["inputs"].shape == (4, 15) and [r for _, d in local for r in d] == b["inputs"].tolist()
    print("RESULT", json.dumps({"ids": ids, "global_ok": ok, "process": jax.process_index()}))
""")


@pytest.mark.slow
def test_two_processes_read_disjoint_documents_covering_the_set(tmp_path):
    docs = [np.full(7, d + 1) for d in range(40)]
    paths = [str(write_shard(tmp_path / f"s{i}.bin", docs[i * 20:(i + 1) * 20], 64, "fp")) for i in range(2)]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
           "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen([sys.executable, "-c", TWO_PROC, str(port), str(i), json.dumps(paths)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err[-2000:]
        results.append(json.loads(next(l for l in out.splitlines() if l.startswith("RESULT"))[7:]))
    a, b = (set(r["ids"]) for r in results)
    assert len(results[0]["ids"]) == len(a) == 20 and len(b) == 20
    assert a.isdisjoint(b) and a | b == set(range(40))
    assert all(r["global_ok"] for r in results)


def nanochat_bestfit_rows(docs, n_rows, T, buffer_size=1000, batch=128):
    """nanochat's BOS-aligned best-fit rows, reading `docs` in order (a validation split): before each pick, while
    the buffer holds fewer than buffer_size documents it adds the next `batch` (wrapping into another epoch); the
    largest document that fits goes in (the first buffered among equals), and when none fits the shortest (the
    first among equals) is cropped to fill the row."""
    stream = (d for _ in range(10 ** 6) for d in docs)
    buf, rows = [], []
    for _ in range(n_rows):
        row = []
        while len(row) < T + 1:
            while len(buf) < buffer_size:
                buf += [np.concatenate([[BOS], next(stream)]) for _ in range(batch)]
            room = T + 1 - len(row)
            fits = [i for i, d in enumerate(buf) if len(d) <= room]
            if fits:
                i = max(fits, key=lambda j: (len(buf[j]), -j))
            else:
                i = min(range(len(buf)), key=lambda j: (len(buf[j]), j))
            row += list(buf.pop(i)[:room])
        rows.append(row)
    return np.array(rows)


@pytest.mark.parametrize("n_docs", [2500, 700])   # 700: a split shorter than the buffer wraps into its next epoch
def test_best_fit_rows_match_nanochats_refill_policy(tmp_path, n_docs):
    docs = id_docs(n_docs, np.random.default_rng(4), lo=3, hi=150)
    path = write_shard(tmp_path / "val.bin", docs, 4096, "fp")
    loader = pretrain_loader([path], 8, 64, BOS, shuffle=False, require_full_batch=False, process_index=0,
                             process_count=1)
    got = np.concatenate([np.concatenate([b["inputs"], b["targets"][:, -1:]], 1) for b in take(loader, 16)])
    want = nanochat_bestfit_rows(docs, 128, 64)
    assert (got == want).all(axis=1).sum() == 128
