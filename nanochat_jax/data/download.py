"""Downloads: files of Hugging Face Hub repos, one robust URL fetcher, and the pretraining shard sets.

`hub_download` fetches one file of a Hub repo through huggingface_hub's `hf_hub_download`, so HF_TOKEN, HF_ENDPOINT,
HF_HUB_OFFLINE and the shared cache work as everywhere else (the library also retries and resumes); around it we add
what the library lacks: a content check (a file failing it is fetched again) and one-line errors. `download_file`
(stdlib only) fetches a plain URL atomically, resuming and retrying: the CORE eval bundle and shard mirrors that are
not a Hub go through it.

The shard sets are nanochat's Hugging Face datasets (`DATASETS`): `data_dir` (where they live), `shard_indices`
(which ones `download_data -n` fetches), `download_shards` (in parallel, from the Hub, or from a mirror with
`shard_url`), `list_shards` (those on disk, ours or nanochat's own layout) and `split_shards` (the last shard is
validation).
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

from huggingface_hub import hf_hub_download
from huggingface_hub.errors import FileMetadataError, HfHubHTTPError, LocalEntryNotFoundError
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


# ---------------------------------------------------------------------------------------------------------------
# Files of Hugging Face Hub repos

def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def hub_offline() -> bool:
    """HF_HUB_OFFLINE (or NANOCHAT_OFFLINE=1, the CPU miniature's switch): cached files only, no network."""
    return _env_true("HF_HUB_OFFLINE") or os.environ.get("NANOCHAT_OFFLINE") == "1"


def _hub_failure(e: BaseException) -> str:
    """What went wrong, in a few words, for an exception out of hf_hub_download. The library wraps the HTTP or
    connection error as a cause, so the causes are searched; its transport library's exceptions (httpx, httpx2 in
    huggingface_hub 2, httpcore) are recognised by module, as that library changes between versions."""
    chain, x = [], e
    while x is not None and len(chain) < 10:
        chain.append(x)
        x = x.__cause__ or x.__context__
    for x in chain:
        if isinstance(x, HfHubHTTPError) and x.response is not None:
            code = x.response.status_code
            return f"HTTP {code}" + (" (a gated or private repo: set HF_TOKEN)" if code in (401, 403) else "")
        if isinstance(x, FileMetadataError):  # answered, but not as a Hub does: HF_ENDPOINT points elsewhere
            return f"{x}".split(". ")[0]
        if isinstance(x, ConnectionError) or type(x).__module__.split(".")[0] in _TRANSPORT:
            return f"cannot reach the Hub ({type(x).__name__}: {x})"
    return str(e).splitlines()[0] if str(e) else type(e).__name__


_TRANSPORT = ("httpx", "httpx2", "httpcore")


class _NoBar(tqdm):
    """huggingface_hub's per-file progress bar, silenced (download_shards shows one bar over all shards)."""

    def __init__(self, *args, **kwargs):
        kwargs["disable"] = True
        super().__init__(*args, **kwargs)


def hub_download(repo: str, filename: str, repo_type: str = "dataset", local_dir=None,
                 check: Callable[[Path], None] | None = None, attempts: int = 3, timeout: float = 10.0,
                 progress: bool = True) -> Path:
    """Local path of `filename` in the Hub repo `repo`, downloaded by huggingface_hub's `hf_hub_download`.

    Without `local_dir` the file lives in the shared Hugging Face cache (HF_HUB_CACHE / HF_HOME); with it, at
    `local_dir/filename`. HF_TOKEN, HF_ENDPOINT, HF_HUB_CACHE and HF_HUB_OFFLINE (or NANOCHAT_OFFLINE=1) apply;
    the last three are read at each call, as huggingface_hub itself reads them only once, at import. The library
    retries a Hub that cannot be reached or answers 5xx/408/429 (with backoff), resumes a dropped transfer and
    answers from the cache when the Hub is down; what it does not do is done here: a file failing `check(path)`
    (raise to say it is bad; the library checks only the size) is deleted and fetched again, up to `attempts`
    downloads, and every failure is one DownloadError line.
    """
    offline = hub_offline()
    kwargs = dict(repo_type=repo_type, local_dir=local_dir, cache_dir=os.environ.get("HF_HUB_CACHE") or None,
                  endpoint=os.environ.get("HF_ENDPOINT") or None, local_files_only=offline, etag_timeout=timeout,
                  tqdm_class=None if progress else _NoBar)
    where = f"{repo}/{filename}"
    for _ in range(attempts):
        try:
            path = Path(hf_hub_download(repo, filename, **kwargs))
        except Exception as e:  # the library's errors (OSErrors, its transport's) become one line; others pass
            if not isinstance(e, OSError) and type(e).__module__.split(".")[0] not in _TRANSPORT:
                raise
            if offline and isinstance(e, LocalEntryNotFoundError):
                raise DownloadError(f"{where}: not in the cache, and offline (HF_HUB_OFFLINE or NANOCHAT_OFFLINE)"
                                    ) from None
            raise DownloadError(f"{where}: {_hub_failure(e)}") from None
        problem = _verify(path, None, None, check)
        if problem is None:
            return path
        if offline:
            raise DownloadError(f"{where}: the cached file is corrupt ({problem}), and offline")
        for p in {path.resolve(), path}:  # in the cache: the blob and the snapshot's link to it
            p.unlink(missing_ok=True)
    raise DownloadError(f"{where}: still corrupt after {attempts} downloads ({problem})")


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
    (a mirror or a local server holding the shard files), or the dataset's address on the Hub (which
    `download_shards` reaches through huggingface_hub instead)."""
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
    whole; shows a progress bar. Returns their paths. A 404 or exhausted retries: DownloadError after the rest.

    From the dataset's Hub repo through `hub_download` (into `data_dir`, not the shared cache: the shards are big
    and read from there), or, with `base_url` or $NANOCHAT_DATA_URL, from that plain mirror through `download_file`
    (`retries` and `backoff` are its; huggingface_hub has its own).
    """
    dataset = _check_dataset(dataset or default_dataset())
    mirror = base_url or os.environ.get("NANOCHAT_DATA_URL")
    out = data_dir(dataset)
    indices = shard_indices(n, dataset)
    have = {p.name: p for p in list_shards(dataset)}   # incl. nanochat's layout: never fetched twice
    todo = [i for i in indices if f"shard_{i:05d}.parquet" not in have]
    print0(f"{dataset}: {len(indices)} shards wanted, {len(indices) - len(todo)} already downloaded, "
           f"fetching {len(todo)} with {workers} workers")
    bar = tqdm(total=len(indices), initial=len(indices) - len(todo), unit="shard",
               disable=not sys.stderr.isatty())

    def one(i):
        name = f"shard_{i:05d}.parquet"
        if name in have:
            return have[name]
        if mirror:
            path = download_file(shard_url(i, dataset, mirror), out / name, retries=retries, backoff=backoff,
                                 timeout=timeout, check=check_parquet)
        else:
            path = hub_download(DATASETS[dataset][0], name, local_dir=out, check=check_parquet, timeout=timeout,
                                progress=False)
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
