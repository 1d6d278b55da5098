"""Token shards on disk and the grain pipelines that turn them into training batches.

Shard file (`.bin`, one file, little-endian):
    header, 128 bytes: magic b"NCJXTOK\\0", version u32, itemsize u32 (2 = uint16, 4 = uint32), n_tokens u64,
                       n_docs u64, vocab_size u64, tokenizer fingerprint (80 bytes ASCII, zero-padded)
    offsets: uint64[n_docs + 1]   document d is tokens[offsets[d]:offsets[d+1]]
    tokens:  uint16|uint32[n_tokens]
Documents are stored without <|bos|>; the packer prepends it.

Pipelines (grain `IterDataset`):
    doc ids:  `DocIdChunks`: a permutation of range(N) per epoch (seed, epoch), endless; this process takes every
              process_count-th position; served in chunks of 256 (doc id, epoch) pairs
    packer:   BOS-aligned best-fit (nanochat 2026), plain concatenation, or SFT (whole conversations, padded);
              reads the documents by id through a memory-mapped `ShardDocs` (or renders conversations)
    batch:    B_local rows -> {"inputs": int32 (B, T), "targets": int32 (B, T)} (+ epoch, dropped by `Loader`)
    workers:  optional `mp_prefetch`; each worker packs its own slice of chunks (same worker count to resume).
Packer state = the parent's position + the ids in its buffer/current chunk, so a resumed loader rebuilds the exact
buffer by re-reading those documents.
`Loader` wraps the iterator: `next()` gives a numpy batch, `get_state()`/`set_state()` are JSON-able, and
`to_global(batch, mesh)` turns the per-process rows into one global `jax.Array` sharded over `data`.
"""

from __future__ import annotations

import bisect
import os
import struct
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from nanochat_jax.core.common import UserError

# ---------------------------------------------------------------------------------------------------------------
# Shard files

MAGIC = b"NCJXTOK\0"
VERSION = 1
HEADER_SIZE = 128
_HEAD = struct.Struct("<8sIIQQQ")  # magic, version, itemsize, n_tokens, n_docs, vocab_size (40 bytes)
_FP_BYTES = 80
REFILL_DOCS = 128   # best-fit packing tops its buffer up in nanochat's tokenizer batches of 128 documents


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits in 16 bits, else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def write_shard(path: str | os.PathLike, docs: Sequence[Sequence[int]], vocab_size: int, fingerprint: str) -> Path:
    """Write documents (lists/arrays of token ids, no bos) as one shard file; atomic (temp name + rename)."""
    path = Path(path)
    dtype = token_dtype(vocab_size)
    fp = fingerprint.encode("ascii")
    if len(fp) > _FP_BYTES:
        raise ValueError(f"tokenizer fingerprint longer than {_FP_BYTES} bytes")
    lengths = np.fromiter((len(d) for d in docs), dtype=np.uint64, count=len(docs))
    offsets = np.zeros(len(docs) + 1, dtype=np.uint64)
    np.cumsum(lengths, out=offsets[1:])
    arrays = [d if isinstance(d, np.ndarray) else np.asarray(d, dtype=np.int64) for d in docs]
    tokens = np.concatenate(arrays) if arrays else np.zeros(0, dtype)
    if tokens.size and (tokens.dtype.kind not in "iu" or tokens.min() < 0 or tokens.max() >= vocab_size):
        raise ValueError(f"token ids must be integers in [0, {vocab_size})")
    header = _HEAD.pack(MAGIC, VERSION, dtype.itemsize, int(offsets[-1]), len(docs), vocab_size)
    header = header + fp.ljust(_FP_BYTES, b"\0")
    header = header.ljust(HEADER_SIZE, b"\0")
    tmp = path.with_name(path.name + ".tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(tmp, "wb") as f:
        f.write(header)
        f.write(offsets.tobytes())
        f.write(tokens.astype(dtype, copy=False).tobytes())
    os.replace(tmp, path)
    return path


def read_header(path: str | os.PathLike) -> dict:
    """The header fields of a shard, after checking the magic, version and the file's size."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            raw = f.read(HEADER_SIZE)
    except OSError as e:
        raise UserError(f"{path}: cannot read token shard ({e.strerror})") from None
    if len(raw) < HEADER_SIZE or raw[:8] != MAGIC:
        raise UserError(f"{path}: not a nanochat-jax token shard (bad magic); rerun scripts.pretokenize")
    magic, version, itemsize, n_tokens, n_docs, vocab_size = _HEAD.unpack(raw[:_HEAD.size])
    if version != VERSION:
        raise UserError(f"{path}: token shard version {version}, this code reads version {VERSION}; rerun pretokenize")
    if itemsize not in (2, 4):
        raise UserError(f"{path}: corrupt token shard header (itemsize {itemsize})")
    fingerprint = raw[_HEAD.size:_HEAD.size + _FP_BYTES].rstrip(b"\0").decode("ascii", "replace")
    expected = HEADER_SIZE + 8 * (n_docs + 1) + itemsize * n_tokens
    actual = path.stat().st_size
    if actual != expected:
        raise UserError(f"{path}: token shard is truncated or corrupt ({actual} bytes on disk, header says "
                        f"{expected}); delete it and rerun scripts.pretokenize")
    return {"itemsize": itemsize, "n_tokens": n_tokens, "n_docs": n_docs, "vocab_size": vocab_size,
            "fingerprint": fingerprint}


class TokenShard:
    """One shard file, memory-mapped on first access (so the object pickles cheaply to grain workers)."""

    def __init__(self, path: str | os.PathLike, fingerprint: str | None = None):
        self.path = Path(path)
        h = read_header(self.path)
        if fingerprint is not None and h["fingerprint"] != fingerprint:
            raise UserError(f"{self.path}: token shard was made with another tokenizer (fingerprint "
                            f"{h['fingerprint'][:12]}, current {fingerprint[:12]}); rerun scripts.pretokenize")
        self.n_docs, self.n_tokens = h["n_docs"], h["n_tokens"]
        self.vocab_size, self.fingerprint = h["vocab_size"], h["fingerprint"]
        self.dtype = np.dtype(np.uint16 if h["itemsize"] == 2 else np.uint32)
        self._offsets = self._tokens = None

    def _open(self):
        # plain ndarray views of the maps: slicing an np.memmap costs ~10x more per document
        self._offsets = np.asarray(np.memmap(self.path, np.uint64, "r", offset=HEADER_SIZE,
                                             shape=(self.n_docs + 1,)))
        off = HEADER_SIZE + 8 * (self.n_docs + 1)
        self._tokens = np.asarray(np.memmap(self.path, self.dtype, "r", offset=off, shape=(self.n_tokens,))) \
            if self.n_tokens else np.zeros(0, self.dtype)

    def __getstate__(self):
        return {**self.__dict__, "_offsets": None, "_tokens": None}

    def __len__(self) -> int:
        return self.n_docs

    def doc_lengths(self) -> np.ndarray:
        if self._offsets is None:
            self._open()
        return np.diff(self._offsets).astype(np.int64)

    def __getitem__(self, i: int) -> np.ndarray:
        if self._offsets is None:
            self._open()
        lo, hi = self._offsets[i], self._offsets[i + 1]
        return self._tokens[lo:hi]


class ShardDocs:
    """Random-access documents over several shards (grain `RandomAccessDataSource`): doc i -> token array (no bos)."""

    def __init__(self, paths: Sequence[str | os.PathLike], fingerprint: str | None = None):
        if not paths:
            raise UserError("no token shards given (empty corpus?)")
        self.shards = [TokenShard(p, fingerprint) for p in paths]
        self.vocab_size = max(s.vocab_size for s in self.shards)
        self.starts = np.cumsum([0] + [s.n_docs for s in self.shards]).tolist()
        self.n_tokens = sum(s.n_tokens for s in self.shards)
        if self.starts[-1] == 0:
            raise UserError(f"token shards {paths[0]}...: empty corpus (no documents)")

    def __len__(self) -> int:
        return self.starts[-1]

    def __getitem__(self, i: int) -> np.ndarray:
        s = bisect.bisect_right(self.starts, i) - 1
        return self.shards[s][i - self.starts[s]]

    def __repr__(self):
        return f"ShardDocs({len(self.shards)} shards, {len(self)} docs, {self.n_tokens} tokens)"


# ---------------------------------------------------------------------------------------------------------------
# Packers (plain Python, host side). A "doc" is (tokens: int array, mask: int array | None).

class BestFitPacker:
    """Rows of `capacity` tokens (T + 1), nanochat's BOS-aligned best fit.

    The buffer holds at least `buffer_size` documents (pretraining tops it up before every pick, in nanochat's
    batches of REFILL_DOCS; SFT before every row). Each row takes the largest document that still fits, again and again;
    when none fits: `crop=True` (pretraining) crops the shortest buffered document to fill the row exactly (the rest
    of it is dropped and counted in `cropped`); `crop=False` (SFT) pads the row instead (targets -1). `one_per_row`
    puts exactly one document in each row (SFT "pad" mode). Ties between equal lengths go to the older document.
    """

    def __init__(self, capacity: int, buffer_size: int, bos: int | None, crop: bool = True,
                 one_per_row: bool = False, pad_id: int = 0):
        self.capacity, self.buffer_size, self.bos = capacity, buffer_size, bos
        self.crop, self.one_per_row, self.pad_id = crop, one_per_row, pad_id
        self.keys: list[tuple[int, int]] = []    # sorted (length incl. bos, seq)
        self.items: dict[int, tuple] = {}        # seq -> (doc_id, epoch, tokens, mask)
        self.seq = 0
        self.cropped = 0                         # tokens dropped by cropping
        self.packed = 0                          # tokens placed into rows

    def __len__(self):
        return len(self.keys)

    def add(self, doc_id: int, epoch: int, tokens: np.ndarray, mask: np.ndarray | None = None):
        n = len(tokens) + (self.bos is not None)
        self.items[self.seq] = (doc_id, epoch, tokens, mask)
        bisect.insort(self.keys, (n, self.seq))
        self.seq += 1

    def buffered(self) -> list[list[int]]:
        """[[doc_id, epoch], ...] in arrival order: with the source, enough to rebuild the buffer."""
        return [[int(self.items[s][0]), int(self.items[s][1])] for s in sorted(self.items)]

    def _place(self, row, mask_row, pos, k, n_take) -> tuple[int, int]:
        n, s = self.keys.pop(k)
        doc_id, epoch, tokens, mask = self.items.pop(s)
        take = min(n, n_take)
        if self.bos is not None:
            row[pos] = self.bos
            row[pos + 1:pos + take] = tokens[:take - 1]
            mask_row[pos] = 1      # pretraining: predicting the next document's bos is trained on, as nanochat
            mask_row[pos + 1:pos + take] = 1 if mask is None else mask[:take - 1]
        else:
            row[pos:pos + take] = tokens[:take]
            mask_row[pos:pos + take] = 1 if mask is None else mask[:take]
        self.cropped += n - take
        self.packed += take
        return pos + take, epoch

    def pop_row(self, refill=None) -> tuple[np.ndarray, np.ndarray, int]:
        """One row: (tokens int32[capacity], mask int8[capacity] (0 = no loss on this position), max epoch).
        refill(): called before each document is picked (tops the buffer up, as nanochat does)."""
        cap = self.capacity
        row = np.full(cap, self.pad_id, dtype=np.int32)
        mask_row = np.zeros(cap, dtype=np.int8)
        pos, epoch = 0, 0
        while pos < cap:
            if refill is not None:
                refill()
            if not self.keys:
                break
            remaining = cap - pos
            k = bisect.bisect_left(self.keys, (remaining + 1, -1)) - 1   # largest length <= remaining
            if k >= 0:
                # among equal lengths, take the oldest (smallest seq)
                k = bisect.bisect_left(self.keys, (self.keys[k][0], -1))
                pos, e = self._place(row, mask_row, pos, k, remaining)
            elif self.crop or pos == 0:
                pos, e = self._place(row, mask_row, pos, 0, remaining)   # crop the shortest to fill the row
            else:
                break                                                   # SFT: pad the rest
            epoch = max(epoch, e)
            if self.one_per_row:
                break
        return row, mask_row, epoch


# ---------------------------------------------------------------------------------------------------------------
# grain pieces

def _grain():
    import grain
    return grain


class _Lookup:
    """doc id -> (tokens, mask | None). Pretraining: a ShardDocs. SFT: conversations rendered by the tokenizer."""

    def __init__(self, docs=None, conversations=None, tokenizer=None, max_tokens=None):
        self.docs, self.conversations, self.tokenizer, self.max_tokens = docs, conversations, tokenizer, max_tokens

    def __call__(self, i: int):
        if self.docs is not None:
            return self.docs[i], None
        ids, mask = self.tokenizer.render_conversation(self.conversations[i], max_tokens=self.max_tokens)
        return np.asarray(ids, np.int32), np.asarray(mask, np.int8)


class _PackSpec:
    """What the packer needs; pickles to grain workers (no open files)."""

    def __init__(self, lookup: _Lookup, mode: str, T: int, buffer_size: int, bos: int | None, pad_id: int):
        self.lookup, self.mode, self.T, self.buffer_size, self.bos, self.pad_id = \
            lookup, mode, T, buffer_size, bos, pad_id


class RowPacker:
    """Pulls (doc id, epoch) chunks from its parent and yields packed rows {"inputs", "targets", "epoch"}.

    Plain Python (grain's `PackIterator` wraps it; without grain it runs as is). Its state: the parent's, the rest
    of the current chunk, and the buffered document ids (or the current document and offset for "concat").
    """

    def __init__(self, parent_it, spec: _PackSpec):
        self._parent = parent_it   # yields (K, 2) chunks of (doc id, epoch); has get_state / set_state
        self.spec = spec
        self._reset()

    def __iter__(self):
        return self

    def _reset(self):
        sp = self.spec
        self.queue, self.qpos = np.zeros((0, 2), np.int64), 0   # the current chunk of (doc id, epoch)
        if sp.mode == "concat":
            self.cur = None    # [doc_id, epoch, offset into bos+doc]
        else:
            self.packer = BestFitPacker(sp.T + 1, sp.buffer_size if sp.mode != "sft_pad" else 1, sp.bos,
                                        crop=(sp.mode == "bestfit"), one_per_row=(sp.mode == "sft_pad"),
                                        pad_id=sp.pad_id)

    def _pull(self):
        if self.qpos == len(self.queue):
            self.queue, self.qpos = next(self._parent), 0
        doc_id, epoch = self.queue[self.qpos]
        self.qpos += 1
        return int(doc_id), int(epoch)

    def _concat_row(self):
        cap, bos = self.spec.T + 1, self.spec.bos
        row = np.empty(cap, np.int32)
        pos, epoch = 0, 0
        while pos < cap:
            if self.cur is None:
                self.cur = [*self._pull(), 0]
            doc_id, e, off = self.cur
            toks = self.spec.lookup(doc_id)[0]
            n = len(toks) + 1
            take = min(n - off, cap - pos)
            if off == 0:
                row[pos] = bos
                row[pos + 1:pos + take] = toks[:take - 1]
            else:
                row[pos:pos + take] = toks[off - 1:off - 1 + take]
            pos += take
            epoch = max(epoch, e)
            self.cur = None if off + take == n else [doc_id, e, off + take]
        return row, np.ones(cap, np.int8), epoch

    def __next__(self):
        if self.spec.mode == "concat":
            row, mask, epoch = self._concat_row()
        elif self.spec.mode == "bestfit":
            row, mask, epoch = self.packer.pop_row(refill=self._refill_bestfit)
        else:
            p = self.packer
            while len(p) < p.buffer_size:
                self._add_next()
            row, mask, epoch = p.pop_row()
        targets = np.where(mask[1:] > 0, row[1:], -1).astype(np.int32)
        return {"inputs": row[:-1], "targets": targets, "epoch": np.int32(epoch)}

    def _add_next(self):
        doc_id, e = self._pull()
        toks, m = self.spec.lookup(doc_id)
        self.packer.add(doc_id, e, toks, m)

    def _refill_bestfit(self):
        """nanochat's policy: before every pick, while the buffer holds fewer than buffer_size documents, add the
        next REFILL_DOCS (its tokenizer batch), so the buffer holds buffer_size .. buffer_size + REFILL_DOCS - 1."""
        while len(self.packer) < self.packer.buffer_size:
            for _ in range(REFILL_DOCS):
                self._add_next()

    def get_state(self):
        state = {"parent": self._parent.get_state(), "queue": self.queue[self.qpos:].tolist()}
        if self.spec.mode == "concat":
            state["cur"] = self.cur
        else:
            state["buffer"] = self.packer.buffered()
            state["cropped"], state["packed"] = int(self.packer.cropped), int(self.packer.packed)
        return state

    def set_state(self, state):
        self._parent.set_state(state["parent"])
        self._reset()
        self.queue = np.asarray(state["queue"], np.int64).reshape(-1, 2)
        if self.spec.mode == "concat":
            self.cur = None if state["cur"] is None else [int(x) for x in state["cur"]]
        else:
            for doc_id, epoch in state["buffer"]:
                toks, m = self.spec.lookup(doc_id)
                self.packer.add(doc_id, epoch, toks, m)
            self.packer.cropped, self.packer.packed = state["cropped"], state["packed"]


def _build_grain_classes():
    """Define the grain classes (grain is imported lazily; `__getattr__` below makes them picklable)."""
    grain = _grain()

    class PackIterator(grain.DatasetIterator):
        def __init__(self, parent_it, spec: _PackSpec):
            super().__init__(parent_it)
            self.impl = RowPacker(parent_it, spec)

        def __next__(self):
            return next(self.impl)

        def get_state(self):
            return self.impl.get_state()

        def set_state(self, state):
            self.impl.set_state(state)

    class PackDataset(grain.IterDataset):
        def __init__(self, parent, spec: _PackSpec):
            super().__init__(parent)
            self.spec = spec

        def __iter__(self):
            return PackIterator(self._parent.__iter__(), self.spec)

    for cls in (PackIterator, PackDataset):
        cls.__qualname__ = cls.__name__
        globals()[cls.__name__] = cls


def __getattr__(name):
    # grain workers unpickle `nanochat_jax.data.dataloader.PackDataset`: build the classes on first access
    if name in ("PackDataset", "PackIterator"):
        _build_grain_classes()
        return globals()[name]
    raise AttributeError(name)


class _PlainIds:
    """Without grain: the chunk source read in order, with grain's state format ({"next_index": c})."""

    def __init__(self, source):
        self.source, self.next_index = source, 0

    def __next__(self):
        x = self.source[self.next_index]
        self.next_index += 1
        return x

    def get_state(self):
        return {"next_index": self.next_index}

    def set_state(self, state):
        self.next_index = int(state["next_index"])


class _PlainBatches:
    """Without grain: B rows stacked, the packer's state passed through (as grain's batch does)."""

    def __init__(self, packer: RowPacker, rows: int):
        self.packer, self.rows = packer, rows

    def __iter__(self):
        return self

    def __next__(self):
        rows = [next(self.packer) for _ in range(self.rows)]
        return {k: np.stack([r[k] for r in rows]) for k in rows[0]}

    def get_state(self):
        return self.packer.get_state()

    def set_state(self, state):
        self.packer.set_state(state)


def _pipeline(chunks: "DocIdChunks", spec: _PackSpec, rows: int, num_workers: int):
    """The grain pipeline (chunks -> packer -> batch [-> worker processes]), or the plain one without grain."""
    try:
        grain = _grain()
    except ImportError:
        if num_workers > 0:
            raise UserError("loader workers need the `grain` package (pip install grain), or use 0 workers") from None
        return _PlainBatches(RowPacker(_PlainIds(chunks), spec), rows)
    ids = grain.MapDataset.source(chunks).to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
    ds = __getattr__("PackDataset")(ids, spec).batch(rows)
    if num_workers > 0:
        _mark_flags_parsed()
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
    return iter(ds)


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


def _process_info(process_index, process_count):
    if process_index is None or process_count is None:
        import jax
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
    `get_state()` is a JSON-able dict; `set_state(state)` on a loader built with the same arguments continues with
    exactly the next batch (also with grain workers, given the same worker count).
    """

    def __init__(self, iterator, num_workers: int = 0, name: str = "loader"):
        self.name, self.num_workers = name, num_workers
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
    try:
        from absl import flags
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
    except ImportError:
        pass


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
    spec = _PackSpec(_Lookup(docs=docs), packing, T, max(1, buffer_size), bos, bos)
    it = _pipeline(DocIdChunks(len(docs), seed, shuffle, pi, pc), spec, b_local, num_workers)
    return Loader(it, num_workers, name="pretrain loader")


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
    lookup = _Lookup(conversations=conversations, tokenizer=tokenizer, max_tokens=T + 1)
    spec = _PackSpec(lookup, "sft_pack" if packing == "pack" else "sft_pad", T, buffer_size, None, pad_id)
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
    import jax
    from jax.sharding import NamedSharding, PartitionSpec as P
    out = {}
    for k, v in batch.items():
        if v.ndim == 3:
            s = NamedSharding(mesh, P(None, "data"))
        else:
            s = sharding if sharding is not None else NamedSharding(mesh, P("data"))
        out[k] = jax.make_array_from_process_local_data(s, v)
    return out
