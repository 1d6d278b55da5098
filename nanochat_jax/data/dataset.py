"""Documents for the tokenizer and the pretraining data: one `iter_documents(source)` over every kind of source.

A source is one of
- a `.txt` file: one document per non-blank line;
- a directory: its `.txt` files (one document per file), `.jsonl` and `.parquet` files, in sorted path order;
- a `.jsonl` file: one JSON object per line, the document in its `"text"` field;
- a `.parquet` file: the `text` column, read one row group at a time so that big shards stream;
- the word `embedded`: `embedded_corpus()`, English text that ships with Python itself (no download);
- the word `shards`: the downloaded pretraining shards.

Every reader streams and yields documents in a deterministic order. A bad input (missing file, bytes that are not
UTF-8, an unknown file type, a record without text, an empty corpus) raises `UserError` with one clear line.

Also here: downloading the pretraining shards (`download_file`, `download_shards`, `list_shards`, `split_shards`),
the held-out validation split of custom corpora, and `ensure_pretokenized(data_path, tokenizer)`, which turns any
source into token shards (see `nanochat_jax.data.dataloader`) once and caches them under `<base dir>/pretok/`.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import http.client
import itertools
import json
import os
import shutil
import sys
import sysconfig
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from nanochat_jax.core.common import UserError, get_base_dir, print0

SUFFIXES = (".txt", ".jsonl", ".parquet")


# ---------------------------------------------------------------------------------------------------------------
# One entry point

def iter_documents(source: str | os.PathLike) -> Iterator[str]:
    """Yield the documents (str) of `source`: a path, "embedded" or "shards" (see the module docstring).

    Raises UserError at the end of iteration if the source held no document at all.
    """
    count = 0
    for doc in _iter_source(source):
        count += 1
        yield doc
    if count == 0:
        raise UserError(f"{source}: empty corpus (no documents found)")


def _iter_source(source) -> Iterator[str]:
    if str(source) == "embedded":
        yield from embedded_corpus()
        return
    if str(source) == "shards":
        yield from _iter_shards()
        return
    path = Path(source).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.rglob("*")
                       if p.is_file() and p.suffix in SUFFIXES and not p.name.startswith("."))
        if not files:
            raise UserError(f"{path}: directory holds no .txt, .jsonl or .parquet files")
        for f in files:
            if f.suffix == ".txt":
                doc = _decode_whole(f)
                if doc.strip():
                    yield doc
            else:
                yield from _iter_file(f)
        return
    if not path.exists():
        raise UserError(f"{path}: no such file or directory")
    yield from _iter_file(path)


def _iter_file(path: Path) -> Iterator[str]:
    if path.suffix == ".txt":
        yield from _iter_txt_lines(path)
    elif path.suffix == ".jsonl":
        yield from _iter_jsonl(path)
    elif path.suffix == ".parquet":
        yield from _iter_parquet(path)
    else:
        raise UserError(f"{path}: unknown file type {path.suffix or '(no suffix)'!r}; "
                        "expected .txt, .jsonl, .parquet, a directory, 'embedded' or 'shards'")


def _iter_shards() -> Iterator[str]:
    """The training documents of the downloaded pretraining shards (the validation shard excluded)."""
    train, _ = split_shards(list_shards())
    for path in train:
        yield from _iter_parquet(path)


# ---------------------------------------------------------------------------------------------------------------
# Readers

def _decode_line(raw: bytes, path: Path, lineno: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text (line {lineno}, byte {e.start} of that line: "
                        f"{raw[e.start:e.start + 1]!r})") from None


def _decode_whole(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        lineno = raw.count(b"\n", 0, e.start) + 1
        raise UserError(f"{path}: not UTF-8 text (line {lineno}, byte offset {e.start}: "
                        f"{raw[e.start:e.start + 1]!r})") from None


def _iter_txt_lines(path: Path) -> Iterator[str]:
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            line = _decode_line(raw, path, lineno).rstrip("\r\n")
            if line.strip():
                yield line


def _iter_jsonl(path: Path) -> Iterator[str]:
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            line = _decode_line(raw, path, lineno)
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}: line {lineno} is not valid JSON ({e.msg})") from None
            if not isinstance(record, dict) or "text" not in record:
                raise UserError(f"{path}: line {lineno} has no \"text\" field")
            if not isinstance(record["text"], str):
                raise UserError(f"{path}: line {lineno}: \"text\" is not a string")
            if record["text"]:
                yield record["text"]


def _iter_parquet(path: Path) -> Iterator[str]:
    import pyarrow.parquet as pq  # lazy: GPU nodes may run without pyarrow
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid / OSError for files that are not parquet
        raise UserError(f"{path}: not a readable parquet file ({str(e).splitlines()[0]})") from None
    if "text" not in pf.schema_arrow.names:
        raise UserError(f"{path}: parquet file has no 'text' column (columns: {', '.join(pf.schema_arrow.names)})")
    for rg in range(pf.num_row_groups):
        for text in pf.read_row_group(rg, columns=["text"]).column("text").to_pylist():
            if text:
                yield text


# ---------------------------------------------------------------------------------------------------------------
# The embedded corpus: English that ships with every Python

# Standard-library folders that are tests, demos, vendored packages or installers, not documentation.
_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idletest", "idlelib", "lib2to3", "turtledemo",
              "__pycache__", "ensurepip", "venv", "__phello__"}
_MIN_DOCSTRING = 40  # characters; shorter docstrings ("Return self.") are noise, not prose


@functools.cache
def _embedded() -> tuple[str, ...]:
    docs: list[str] = []
    seen: set[str] = set()

    def add(text: str):
        text = text.strip()
        if len(text) >= _MIN_DOCSTRING and text not in seen:
            seen.add(text)
            docs.append(text)

    # 1) The language and library reference topics behind `help()` (~0.46M chars).
    from pydoc_data.topics import topics
    for key in sorted(topics):
        add(topics[key])

    # 2) Docstrings of the standard library, read with `ast` from the source files: nothing is imported or run.
    stdlib = Path(sysconfig.get_paths().get("stdlib") or Path(os.__file__).parent)
    for root, dirs, files in os.walk(stdlib):
        dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS and not d.startswith(("config-", "test")))
        for name in sorted(files):
            if not name.endswith(".py"):
                continue
            try:
                tree = ast.parse(Path(root, name).read_bytes())
            except (SyntaxError, ValueError, OSError):
                continue  # a file this Python cannot parse (or read) is skipped, never fatal
            for node in ast.walk(tree):
                if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                    doc = ast.get_docstring(node, clean=True)
                    if doc:
                        add(doc)
    return tuple(docs)


def embedded_corpus() -> list[str]:
    """Real English documents available on any machine with Python, without a download.

    The reference topics of `pydoc_data.topics` (what `help("if")` shows), then every module, class and function
    docstring of the standard library's own source (tests, demos and site-packages excluded), read with `ast`
    so nothing is imported. Docstrings under 40 characters and duplicates are dropped. About 2M characters in
    ~6,000 documents on CPython 3.11; the order is deterministic for a given Python version. Built once per process
    (a few seconds), then cached.
    """
    return list(_embedded())


def describe_embedded() -> str:
    """One line with the embedded corpus's size, for scripts to print."""
    docs = _embedded()
    import sys
    return (f"embedded corpus: {len(docs):,} documents, {sum(map(len, docs)):,} characters "
            f"(pydoc topics + standard-library docstrings of Python {sys.version.split()[0]})")


# ---------------------------------------------------------------------------------------------------------------
# Downloads: one robust file fetcher (stdlib only), reused by the shards, the CORE bundle and the task data

class DownloadError(UserError):
    """A download that cannot succeed (404, or still failing after every retry)."""


_RETRY_HTTP = {408, 425, 429, 500, 502, 503, 504}  # worth another try; any other 4xx is final


def download_file(url: str, dest: str | os.PathLike, retries: int = 5, backoff: float = 2.0, timeout: float = 60.0,
                  sha256: str | None = None, size: int | None = None, check: Callable[[Path], None] | None = None,
                  progress: Callable[[int], None] | None = None, chunk: int = 1 << 20) -> Path:
    """Fetch `url` to `dest`, atomically: bytes go to `dest.part`, renamed to `dest` only when whole and checked.

    - `dest` already there and passing the checks: nothing is fetched. There but failing them: fetched again.
    - A partial `dest.part` from an interrupted run is resumed with an HTTP Range request (a server that ignores
      Range simply sends the whole file again).
    - 5xx, 408/429, timeouts and connection errors are retried `retries` times, sleeping backoff * 2**attempt s.
    - 404 and other 4xx: `DownloadError` (a UserError) at once, and no partial file is left behind.
    - Checks: the byte count against Content-Length, then `size`, `sha256` and `check(path)` (raises on a bad file,
      e.g. a parquet footer that does not read). A file failing them is deleted and fetched again.
    `progress(n)` is called with each chunk's byte count (e.g. a tqdm's `update`). Returns `dest`.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.exists():
        if _verify(dest, sha256, size, check) is None:
            return dest
        dest.unlink()
    tmp = dest.with_name(dest.name + ".part")
    last = "no attempt made"
    for attempt in range(retries + 1):
        if attempt:
            time.sleep(backoff * 2 ** (attempt - 1))
        start = tmp.stat().st_size if tmp.exists() else 0
        req = urllib.request.Request(url, headers={"User-Agent": "nanochat-jax"})
        if start:
            req.add_header("Range", f"bytes={start}-")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                if start and resp.status != 206:   # Range ignored: start over
                    start = 0
                length = resp.headers.get("Content-Length")
                expected = start + int(length) if length is not None else None
                with open(tmp, "ab" if start else "wb") as f:
                    while True:
                        block = resp.read(chunk)
                        if not block:
                            break
                        f.write(block)
                        if progress:
                            progress(len(block))
            got = tmp.stat().st_size
            if expected is not None and got < expected:
                last = f"connection closed after {got} of {expected} bytes"
                continue                               # resume from here
        except urllib.error.HTTPError as e:
            if e.code == 416 and start:               # our partial file is already whole (or longer)
                pass
            elif e.code in _RETRY_HTTP or e.code >= 500:
                last = f"HTTP {e.code} {e.reason}"
                continue
            else:
                tmp.unlink(missing_ok=True)
                raise DownloadError(f"{url}: HTTP {e.code} {e.reason}") from None
        except (urllib.error.URLError, OSError, TimeoutError, http.client.HTTPException) as e:  # IncompleteRead
            last = f"{type(e).__name__}: {getattr(e, 'reason', e)}"
            continue
        problem = _verify(tmp, sha256, size, check)
        if problem is not None:
            tmp.unlink(missing_ok=True)
            last = f"downloaded file is corrupt ({problem})"
            continue
        os.replace(tmp, dest)
        return dest
    raise DownloadError(f"{url}: download failed after {retries + 1} attempts ({last})")


def _verify(path: Path, sha256: str | None, size: int | None, check) -> str | None:
    """None if `path` passes the checks, else what is wrong (one short phrase)."""
    if size is not None and path.stat().st_size != size:
        return f"{path.stat().st_size} bytes, expected {size}"
    if sha256 is not None:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        if h.hexdigest() != sha256.lower():
            return "sha256 mismatch"
    if check is not None:
        try:
            check(path)
        except Exception as e:  # a check says what is wrong by raising anything
            return str(e).splitlines()[0] if str(e) else type(e).__name__
    return None


def check_parquet(path: Path):
    """Raise unless `path` is a parquet file whose footer reads and which has a `text` column."""
    import pyarrow.parquet as pq
    pf = pq.ParquetFile(path)
    if "text" not in pf.schema_arrow.names:
        raise ValueError("no 'text' column")


# ---------------------------------------------------------------------------------------------------------------
# The pretraining shard sets (nanochat's Hugging Face datasets)

HF_DATASETS = "https://huggingface.co/datasets"
# name -> (HF repo, number of shards). The last shard of each set is its validation split.
DATASETS = {
    "fineweb-edu-100b": ("karpathy/fineweb-edu-100b-shuffle", 1823),   # the 2025 speedrun
    "climbmix-400b": ("karpathy/climbmix-400b-shuffle", 6543),         # the 2026 recipe
}
DEFAULT_DATASET = "climbmix-400b"


def default_dataset() -> str:
    """`$NANOCHAT_DATASET`, else climbmix-400b (the 2026 recipe's data)."""
    return _check_dataset(os.environ.get("NANOCHAT_DATASET") or DEFAULT_DATASET)


def _check_dataset(name: str) -> str:
    if name not in DATASETS:
        raise UserError(f"unknown dataset {name!r}: choose one of {', '.join(DATASETS)}")
    return name


def shard_url(index: int, dataset: str | None = None, base_url: str | None = None) -> str:
    """URL of shard `index`: `<base>/shard_{index:05d}.parquet`, the base from the argument, `$NANOCHAT_DATA_URL`
    (a mirror or a local server holding the shard files), or the dataset's HF address."""
    dataset = _check_dataset(dataset or default_dataset())
    base = base_url or os.environ.get("NANOCHAT_DATA_URL") or f"{HF_DATASETS}/{DATASETS[dataset][0]}/resolve/main"
    return f"{base.rstrip('/')}/shard_{index:05d}.parquet"


def data_dir(dataset: str | None = None) -> Path:
    """Where the shards of `dataset` live: `<base dir>/base_data/<dataset>/`."""
    return get_base_dir() / "base_data" / _check_dataset(dataset or default_dataset())


def shard_indices(n: int, dataset: str | None = None) -> list[int]:
    """The shard indices that `download_data -n n` fetches: the first n - 1 for training plus the set's last shard
    (validation), so the validation split never moves when more shards are fetched. n = -1: all of them."""
    total = DATASETS[_check_dataset(dataset or default_dataset())][1]
    if n == -1 or n >= total:
        return list(range(total))
    if n < 2:
        raise UserError(f"-n must be >= 2 (train shards + the validation shard), or -1 for all; got {n}")
    return list(range(n - 1)) + [total - 1]


def download_shards(n: int, dataset: str | None = None, workers: int = 4, base_url: str | None = None,
                    retries: int = 5, backoff: float = 2.0, timeout: float = 60.0) -> list[Path]:
    """Fetch the shards of `shard_indices(n, dataset)` in parallel (threads), skipping those already there and
    whole; shows a progress bar. Returns their paths. A 404 or exhausted retries: DownloadError after the rest."""
    from concurrent.futures import ThreadPoolExecutor
    from tqdm import tqdm
    dataset = _check_dataset(dataset or default_dataset())
    out = data_dir(dataset)
    indices = shard_indices(n, dataset)
    have = {p.name: p for p in list_shards(dataset)}   # incl. nanochat's layout: never fetched twice
    todo = [i for i in indices if f"shard_{i:05d}.parquet" not in have]
    print0(f"{dataset}: {len(indices)} shards wanted, {len(indices) - len(todo)} already downloaded, "
           f"fetching {len(todo)} with {workers} workers")
    bar = tqdm(total=len(indices), initial=len(indices) - len(todo), unit="shard",
               disable=not sys.stderr.isatty())

    def one(i):
        if f"shard_{i:05d}.parquet" in have:
            return have[f"shard_{i:05d}.parquet"]
        path = download_file(shard_url(i, dataset, base_url), out / f"shard_{i:05d}.parquet", retries=retries,
                             backoff=backoff, timeout=timeout, check=check_parquet)
        bar.update(1)
        return path

    errors = []
    with ThreadPoolExecutor(max(1, workers)) as pool:
        futures = [pool.submit(one, i) for i in indices]
        paths = []
        for f in futures:
            try:
                paths.append(f.result())
            except UserError as e:
                errors.append(str(e))
    bar.close()
    if errors:
        raise DownloadError(f"{len(errors)} of {len(indices)} shards failed; first: {errors[0]}")
    return paths


# where PyTorch nanochat keeps each set's shards under the same base dir (2026: base_data_climbmix/; 2025: the shards
# directly in base_data/), so that NANOCHAT_BASE_DIR may point at a nanochat directory
NANOCHAT_DATA_DIRS = {"climbmix-400b": "base_data_climbmix", "fineweb-edu-100b": "base_data"}


def list_shards(dataset: str | None = None) -> list[Path]:
    """The downloaded (whole) shards of `dataset`, sorted by index: ours (`data_dir`), and those of nanochat's own
    layout under the same base dir (ours win where both hold an index)."""
    dataset = _check_dataset(dataset or default_dataset())
    found = {p.name: p for p in (get_base_dir() / NANOCHAT_DATA_DIRS[dataset]).glob("shard_*.parquet")}
    found.update({p.name: p for p in data_dir(dataset).glob("shard_*.parquet")})
    return [found[name] for name in sorted(found)]


def split_shards(paths: list[Path]) -> tuple[list[Path], list[Path]]:
    """(train, val): the last shard (highest index) is validation, the rest train. Needs at least two shards."""
    if len(paths) < 2:
        raise UserError(f"{len(paths)} pretraining shard(s) downloaded, need at least 2 (train + validation): "
                        "run `python -m scripts.download_data -n 8`")
    return paths[:-1], paths[-1:]


# ---------------------------------------------------------------------------------------------------------------
# Validation split of custom corpora and the pretokenize-on-first-use cache

PRETOK_FORMAT = "nanochat_jax.pretok/1"   # bump when the cache layout changes
DEFAULT_VAL_FRACTION = 0.01
SHARD_TOKENS = 50_000_000                 # tokens per shard file (100 MB as uint16)


def is_validation(index: int, fraction: float) -> bool:
    """Whether document `index` of a corpus is held out: a fixed hash of the index, so every run agrees."""
    h = int.from_bytes(hashlib.blake2b(index.to_bytes(8, "little"), digest_size=8).digest(), "little")
    return h < fraction * 2 ** 64


def split_documents(source, val_fraction: float = DEFAULT_VAL_FRACTION) -> Iterator[tuple[str, str]]:
    """(split, doc) over `source`: "val" for the held-out documents, "train" otherwise. When the hash holds out
    none, the last document is held out (so a small corpus still has a validation split).

    The downloaded shards ("shards") keep their own split: the last shard is validation.
    """
    if str(source) == "shards":
        train, val = split_shards(list_shards())
        for p in train:
            for doc in _iter_parquet(p):
                yield "train", doc
        for p in val:
            for doc in _iter_parquet(p):
                yield "val", doc
        return
    if not 0 <= val_fraction < 1:
        raise UserError(f"validation fraction must be in [0, 1), got {val_fraction}")
    n_val, n_train, pending = 0, 0, None
    for i, doc in enumerate(iter_documents(source)):
        if val_fraction > 0 and is_validation(i, val_fraction):
            if pending is not None:        # keep the corpus order
                n_train += 1
                yield "train", pending
                pending = None
            n_val += 1
            yield "val", doc
            continue
        if pending is not None:
            n_train += 1
            yield "train", pending
        pending = doc
    if pending is not None:
        if n_val == 0 and val_fraction > 0 and n_train > 0:
            yield "val", pending
        else:
            n_train += 1
            yield "train", pending
    if n_train == 0:
        raise UserError(f"{source}: corpus too small, no training documents left after the validation split")


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
    from nanochat_jax.data.dataloader import token_dtype
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
    from tqdm import tqdm
    from nanochat_jax.data.dataloader import write_shard
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
        import multiprocessing as mp
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
