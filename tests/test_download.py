"""Facts about the downloads in nanochat_jax/data/download.py and scripts/download_data.py, against a fake Hugging Face
Hub on 127.0.0.1 (tests/hubfake.py: HF_ENDPOINT points at it) that serves generated parquet shards, at the Hub's
addresses and as a plain mirror, and can misbehave on request."""

import io

import pytest

from hubfake import FakeHub
from nanochat_jax.data import documents, download, shards
from nanochat_jax.core.common import UserError


def parquet_bytes(index: int, n_docs: int = 50) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq
    try:
        pa.array(["probe"])   # see tests/test_dataset_readers.py: a first probe may raise on this venv's pandas
    except ValueError:
        pass
    buf = io.BytesIO()
    docs = [f"shard {index} document {i}: " + "lorem ipsum " * (i % 7 + 1) for i in range(n_docs)]
    pq.write_table(pa.table({"text": docs}), buf, row_group_size=16)
    return buf.getvalue()


def _generated(path: str):
    """Shard bodies made up on request: shard_NNNNN.parquet for any N."""
    if path.startswith("shard_") and path.endswith(".parquet"):
        return parquet_bytes(int(path[6:11]))
    return None


@pytest.fixture()
def server():
    """The fake Hub, also serving the shards at their bare paths (a plain mirror); HF_ENDPOINT is not set here."""
    s = FakeHub(generate=_generated)
    yield s
    s.close()


@pytest.fixture()
def hub(server, monkeypatch, base_dir):
    """The fake Hub as HF_ENDPOINT, no mirror: shards come through huggingface_hub."""
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.delenv("NANOCHAT_DATA_URL", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("NANOCHAT_OFFLINE", raising=False)
    return server


def fetch(server, name, dest, **kw):
    kw.setdefault("backoff", 0.01)
    kw.setdefault("timeout", 10)
    return download.download_file(f"{server.url}/{name}", dest, **kw)


def test_happy_path_shards_land_whole_and_are_skipped_next_time(server, base_dir, monkeypatch):
    monkeypatch.setenv("NANOCHAT_DATA_URL", server.url)
    paths = download.download_shards(3, "fineweb-edu-100b", workers=2)
    assert [p.name for p in paths] == ["shard_00000.parquet", "shard_00001.parquet", "shard_01822.parquet"]
    for p in paths:
        assert p.read_bytes() == parquet_bytes(int(p.name[6:11]))
    assert not list(paths[0].parent.glob("*.part"))
    assert download.list_shards("fineweb-edu-100b") == paths
    train, val = download.split_shards(paths)
    assert val == [paths[-1]] and train == paths[:2]
    n = len(server.requests)
    download.download_shards(3, "fineweb-edu-100b", workers=2)
    assert len(server.requests) == n          # nothing fetched again


def test_shard_urls_default_to_hf_and_follow_the_env(monkeypatch):
    monkeypatch.delenv("NANOCHAT_DATA_URL", raising=False)
    assert download.shard_url(7, "climbmix-400b") == \
        "https://huggingface.co/datasets/karpathy/climbmix-400b-shuffle/resolve/main/shard_00007.parquet"
    assert download.shard_url(1822, "fineweb-edu-100b").endswith(
        "fineweb-edu-100b-shuffle/resolve/main/shard_01822.parquet")
    monkeypatch.setenv("NANOCHAT_DATA_URL", "http://mirror/x/")
    assert download.shard_url(3, "climbmix-400b") == "http://mirror/x/shard_00003.parquet"
    assert download.shard_indices(-1, "climbmix-400b") == list(range(6543))
    assert download.shard_indices(2, "climbmix-400b") == [0, 6542]
    with pytest.raises(UserError, match="unknown dataset"):
        download.shard_url(0, "nope")


def test_cut_off_download_resumes_with_a_range_request(server, tmp_path):
    server.plans["shard_00004.parquet"] = ["cut"]
    dest = fetch(server, "shard_00004.parquet", tmp_path / "s.parquet", check=download.check_parquet)
    assert dest.read_bytes() == parquet_bytes(4)
    ranges = [r for _, _, r, _ in server.requests]
    assert ranges[0] is None and ranges[1] is not None and ranges[1].startswith("bytes=")
    assert int(ranges[1][6:-1]) > 0                   # resumed from the bytes already there
    assert not (tmp_path / "s.parquet.part").exists()


def test_partial_file_from_an_earlier_run_is_resumed(server, tmp_path):
    body = parquet_bytes(5)
    (tmp_path / "s.parquet.part").write_bytes(body[:1000])
    fetch(server, "shard_00005.parquet", tmp_path / "s.parquet", check=download.check_parquet)
    assert (tmp_path / "s.parquet").read_bytes() == body
    assert server.requests == [("GET", "/shard_00005.parquet", "bytes=1000-", None)]


def test_server_errors_are_retried_with_backoff(server, tmp_path):
    server.plans["shard_00002.parquet"] = ["500", "500"]
    dest = fetch(server, "shard_00002.parquet", tmp_path / "s.parquet", check=download.check_parquet)
    assert dest.read_bytes() == parquet_bytes(2)
    assert len(server.requests) == 3


def test_a_server_that_keeps_failing_gives_a_clear_error(server, tmp_path):
    server.plans["shard_00002.parquet"] = ["500"] * 10
    with pytest.raises(UserError, match=r"failed after 3 attempts \(HTTP 500"):
        fetch(server, "shard_00002.parquet", tmp_path / "s.parquet", retries=2)
    assert not (tmp_path / "s.parquet").exists()


def test_404_is_a_clear_error_and_leaves_no_partial_file(server, tmp_path):
    (tmp_path / "missing.parquet.part").write_bytes(b"stale")
    with pytest.raises(UserError, match="HTTP 404"):
        fetch(server, "missing.parquet", tmp_path / "missing.parquet")
    assert list(tmp_path.iterdir()) == []
    assert len(server.requests) == 1                  # not retried


def test_corrupt_file_is_detected_and_fetched_again(server, tmp_path):
    server.plans["shard_00003.parquet"] = ["corrupt"]
    dest = fetch(server, "shard_00003.parquet", tmp_path / "s.parquet", check=download.check_parquet)
    assert dest.read_bytes() == parquet_bytes(3)
    assert len(server.requests) == 2


def test_corrupt_file_already_on_disk_is_replaced(server, tmp_path):
    dest = tmp_path / "s.parquet"
    dest.write_bytes(b"not parquet at all")
    fetch(server, "shard_00001.parquet", dest, check=download.check_parquet)
    assert dest.read_bytes() == parquet_bytes(1)


def test_sha256_and_size_checks(server, tmp_path):
    import hashlib
    server.files["blob"] = b"x" * 5000
    good = hashlib.sha256(b"x" * 5000).hexdigest()
    fetch(server, "blob", tmp_path / "a", sha256=good, size=5000)
    assert (tmp_path / "a").read_bytes() == b"x" * 5000
    with pytest.raises(UserError, match="sha256 mismatch"):
        fetch(server, "blob", tmp_path / "b", sha256="0" * 64, retries=1)
    assert not (tmp_path / "b").exists() and not (tmp_path / "b.part").exists()


def test_download_data_script(server, base_dir, capsys):
    from nanochat_jax.cli.download_data import main
    main(["-n", "2", "-w", "2", "--dataset", "climbmix-400b", "--base-url", server.url])
    names = sorted(p.name for p in (base_dir / "base_data" / "climbmix-400b").iterdir())
    assert names == ["shard_00000.parquet", "shard_06542.parquet"]
    assert "validation: shard_06542.parquet" in capsys.readouterr().out
    server.plans["shard_00001.parquet"] = ["404"]
    with pytest.raises(UserError, match="1 of 3 shards failed.*HTTP 404"):
        main(["-n", "3", "--dataset", "climbmix-400b", "--base-url", server.url])


def test_downloaded_shards_feed_iter_documents_and_the_pretokenizer(server, base_dir, monkeypatch):
    from nanochat_jax.data.tokenizer import Tokenizer
    monkeypatch.setenv("NANOCHAT_DATA_URL", server.url)
    monkeypatch.setenv("NANOCHAT_DATASET", "fineweb-edu-100b")
    with pytest.raises(UserError, match="download_data"):
        list(documents.iter_documents("shards"))
    download.download_shards(3)
    docs = list(documents.iter_documents("shards"))            # the training shards only
    assert len(docs) == 100 and docs[0].startswith("shard 0 document 0") and docs[-1].startswith("shard 1 ")
    tok = Tokenizer({bytes([i]): i for i in range(256)})
    train, val = shards.ensure_pretokenized("shards", tok, workers=1)
    val_docs = shards.ShardDocs(val)
    assert len(shards.ShardDocs(train)) == 100 and len(val_docs) == 50   # the last shard is the validation split
    assert bytes(val_docs[0].astype("uint8")).decode().startswith("shard 1822 document 0")


@pytest.mark.parametrize("name, subdir", [("climbmix-400b", "base_data_climbmix"), ("fineweb-edu-100b", "base_data")])
def test_shards_in_nanochats_own_layout_are_found_and_not_fetched_again(server, base_dir, monkeypatch, name, subdir):
    """NANOCHAT_BASE_DIR pointing at a PyTorch nanochat directory: its shards (2026: base_data_climbmix/, 2025:
    directly in base_data/) are used as they are."""
    monkeypatch.setenv("NANOCHAT_DATA_URL", server.url)
    last = download.DATASETS[name][1] - 1
    theirs = base_dir / subdir
    theirs.mkdir(parents=True)
    for i in (0, last):
        (theirs / f"shard_{i:05d}.parquet").write_bytes(parquet_bytes(i))
    assert [p.name for p in download.list_shards(name)] == ["shard_00000.parquet", f"shard_{last:05d}.parquet"]
    paths = download.download_shards(3, name, workers=2)
    assert [p.parent for p in paths] == [theirs, download.data_dir(name), theirs]
    assert server.paths_requested() == ["/shard_00001.parquet"]   # only the missing one fetched
    monkeypatch.setenv("NANOCHAT_DATASET", name)
    assert list(documents.iter_documents("shards"))[0].startswith("shard 0 document 0")


# ---------------------------------------------------------------------------------------------------------------
# From the Hub, through huggingface_hub (HF_ENDPOINT is the fake Hub)

REPO = "karpathy/climbmix-400b-shuffle"


def hub_gets(hub, name: str) -> list:
    """The Range header of each GET of `name` at its Hub address."""
    return [r for m, path, r, _ in hub.requests if m == "GET" and path == f"/datasets/{REPO}/resolve/main/{name}"]


def test_hub_shards_land_in_the_data_dir_and_are_skipped_next_time(hub, capsys):
    from nanochat_jax.cli.download_data import main
    main(["-n", "3", "-w", "2", "--dataset", "climbmix-400b"])
    paths = download.list_shards("climbmix-400b")
    assert [p.name for p in paths] == ["shard_00000.parquet", "shard_00001.parquet", "shard_06542.parquet"]
    for p in paths:
        assert p.parent == download.data_dir("climbmix-400b") and p.read_bytes() == parquet_bytes(int(p.name[6:11]))
        assert len(hub_gets(hub, p.name)) == 1
    n = len(hub.requests)
    assert download.download_shards(3, "climbmix-400b") == paths
    assert len(hub.requests) == n          # nothing asked again, not even a HEAD


def test_hub_sends_hf_token_and_keeps_task_files_in_the_shared_cache(hub, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    path = download.hub_download(REPO, "shard_00001.parquet")
    assert path.read_bytes() == parquet_bytes(1)
    assert path.is_relative_to(tmp_path / "hf_hub")                # HF_HUB_CACHE (the base_dir fixture's)
    assert hub.requests and all(auth == "Bearer hf_test_token" for *_, auth in hub.requests)


def test_hub_offline_answers_from_the_cache_and_asks_nothing(hub, monkeypatch):
    path = download.hub_download(REPO, "shard_00001.parquet")
    n = len(hub.requests)
    for env in ("HF_HUB_OFFLINE", "NANOCHAT_OFFLINE"):
        with monkeypatch.context() as m:
            m.setenv(env, "1")
            assert download.hub_download(REPO, "shard_00001.parquet") == path
            with pytest.raises(UserError, match="not in the cache, and offline"):
                download.hub_download(REPO, "shard_00002.parquet")
    assert len(hub.requests) == n


def test_hub_cut_download_is_taken_up_again_by_the_library(hub, tmp_path):
    """huggingface_hub itself resumes a dropped transfer (with a Range request from the bytes it kept; this file is
    smaller than its 10 MB read chunk, so it keeps none and asks again from the start)."""
    hub.plans["shard_00004.parquet"] = ["cut"]
    path = download.hub_download(REPO, "shard_00004.parquet", local_dir=tmp_path / "d",
                                 check=download.check_parquet)
    assert path == tmp_path / "d" / "shard_00004.parquet" and path.read_bytes() == parquet_bytes(4)
    assert len(hub_gets(hub, "shard_00004.parquet")) == 2
    assert [m for m, *_ in hub.requests].count("HEAD") == 1     # the library's retry, not ours


def test_hub_5xx_is_retried_corrupt_is_fetched_again_404_is_final(hub):
    hub.plans["shard_00002.parquet"] = ["500", "500"]      # retried by the library (1 s, then 2 s)
    path = download.hub_download(REPO, "shard_00002.parquet", check=download.check_parquet)
    assert path.read_bytes() == parquet_bytes(2)

    hub.plans["shard_00003.parquet"] = ["corrupt"]          # the right size, so only our check can tell
    path = download.hub_download(REPO, "shard_00003.parquet", check=download.check_parquet)
    assert path.read_bytes() == parquet_bytes(3) and len(hub_gets(hub, "shard_00003.parquet")) == 2
    hub.plans["shard_00007.parquet"] = ["corrupt"] * 3
    with pytest.raises(UserError, match=r"shard_00007.parquet: still corrupt after 2 downloads \("):
        download.hub_download(REPO, "shard_00007.parquet", check=download.check_parquet, attempts=2)

    hub.plans["shard_00005.parquet"] = ["404"]
    n = len(hub.requests)
    with pytest.raises(UserError, match="shard_00005.parquet: HTTP 404"):
        download.hub_download(REPO, "shard_00005.parquet")
    assert len(hub.requests) == n + 1                        # not retried
    hub.plans["shard_00000.parquet"] = ["404"]
    with pytest.raises(UserError, match="1 of 2 shards failed; first: .*HTTP 404"):
        download.download_shards(2, "climbmix-400b")
