"""Token shards: the file format the loaders read, and pretokenizing a corpus into it once.

Shard file (`.bin`, one file, little-endian):
    header, 128 bytes: magic b"NCJXTOK\\0", version u32, itemsize u32 (2 = uint16, 4 = uint32), n_tokens u64,
                       n_docs u64, vocab_size u64, tokenizer fingerprint (80 bytes ASCII, zero-padded)
    offsets: uint64[n_docs + 1]   document d is tokens[offsets[d]:offsets[d+1]]
    tokens:  uint16|uint32[n_tokens]
Documents are stored without <|bos|>; the packer prepends it.

`write_shard` / `read_header` write and check a file; `TokenShard` memory-maps one, `ShardDocs` gives random access
to the documents of several. `ensure_pretokenized(data_path, tokenizer)` turns any source `iter_documents` reads
(see `nanochat_jax.data.documents`) into train and validation shards once and caches them under
`<base dir>/pretok/`.
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
import json
import multiprocessing as mp
import os
import shutil
import struct
import sys
import sysconfig
from pathlib import Path
from typing import Sequence

import numpy as np
from tqdm import tqdm

from nanochat_jax.core.common import UserError, get_base_dir, print0
from nanochat_jax.data.documents import DEFAULT_VAL_FRACTION, SUFFIXES, split_documents
from nanochat_jax.data.download import list_shards

# ---------------------------------------------------------------------------------------------------------------
# Shard files

MAGIC = b"NCJXTOK\0"
VERSION = 1
HEADER_SIZE = 128
_HEAD = struct.Struct("<8sIIQQQ")  # magic, version, itemsize, n_tokens, n_docs, vocab_size (40 bytes)
_FP_BYTES = 80


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
# The pretokenize-on-first-use cache

PRETOK_FORMAT = "nanochat_jax.pretok/1"   # bump when the cache layout changes
SHARD_TOKENS = 50_000_000                 # tokens per shard file (100 MB as uint16)


def _source_digest(source) -> str:
    """sha256 over the bytes of the corpus's files (or the embedded corpus / the downloaded shards' names+sizes)."""
    h = hashlib.sha256()
    if str(source) == "embedded":   # deterministic per Python build: key on it, not on its text (seconds to build)
        h.update(f"embedded {sys.version} {sysconfig.get_paths().get('stdlib')}".encode())
        return h.hexdigest()
    if str(source) == "shards":
        for p in list_shards():
            h.update(f"{p.name} {p.stat().st_size}\n".encode())
        return h.hexdigest()
    path = Path(source).expanduser()
    if not path.exists():
        raise UserError(f"{path}: no such file or directory")
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in SUFFIXES
                   and not p.name.startswith(".")) if path.is_dir() else [path]
    for f in files:
        h.update(f"{f.relative_to(path) if path.is_dir() else f.name}\n".encode())
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def pretok_dir(data_path, tokenizer, val_fraction: float = DEFAULT_VAL_FRACTION) -> Path:
    """`<base dir>/pretok/<hash of the corpus + tokenizer fingerprint + split>/`."""
    key = hashlib.sha256(json.dumps([PRETOK_FORMAT, _source_digest(data_path), tokenizer.fingerprint(),
                                     val_fraction]).encode()).hexdigest()[:20]
    return get_base_dir() / "pretok" / key


def ensure_pretokenized(data_path, tokenizer, val_fraction: float = DEFAULT_VAL_FRACTION,
                        workers: int | None = None, shard_tokens: int = SHARD_TOKENS) -> tuple[list[Path], list[Path]]:
    """(train_shards, val_shards) of `data_path` tokenized by `tokenizer`: from the cache when made before, else
    tokenized now (streaming, in `workers` processes) into `pretok_dir(...)`.

    data_path: anything `iter_documents` reads (a .txt/.jsonl/.parquet file, a directory, "embedded", "shards").
    Several processes (hosts) may call this at once: each builds in a private temp dir and the first rename wins.
    """
    out = pretok_dir(data_path, tokenizer, val_fraction)
    meta = out / "meta.json"
    if not meta.is_file():
        print0(f"pretokenizing {data_path} into {out} (once; later runs reuse it)")
        tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            info = pretokenize(data_path, tmp, tokenizer, val_fraction, workers=workers, shard_tokens=shard_tokens)
            info["source"] = str(data_path)
            (tmp / "meta.json").write_text(json.dumps(info, indent=2) + "\n")
            os.rename(tmp, out)
        except OSError:
            if not meta.is_file():  # not "another process finished first" (then we keep theirs): a real failure
                raise
        finally:                    # a failed or losing build leaves nothing behind
            shutil.rmtree(tmp, ignore_errors=True)
    info = json.loads(meta.read_text())
    train = [out / name for name in info["train"]]
    val = [out / name for name in info["val"]]
    return train, val


def _init_worker(tokenizer):
    global _WORKER_TOKENIZER
    _WORKER_TOKENIZER = tokenizer


def _encode(tokenizer, texts: list[str], num_threads: int = 1) -> list:
    """Token arrays (uint16/uint32, not Python lists: 50M ids as ints would take ~2 GB)."""
    dtype = token_dtype(tokenizer.get_vocab_size())
    return [np.asarray(ids, dtype=dtype) for ids in tokenizer.encode(texts, num_threads=num_threads)]


def _encode_chunk(texts: list[str]) -> list:
    return _encode(_WORKER_TOKENIZER, texts)


def pretokenize(source, out_dir, tokenizer, val_fraction: float = DEFAULT_VAL_FRACTION, workers: int | None = None,
                shard_tokens: int = SHARD_TOKENS, chunk_docs: int = 256) -> dict:
    """Tokenize the documents of `source` (no bos: the packer adds it) into `out_dir/{train,val}_NNNNN.bin`.

    Documents are encoded in chunks by a pool of `workers` processes (default: all cores; 1 = in this process),
    in order, and written whenever a split has `shard_tokens` tokens waiting. Returns the summary that goes into
    meta.json: shard names, document and token counts per split, the tokenizer fingerprint.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    vocab, fp = tokenizer.get_vocab_size(), tokenizer.fingerprint()
    workers = workers or os.cpu_count() or 1
    pending = {"train": [], "val": []}
    n_pending = {"train": 0, "val": 0}
    info = {"format": PRETOK_FORMAT, "fingerprint": fp, "vocab_size": vocab, "val_fraction": val_fraction,
            "train": [], "val": [], "docs": {"train": 0, "val": 0}, "tokens": {"train": 0, "val": 0}}

    def flush(split):
        name = f"{split}_{len(info[split]):05d}.bin"
        write_shard(out_dir / name, pending[split], vocab, fp)
        info[split].append(name)
        pending[split], n_pending[split] = [], 0

    def chunks():
        buf = []
        for split, doc in split_documents(source, val_fraction):
            buf.append((split, doc))
            if len(buf) == chunk_docs:
                yield buf
                buf = []
        if buf:
            yield buf

    bar = tqdm(unit="doc", desc="pretokenize", disable=not sys.stderr.isatty())
    pool = None
    if workers > 1:
        pool = mp.get_context("spawn").Pool(workers, initializer=_init_worker, initargs=(tokenizer,))
    try:
        docs = chunks()
        while True:
            window = list(itertools.islice(docs, 4 * workers))   # bounded: never the whole corpus in memory
            if not window:
                break
            texts = [[d for _, d in c] for c in window]
            encoded = pool.map(_encode_chunk, texts, chunksize=1) if pool else \
                [_encode(tokenizer, t, num_threads=4) for t in texts]
            for chunk, ids in zip(window, encoded):
                for (split, _), toks in zip(chunk, ids):
                    pending[split].append(toks)
                    n_pending[split] += len(toks)
                    info["docs"][split] += 1
                    info["tokens"][split] += len(toks)
                    if n_pending[split] >= shard_tokens:
                        flush(split)
                bar.update(len(ids))
    finally:
        bar.close()
        if pool:
            pool.terminate()
    for split in ("train", "val"):
        if pending[split]:
            flush(split)
    print0(f"pretokenized {info['docs']['train']:,} train docs ({info['tokens']['train']:,} tokens), "
           f"{info['docs']['val']:,} val docs ({info['tokens']['val']:,} tokens) into {len(info['train'])}+"
           f"{len(info['val'])} shards")
    return info
