"""The grain loaders: token shards or conversations in, training batches out.

Pipeline (grain `IterDataset`):
    doc ids:  `DocIdChunks`: a permutation of range(N) per epoch (seed, epoch), endless; this process takes every
              process_count-th position; served in chunks of 256 (doc id, epoch) pairs
    packer:   `PackDataset` around a `RowPacker` (see `nanochat_jax.data.packing`): BOS-aligned best fit
              (nanochat 2026), plain concatenation, or SFT (whole conversations, padded); reads the documents by
              id through a memory-mapped `ShardDocs` (or renders conversations)
    batch:    B_local rows -> {"inputs": int32 (B, T), "targets": int32 (B, T)} (+ epoch, dropped by `Loader`)
    workers:  optional `mp_prefetch`; each worker packs its own slice of chunks (same worker count to resume).
`pretrain_loader` and `sft_loader` build it. `Loader` wraps the iterator: `next()` gives a numpy batch,
`get_state()`/`set_state()` are JSON-able, and `to_global(batch, mesh)` turns the per-process rows into one global
`jax.Array` sharded over `data`.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Any, Sequence

import grain
import jax
import numpy as np
from absl import flags
from jax.sharding import NamedSharding, PartitionSpec as P

from nanochat_jax.core.common import UserError
from nanochat_jax.data.packing import DocLookup, PackSpec, RowPacker
from nanochat_jax.data.shards import ShardDocs

# ---------------------------------------------------------------------------------------------------------------
# grain pieces

class DocIdChunks:
    """Chunk c of this process's (doc id, epoch) stream, as int64 (K, 2): a grain random-access source.

    The global stream is epoch 0's permutation of range(n), then epoch 1's, ... (a fresh permutation per epoch from
    (seed, epoch); identity when not shuffling). Process p takes global positions p, p + P, p + 2P, ...; chunk c is
    its positions [c K, (c + 1) K). Chunks, not single ids, because grain's per-element cost (~0.2 ms) would
    otherwise dominate the loader.
    """

    def __init__(self, n: int, seed: int, shuffle: bool, process_index: int, process_count: int, k: int = 256):
        self.n, self.seed, self.shuffle, self.pi, self.pc, self.k = n, seed, shuffle, process_index, process_count, k
        self._cache = (None, None)

    def __len__(self):
        return sys.maxsize   # endless: epochs repeat

    def __getstate__(self):
        return {**self.__dict__, "_cache": (None, None)}

    def _perm(self, epoch: int) -> np.ndarray:
        if self._cache[0] != epoch:
            dtype = np.int32 if self.n < 2 ** 31 else np.int64
            perm = np.random.default_rng([self.seed, epoch]).permutation(self.n).astype(dtype) if self.shuffle \
                else np.arange(self.n, dtype=dtype)
            self._cache = (epoch, perm)
        return self._cache[1]

    def __getitem__(self, c: int) -> np.ndarray:
        g = self.pi + self.pc * np.arange(c * self.k, (c + 1) * self.k, dtype=np.int64)
        epoch, pos = np.divmod(g, self.n)
        ids = np.empty_like(g)
        for e in np.unique(epoch):
            sel = epoch == e
            ids[sel] = self._perm(int(e))[pos[sel]]
        return np.stack([ids, epoch], axis=1)


class PackIterator(grain.DatasetIterator):
    """grain's iterator around a `RowPacker`: its rows, and its state as grain's."""

    def __init__(self, parent_it, spec: PackSpec):
        super().__init__(parent_it)
        self.impl = RowPacker(parent_it, spec)

    def __next__(self):
        return next(self.impl)

    def get_state(self):
        return self.impl.get_state()

    def set_state(self, state):
        self.impl.set_state(state)


class PackDataset(grain.IterDataset):
    """Packed rows over a parent of (doc id, epoch) chunks; pickles to grain's worker processes."""

    def __init__(self, parent, spec: PackSpec):
        super().__init__(parent)
        self.spec = spec

    def __iter__(self):
        return PackIterator(self._parent.__iter__(), self.spec)


def _pipeline(chunks: DocIdChunks, spec: PackSpec, rows: int, num_workers: int):
    """The grain pipeline: chunks -> packer -> batch [-> worker processes]."""
    ids = grain.MapDataset.source(chunks).to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
    ds = PackDataset(ids, spec).batch(rows)
    if num_workers > 0:
        _mark_flags_parsed()
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers), worker_init_fn=_worker_init)
    return iter(ds)


def _worker_init(worker_index: int, worker_count: int):
    """In each grain worker: ignore SIGINT and SIGTERM. Ctrl+C (or `kill -TERM -PGID`) reaches the whole process
    group; a worker killed by it leaves the shared-memory blocks it was handing over behind ("leaked shared_memory
    objects"). The main process owns the workers: it handles the signal and `Loader.close()` stops them (grain's
    close; at exit its finalizer), unlinking every block. SIGKILL still ends them."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _process_info(process_index, process_count):
    if process_index is None or process_count is None:
        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    return process_index, process_count


def _local_rows(B: int, process_count: int) -> int:
    if B % process_count:
        raise UserError(f"batch size {B} rows is not divisible by the {process_count} processes")
    return B // process_count


class Loader:
    """Iterator of numpy micro-batches {"inputs": int32 (B_local, T), "targets": int32 (B_local, T)}.

    `epoch` (1-based, of the newest document in the last batch) and `position` (batches yielded) are for logs.
    `pass_batches`: how many batches one pass over the corpus fills (at least 1; None when not known), so that an
    evaluation can stop before it reads a small split again. `get_state()` is a JSON-able dict; `set_state(state)` on a loader built with the same arguments continues with
    exactly the next batch (also with grain workers, given the same worker count).
    """

    def __init__(self, iterator, num_workers: int = 0, name: str = "loader", pass_batches: int | None = None):
        self.name, self.num_workers, self.pass_batches = name, num_workers, pass_batches
        self._it = iterator
        self.position, self.epoch = 0, 1

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        b = next(self._it)
        self.position += 1
        self.epoch = int(np.max(b["epoch"])) + 1
        return {"inputs": np.asarray(b["inputs"]), "targets": np.asarray(b["targets"])}

    def get_state(self) -> dict[str, Any]:
        return {"grain": self._it.get_state(), "position": self.position, "epoch": self.epoch,
                "num_workers": self.num_workers}

    def set_state(self, state: dict[str, Any]):
        if state.get("num_workers", self.num_workers) != self.num_workers:
            raise UserError(f"{self.name}: saved with {state['num_workers']} loader workers, now {self.num_workers};"
                            " resume with the same --loader-workers")
        self._it.set_state(state["grain"])
        self.position, self.epoch = state["position"], state["epoch"]

    def close(self):
        close = getattr(self._it, "close", None)
        if close:
            close()


def _mark_flags_parsed():
    """grain's worker processes read absl flags; a script parsed with argparse must mark them parsed."""
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


# ---------------------------------------------------------------------------------------------------------------
# Public constructors

def pretrain_loader(shards: Sequence[str | os.PathLike] | ShardDocs, B: int, T: int, bos: int, *,
                    packing: str = "bestfit", seed: int = 0, shuffle: bool = True, buffer_size: int = 1000,
                    fingerprint: str | None = None, num_workers: int = 0, require_full_batch: bool = True,
                    process_index: int | None = None, process_count: int | None = None) -> Loader:
    """Pretraining batches from token shards: B global rows of T tokens (each process yields B / processes rows).

    packing: "bestfit" (every row starts with bos; nanochat 2026) or "concat" (documents back to back, rows cut
    anywhere). shuffle=False reads documents in order (validation). fingerprint: refuse shards of another tokenizer.
    The stream is endless (epochs repeat, reshuffled); a corpus smaller than one batch is an error unless
    require_full_batch=False (e.g. a tiny validation split, read for a fixed number of batches).
    """
    if packing not in ("bestfit", "concat"):
        raise UserError(f"unknown packing {packing!r}: use bestfit or concat")
    docs = shards if isinstance(shards, ShardDocs) else ShardDocs(list(shards), fingerprint)
    pi, pc = _process_info(process_index, process_count)
    b_local = _local_rows(B, pc)
    need = b_local * (T + 1)
    have = (docs.n_tokens + len(docs)) // pc
    if have < need and require_full_batch:
        raise UserError(f"corpus too small: {docs.n_tokens} tokens in {len(docs)} documents cannot fill one batch "
                        f"of {B}x{T + 1} tokens; use more data or a smaller --device-batch-size/--max-seq-len")
    # the buffer is not capped at the split's size: a short split wraps into its next epoch, as nanochat's does
    spec = PackSpec(DocLookup(docs=docs), packing, T, max(1, buffer_size), bos, bos)
    it = _pipeline(DocIdChunks(len(docs), seed, shuffle, pi, pc), spec, b_local, num_workers)
    return Loader(it, num_workers, name="pretrain loader", pass_batches=max(1, have // need))


def sft_loader(conversations, tokenizer, B: int, T: int, *, packing: str = "pack", seed: int = 0,
               shuffle: bool = True, buffer_size: int = 100, num_workers: int = 0,
               process_index: int | None = None, process_count: int | None = None) -> Loader:
    """SFT batches from conversations (a task or list: len() and [i] -> {"messages": [...]}; or any iterable).

    Each conversation is rendered with `tokenizer.render_conversation` (ids, loss mask); targets are -1 where the
    mask is 0 and on padding. packing: "pack" (best fit of whole conversations, rest of the row padded) or "pad"
    (one conversation per row). Conversations longer than T + 1 tokens are cropped.
    """
    if packing not in ("pack", "pad"):
        raise UserError(f"unknown SFT packing {packing!r}: use pack or pad")
    if not (hasattr(conversations, "__len__") and hasattr(conversations, "__getitem__")):
        conversations = list(conversations)   # a plain iterable: random access is needed for shuffling and resume
    n = len(conversations)
    pi, pc = _process_info(process_index, process_count)
    b_local = _local_rows(B, pc)
    if n // pc < 1 or (packing == "pad" and n // pc < b_local):
        raise UserError(f"corpus too small: {n} conversations cannot fill one batch of {B} rows")
    pad_id = tokenizer.encode_special("<|assistant_end|>")
    buffer_size = max(1, min(buffer_size, n // pc))
    lookup = DocLookup(conversations=conversations, tokenizer=tokenizer, max_tokens=T + 1)
    spec = PackSpec(lookup, "sft_pack" if packing == "pack" else "sft_pad", T, buffer_size, None, pad_id)
    it = _pipeline(DocIdChunks(n, seed, shuffle, pi, pc), spec, b_local, num_workers)
    return Loader(it, num_workers, name="SFT loader")


# ---------------------------------------------------------------------------------------------------------------
# Onto the devices

def stack_microbatches(batches: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """A list of A micro-batches (B, T) -> {"inputs": (A, B, T), "targets": (A, B, T)}, as the train step takes."""
    return {k: np.stack([b[k] for b in batches]) for k in ("inputs", "targets")}


def to_global(batch: dict[str, np.ndarray], mesh, sharding=None) -> dict:
    """Place this process's rows of a batch on `mesh` as global `jax.Array`s, rows sharded over the `data` axis.

    Arrays (B_local, T) become (B, T); stacked arrays (A, B_local, T) become (A, B, T). `sharding`, if given, is
    used for 2-D arrays instead of `PartitionSpec("data")`.
    """
    out = {}
    for k, v in batch.items():
        if v.ndim == 3:
            s = NamedSharding(mesh, P(None, "data"))
        else:
            s = sharding if sharding is not None else NamedSharding(mesh, P("data"))
        out[k] = jax.make_array_from_process_local_data(s, v)
    return out
