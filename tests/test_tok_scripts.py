"""Facts about scripts/tok_train.py and scripts/tok_eval.py: they train on every kind of data path and save a loadable
tokenizer, report speed and compression, and turn every bad input into one `error:` line with exit code 2."""

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from nanochat_jax.data.tokenizer import Tokenizer
from nanochat_jax.cli import tok_eval, tok_train

REPO = Path(__file__).resolve().parent.parent


def training_texts(n_docs: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    words = ["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "tokenizer", "Python", "merge",
             "naïve", "café", "данные", "数据", "😀", "1234", "3.14", "x = y + 1", "def f():", "\n    return"]
    return [" ".join(rng.choice(words) for _ in range(rng.randint(5, 40))) for _ in range(n_docs)]


def write_parquet(path, columns: dict, row_group_size=None):
    import pyarrow as pa
    import pyarrow.parquet as pq
    try:
        pa.array(["probe"])  # a pandas built for another numpy fails pyarrow's first pandas probe only
    except ValueError:
        pass
    pq.write_table(pa.table(columns), path, row_group_size=row_group_size)


def run_script(module, *args, env_extra=None):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)


@pytest.fixture()
def corpora(tmp_path):
    docs = training_texts(200)
    txt = tmp_path / "c.txt"
    txt.write_text("\n".join(d.replace("\n", " ") for d in docs) + "\n", encoding="utf-8")
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    parquet = tmp_path / "c.parquet"
    write_parquet(parquet, {"text": docs}, row_group_size=64)
    return {"txt": txt, "jsonl": jsonl, "parquet": parquet}


@pytest.mark.parametrize("kind", ["txt", "jsonl", "parquet"])
def test_tok_train_on_each_file_type(kind, corpora, base_dir, capsys):
    tok = tok_train.main(["--data-path", str(corpora[kind]), "--vocab-size", "300"])
    out = capsys.readouterr().out
    assert "chars/s" in out and "compression:" in out and "bytes/token" in out
    saved = Tokenizer.from_directory(base_dir / "tokenizer")
    assert saved.get_vocab_size() == 300 and saved.fingerprint() == tok.fingerprint()
    info = json.loads((base_dir / "tokenizer" / "train_info.json").read_text())
    assert info["data_path"] == str(corpora[kind]) and info["train_chars"] > 0
    assert (base_dir / "report").is_dir()


def test_max_chars_and_doc_cap_limit_the_text(corpora, tmp_path, base_dir):
    tok_train.main(["--data-path", str(corpora["jsonl"]), "--vocab-size", "300", "--max-chars", "2000",
                    "--doc-cap", "50", "--output-dir", str(tmp_path / "out")])
    info = json.loads((tmp_path / "out" / "train_info.json").read_text())
    assert 2000 <= info["train_chars"] < 2050  # the document that crosses the limit is the last one
    assert info["train_chars"] <= 50 * info["train_docs"] and info["train_docs"] <= 45  # documents cut to 50
    assert not (base_dir / "tokenizer").exists()


def test_tok_eval_reports_each_text_kind_and_skips_missing_references(corpora, base_dir, tmp_path, capsys):
    tok_train.main(["--data-path", str(corpora["txt"]), "--vocab-size", "350"])
    capsys.readouterr()
    os.environ["TIKTOKEN_CACHE_DIR"] = str(tmp_path / "empty_tiktoken_cache")
    try:
        rows = tok_eval.main([])
    finally:
        del os.environ["TIKTOKEN_CACHE_DIR"]
    out = capsys.readouterr().out
    assert "GPT-2 (gpt2): skipped: not available offline" in out
    assert "GPT-4 (cl100k_base): skipped: not available offline" in out
    kinds = [r["text"] for r in rows]
    assert kinds == ["prose", "code", "math", "non-english", f"corpus ({corpora['txt']})"]
    for r in rows:
        assert 1.0 <= r["ours (350) bytes/token"] <= 8.0
        assert r["text"] in out


def test_reference_encodings_come_from_tiktokens_own_cache_only(tmp_path, monkeypatch):
    """GPT-2/GPT-4 load through tiktoken when its cache ($TIKTOKEN_CACHE_DIR) holds their files; otherwise the reason
    says where it looked and how to fill it. No proxy variables are touched."""
    import hashlib
    loaded = []
    monkeypatch.setattr(tok_eval.tiktoken, "get_encoding", lambda name: loaded.append(name) or f"enc:{name}")
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    enc, why = tok_eval.reference_encoding("cl100k_base")
    assert enc is None and str(tmp_path) in why and "TIKTOKEN_CACHE_DIR" in why and not loaded
    for url in tok_eval.REFERENCE_FILES["cl100k_base"]:
        (tmp_path / hashlib.sha1(url.encode()).hexdigest()).write_bytes(b"cached")
    assert tok_eval.reference_encoding("cl100k_base") == ("enc:cl100k_base", None)
    assert tok_eval.reference_encoding("gpt2")[0] is None   # gpt2's two files are not there
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")
    assert "cache is off" in tok_eval.reference_encoding("cl100k_base")[1]
    assert "HTTPS_PROXY" not in Path(tok_eval.__file__).read_text(encoding="utf-8")


def test_readme_first_command_on_the_embedded_corpus(base_dir, capsys):
    tok_train.main(["--data-path", "embedded", "--vocab-size", "1024"])
    out = capsys.readouterr().out
    assert "embedded corpus:" in out and "characters" in out
    tok = Tokenizer.from_directory(base_dir / "tokenizer")
    assert tok.get_vocab_size() == 1024
    rows = tok_eval.main([])
    corpus = rows[-1]
    assert corpus["text"] == "corpus (embedded)" and corpus["ours (1,024) bytes/token"] > 2.3


def test_bad_inputs_print_one_error_line_and_exit_2(tmp_path, base_dir):
    (tmp_path / "empty.txt").write_text("\n\n")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    (tmp_path / "data.csv").write_text("a,b\n")
    (tmp_path / "tiny.txt").write_text("hello world\n")
    good = tmp_path / "good.txt"
    good.write_text("some words\n")
    cases = [
        (["--data-path", tmp_path / "empty.txt", "--vocab-size", 300], "empty corpus"),
        (["--data-path", good, "--vocab-size", 264], "below the minimum 265"),
        (["--data-path", tmp_path / "missing.txt", "--vocab-size", 300], "no such file"),
        (["--data-path", tmp_path / "latin1.txt", "--vocab-size", 300], "not UTF-8 text (line 1, byte 3"),
        (["--data-path", tmp_path / "data.csv", "--vocab-size", 300], "unknown file type '.csv'"),
        (["--data-path", tmp_path / "tiny.txt", "--vocab-size", 4096], "vocab size of at most"),
        (["--vocab-size", 300], "download_data"),  # the default source: shards, none downloaded
    ]
    for args, message in cases:
        r = run_script("scripts.tok_train", *args)
        assert r.returncode == 2, (args, r.stderr)
        assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, (args, r.stderr)
        assert message in r.stderr, (args, r.stderr)
        assert "Traceback" not in r.stderr
    r = run_script("scripts.tok_eval")
    assert r.returncode == 2 and "run `python -m scripts.tok_train` first" in r.stderr
