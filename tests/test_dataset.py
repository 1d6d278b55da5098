"""Facts about the validation split of custom corpora (nanochat_jax/data/documents.py), the pretokenize-on-first-use
cache (`ensure_pretokenized`, nanochat_jax/data/shards.py) and scripts/pretokenize.py, with one clear error per bad
input. (Readers: tests/test_dataset_readers.py; downloads: tests/test_download.py.)"""

import json

import numpy as np
import pytest

from nanochat_jax.data import documents, shards
from nanochat_jax.core.common import UserError, run_main
from nanochat_jax.data.shards import ShardDocs, TokenShard
from nanochat_jax.data.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tok():
    """The 256 byte tokens + the 9 specials: no training (and no bpe_rs) needed."""
    return Tokenizer({bytes([i]): i for i in range(256)})


def write_corpus(path, n=200):
    docs = [f"document number {i} says " + "hello " * (i % 5 + 1) for i in range(n)]
    path.write_text("\n".join(docs) + "\n", encoding="utf-8")
    return docs


def read_all(paths):
    d = ShardDocs(paths)
    return [bytes(d[i].astype(np.uint8)).decode() for i in range(len(d))]


def test_validation_split_is_a_fixed_fraction_by_document_index(tmp_path):
    docs = write_corpus(tmp_path / "c.txt", 2000)
    split = list(documents.split_documents(tmp_path / "c.txt", 0.1))
    assert [d for _, d in split] == docs                       # every document once, in order
    val = [i for i, (s, _) in enumerate(split) if s == "val"]
    assert 120 < len(val) < 280                                # ~10%
    assert val == [i for i in range(2000) if documents.is_validation(i, 0.1)]
    assert list(documents.split_documents(tmp_path / "c.txt", 0.1)) == split   # deterministic


def test_tiny_corpus_still_gets_one_validation_document(tmp_path):
    write_corpus(tmp_path / "c.txt", 3)
    splits = [s for s, _ in documents.split_documents(tmp_path / "c.txt", 0.001)]
    assert splits.count("val") == 1 and splits.count("train") == 2


def test_ensure_pretokenized_tokenizes_once_and_caches(tmp_path, base_dir, tok):
    docs = write_corpus(tmp_path / "c.txt", 300)
    train, val = shards.ensure_pretokenized(tmp_path / "c.txt", tok, val_fraction=0.05, workers=2,
                                             shard_tokens=3000)
    assert len(train) > 1 and len(val) >= 1                    # several shards of ~3000 tokens
    assert all(p.parent.parent == base_dir / "pretok" for p in train + val)
    got_train, got_val = read_all(train), read_all(val)
    want_val = [d for i, d in enumerate(docs) if documents.is_validation(i, 0.05)]
    assert got_val == want_val
    assert got_train == [d for d in docs if d not in want_val]
    assert TokenShard(train[0]).fingerprint == tok.fingerprint()
    meta = json.loads((train[0].parent / "meta.json").read_text())
    assert meta["docs"] == {"train": len(got_train), "val": len(got_val)}
    mtime = train[0].stat().st_mtime_ns
    assert shards.ensure_pretokenized(tmp_path / "c.txt", tok, val_fraction=0.05) == (train, val)
    assert train[0].stat().st_mtime_ns == mtime               # cached: not rewritten


def test_cache_key_follows_the_file_contents_and_the_tokenizer(tmp_path, base_dir, tok):
    write_corpus(tmp_path / "c.txt", 50)
    a = shards.pretok_dir(tmp_path / "c.txt", tok)
    write_corpus(tmp_path / "c.txt", 51)
    b = shards.pretok_dir(tmp_path / "c.txt", tok)
    other = Tokenizer({bytes([i]): i for i in range(256)} | {b"he": 256})
    c = shards.pretok_dir(tmp_path / "c.txt", other)
    assert len({a, b, c}) == 3


def test_directory_jsonl_and_parquet_corpora(tmp_path, base_dir, tok):
    from tests.test_dataset_readers import write_parquet
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.txt").write_text("first file\nstill the first")
    (tmp_path / "d" / "b.txt").write_text("second file")
    (tmp_path / "c.jsonl").write_text('{"text": "one"}\n{"text": "two"}\n{"text": "three"}\n')
    write_parquet(tmp_path / "c.parquet", {"text": ["p1", "p2", "p3"]})
    for src, want in ((tmp_path / "d", ["first file\nstill the first", "second file"]),
                      (tmp_path / "c.jsonl", ["one", "two", "three"]),
                      (tmp_path / "c.parquet", ["p1", "p2", "p3"])):
        train, val = shards.ensure_pretokenized(src, tok, val_fraction=0.01, workers=1)
        assert sorted(read_all(train) + read_all(val)) == sorted(want)
        assert len(read_all(val)) == 1


@pytest.mark.parametrize("content, match", [
    ("", "empty corpus"),
    ('{"text": "ok"}\n{"txt": "oops"}\n', 'line 2 has no "text" field'),
])
def test_bad_jsonl_corpora_are_one_line_errors(tmp_path, base_dir, tok, content, match):
    (tmp_path / "c.jsonl").write_text(content)
    with pytest.raises(UserError, match=match):
        shards.ensure_pretokenized(tmp_path / "c.jsonl", tok, workers=1)
    assert not any((base_dir / "pretok").glob("*/meta.json"))   # nothing half-made is cached


def test_parquet_without_text_column_is_a_one_line_error(tmp_path, base_dir, tok):
    from tests.test_dataset_readers import write_parquet
    write_parquet(tmp_path / "c.parquet", {"body": ["a", "b"]})
    with pytest.raises(UserError, match="no 'text' column"):
        shards.ensure_pretokenized(tmp_path / "c.parquet", tok, workers=1)


def test_pretokenize_script(tmp_path, base_dir, tok, capsys):
    from nanochat_jax.cli.pretokenize import main
    with pytest.raises(SystemExit) as e:      # no tokenizer yet: says to run tok_train, no traceback
        run_main(main, ["--data-path", str(tmp_path / "c.txt")])
    assert e.value.code == 2 and "tok_train" in capsys.readouterr().err
    tok.save(base_dir / "tokenizer")
    write_corpus(tmp_path / "c.txt", 100)
    train, val = main(["--data-path", str(tmp_path / "c.txt"), "--val-fraction", "0.1", "-w", "1"])
    out = capsys.readouterr().out
    assert "train: 1 shards" in out and "val: 1 shards" in out
    assert len(read_all(train)) + len(read_all(val)) == 100
    with pytest.raises(SystemExit):
        run_main(main, ["--data-path", str(tmp_path / "missing.txt")])
    assert "missing.txt: no such file" in capsys.readouterr().err


def test_bad_corpus_from_the_command_line_is_one_line_without_traceback(tmp_path, base_dir, tok):
    import os
    import subprocess
    import sys
    from pathlib import Path
    tok.save(base_dir / "tokenizer")
    (tmp_path / "c.jsonl").write_text('{"text": "fine"}\n{"body": "no text here"}\n')
    repo = Path(__file__).resolve().parent.parent
    r = subprocess.run([sys.executable, "-m", "scripts.pretokenize", "--data-path", str(tmp_path / "c.jsonl"),
                        "-w", "1"], cwd=repo, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "NANOCHAT_BASE_DIR": str(base_dir), "PYTHONPATH": str(repo)})
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [f'error: {tmp_path / "c.jsonl"}: line 2 has no "text" field']


def test_a_failed_pretokenize_leaves_no_temp_dir(tmp_path, base_dir, tok, monkeypatch):
    write_corpus(tmp_path / "c.txt", 50)

    def boom(source, out_dir, *a, **k):   # fails after writing part of a shard
        out_dir.mkdir(parents=True)
        (out_dir / "train_00000.bin").write_bytes(b"partial")
        raise OSError("no space left on device")
    monkeypatch.setattr(shards, "pretokenize", boom)
    with pytest.raises(OSError, match="no space"):
        shards.ensure_pretokenized(tmp_path / "c.txt", tok, workers=1)
    assert list((base_dir / "pretok").iterdir()) == []
