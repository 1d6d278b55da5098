"""Downloads: one robust file fetcher, and the pretraining shard sets it fetches.

`download_file` (stdlib only) fetches one URL atomically, resuming a partial file and retrying what is worth
retrying; the pretraining shards, the CORE eval bundle and the task data all go through it.

The shard sets are nanochat's Hugging Face datasets (`DATASETS`): `shard_url`, `data_dir` (where they live),
`shard_indices` (which ones `download_data -n` fetches), `download_shards` (in parallel), `list_shards` (those on
disk, ours or nanochat's own layout) and `split_shards` (the last shard is validation).
"""

from __future__ import annotations

import hashlib
import http.client
import os
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

from tqdm import tqdm

from nanochat_jax.core.common import UserError, get_base_dir, print0


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
    import pyarrow.parquet as pq  # imported here: pyarrow is slow to import and only shard downloads need it
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
