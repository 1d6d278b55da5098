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

Also here: the held-out validation split of custom corpora (`split_documents`). Downloading the shards lives in
`nanochat_jax.data.download`; turning a source into token shards in `nanochat_jax.data.shards`.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import json
import os
import sys
import sysconfig
from pathlib import Path
from typing import Iterator

from nanochat_jax.core.common import UserError
from nanochat_jax.data.download import list_shards, split_shards

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
    import pyarrow.parquet as pq  # imported here: pyarrow is slow to import and only parquet sources need it
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
    from pydoc_data.topics import topics  # imported here: a large module, needed only to build this corpus
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
    return (f"embedded corpus: {len(docs):,} documents, {sum(map(len, docs)):,} characters "
            f"(pydoc topics + standard-library docstrings of Python {sys.version.split()[0]})")


# ---------------------------------------------------------------------------------------------------------------
# Validation split of custom corpora

DEFAULT_VAL_FRACTION = 0.01


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
