"""Facts about nanochat_jax/data/documents.py's readers: iter_documents over .txt/.jsonl/.parquet/dirs, the
embedded corpus, and one clear UserError per bad input."""

import json

import pytest

from nanochat_jax.core.common import UserError
from nanochat_jax.data.documents import describe_embedded, embedded_corpus, iter_documents


def write_parquet(path, columns: dict, row_group_size=None):
    """pq.write_table of a dict of lists. pyarrow probes for pandas when it builds arrays; a pandas built for another
    numpy raises ValueError on that first probe only (the dev venv's pandas 2.0 vs numpy 2.4), so probe once first."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    try:
        pa.array(["probe"])
    except ValueError:
        pass
    pq.write_table(pa.table(columns), path, row_group_size=row_group_size)


def test_txt_is_one_document_per_nonblank_line(tmp_path):
    p = tmp_path / "a.txt"
    p.write_text("first doc\n\n  \nsecond doc é 😀\r\nthird\n", encoding="utf-8")
    assert list(iter_documents(p)) == ["first doc", "second doc é 😀", "third"]
    assert list(iter_documents(str(p))) == ["first doc", "second doc é 😀", "third"]


def test_jsonl_reads_text_field(tmp_path):
    p = tmp_path / "a.jsonl"
    p.write_text("\n".join(json.dumps({"text": t, "id": i}) for i, t in enumerate(["x y", "multi\nline"])) + "\n")
    assert list(iter_documents(p)) == ["x y", "multi\nline"]


def test_parquet_reads_text_column_across_row_groups(tmp_path):
    import pyarrow.parquet as pq
    texts = [f"document number {i}" for i in range(10)]
    p = tmp_path / "a.parquet"
    write_parquet(p, {"text": texts, "n": list(range(10))}, row_group_size=3)
    assert pq.ParquetFile(p).num_row_groups == 4
    assert list(iter_documents(p)) == texts


def test_directory_is_sorted_and_txt_files_are_whole_documents(tmp_path):
    (tmp_path / "b.txt").write_text("file b\nsecond line of b")
    (tmp_path / "a.txt").write_text("file a")
    (tmp_path / "c.jsonl").write_text(json.dumps({"text": "from jsonl"}) + "\n")
    (tmp_path / "notes.md").write_text("ignored")
    assert list(iter_documents(tmp_path)) == ["file a", "file b\nsecond line of b", "from jsonl"]


def test_embedded_corpus_is_real_deterministic_english():
    docs = embedded_corpus()
    assert len(docs) > 1000
    chars = sum(map(len, docs))
    assert chars > 1_000_000
    text = " ".join(docs[:200])
    for word in (" the ", " and ", " is "):
        assert word in text
    assert docs == embedded_corpus()
    assert list(iter_documents("embedded")) == docs
    assert f"{chars:,} characters" in describe_embedded()


@pytest.mark.parametrize("name, content, message", [
    ("missing.txt", None, "no such file"),
    ("bad.txt", b"good line\nbad \xff byte\n", "not UTF-8 text (line 2, byte 4"),
    ("bad.jsonl", b'{"text": "ok"}\n{"body": "no text"}\n', "line 2 has no \"text\" field"),
    ("broken.jsonl", b'{"text": "ok"}\n{not json\n', "line 2 is not valid JSON"),
    ("data.csv", b"a,b\n", "unknown file type '.csv'"),
    ("empty.txt", b"\n  \n", "empty corpus"),
    ("fake.parquet", b"not parquet at all", "not a readable parquet file"),
])
def test_bad_inputs_raise_one_line_user_errors(tmp_path, name, content, message):
    p = tmp_path / name
    if content is not None:
        p.write_bytes(content)
    with pytest.raises(UserError) as e:
        list(iter_documents(p))
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_parquet_without_text_column(tmp_path):
    p = tmp_path / "a.parquet"
    write_parquet(p, {"content": ["x"]})
    with pytest.raises(UserError, match="no 'text' column"):
        list(iter_documents(p))


def test_empty_directory(tmp_path):
    with pytest.raises(UserError, match="no .txt, .jsonl or .parquet"):
        list(iter_documents(tmp_path))


def test_non_utf8_file_inside_a_directory_names_file_and_line(tmp_path):
    (tmp_path / "a.txt").write_text("fine")
    (tmp_path / "b.txt").write_bytes(b"line one\nline \xe9two\n")
    with pytest.raises(UserError, match=r"b.txt: not UTF-8 text \(line 2, byte offset 14"):
        list(iter_documents(tmp_path))
