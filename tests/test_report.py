"""nanochat_jax/report/writer.py: one markdown file per section under the base dir, read back in order, reset."""

import time

from nanochat_jax.report import writer as report


def test_log_writes_section_file(base_dir):
    path = report.log("Base model training", {"depth": 4, "val bpb": 1.23456, "tokens": 1234567, "ok": True})
    assert path == base_dir / "report" / "base-model-training.md"
    text = path.read_text()
    assert text.startswith("## Base model training\n")
    assert "timestamp: " in text
    assert "- depth: 4" in text
    assert "- val bpb: 1.2346" in text
    assert "- tokens: 1,234,567" in text
    assert "- ok: True" in text


def test_tables_strings_and_replace(base_dir):
    report.log("Base eval", ["CORE run", {"CORE": 0.25, "tasks": [{"task": "a", "acc": 0.5}, {"task": "b", "acc": 0.75}]}])
    text = (base_dir / "report" / "base-eval.md").read_text()
    assert "CORE run" in text
    assert "| task | acc |" in text and "| b | 0.7500 |" in text
    report.log("Base eval", {"CORE": 0.3})  # a rerun replaces the section
    text = (base_dir / "report" / "base-eval.md").read_text()
    assert "0.3000" in text and "0.2500" not in text


def test_read_sections_in_order_and_reset(base_dir):
    report.log("Tokenizer training", {"vocab": 512})
    time.sleep(0.01)
    report.log("Base model training", {"steps": 10})
    sections = report.read_sections()
    assert [t for t, _ in sections] == ["Tokenizer training", "Base model training"]
    assert "- steps: 10" in sections[1][1]
    report.reset()
    assert report.read_sections() == []
