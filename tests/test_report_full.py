"""The stitched report.md: header, summary table across stages, PNG plots from metrics.jsonl; scripts.report."""

import json
import math
import time

import numpy as np

from nanochat_jax.report import plot
from nanochat_jax.report import writer as report
from nanochat_jax.train.metrics import MetricsLogger


def _fake_run(base_dir):
    """Sections and metrics as the stages write them (a pause between sections: they are ordered by mtime)."""
    sections = [("Tokenizer training", {"vocab size": 4096}),
                ("Base model training", {"steps": 100, "MFU (%)": 1.5}),
                ("Base model evaluation", {"CORE metric": 0.0321, "tasks": [{"task": "hellaswag", "accuracy": 0.3}]}),
                ("Chat evaluation mid", {"ARC-Easy": 0.25, "MMLU": "skipped", "GSM8K": 0.0, "ChatCORE": None}),
                ("Chat evaluation sft", {"ARC-Easy": 0.3125, "ARC-Challenge": 0.2, "MMLU": 0.27, "GSM8K": 0.01,
                                         "HumanEval": 0.0, "ChatCORE": 0.0456})]
    for title, data in sections:
        report.log(title, data)
        time.sleep(0.02)
    with MetricsLogger("base", "d4") as m:
        for s in range(1, 101):
            m.scalars({"train/loss": 10 * math.exp(-s / 30) + 3, "train/raw_loss": 10 * math.exp(-s / 30) + 3.2,
                       "train/lrm": 1.0 if s < 80 else (100 - s) / 20}, s)
        for s in (25, 50, 75, 100):
            m.scalars({"val/bpb": 2 * math.exp(-s / 30) + 1}, s)


def test_png_roundtrip_and_pixels():
    img = plot.render_panel({"a": ([0, 1, 2], [1.0, 2.0, 3.0])}, "title", "step")
    data = plot.png_bytes(img)
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    back = plot.read_png(data)
    assert back.shape == img.shape and (back == img).all()
    # the curve's colour is present; the canvas is mostly white
    assert (back == np.array(plot.PALETTE[0], np.uint8)).all(axis=-1).sum() > 100
    assert (back == 255).all(axis=-1).mean() > 0.7


def test_nice_ticks():
    assert plot.nice_ticks(0, 10, 5) == [0, 2, 4, 6, 8, 10]
    t = plot.nice_ticks(2.93, 3.71)
    assert t[0] >= 2.93 and t[-1] <= 3.71 and len(t) >= 3
    assert plot.format_tick(5000) == "5k" and plot.format_tick(0.5) == "0.5"


def test_header_summary_plots(base_dir):
    report.write_header(hourly=24.0, preset="cpu")
    header = json.loads((base_dir / "report" / "header.json").read_text())
    header["start_time"] -= 3600  # the run began an hour ago
    (base_dir / "report" / "header.json").write_text(json.dumps(header))
    time.sleep(0.01)
    _fake_run(base_dir)
    path = report.generate_report()
    assert path == base_dir / "report" / "report.md"
    text = path.read_text()
    # header
    assert text.startswith("# nanochat-jax training report")
    for needle in ("git commit:", "cpu cores:", "hourly cost: $24.00", "jax ", "characters:", "lines:", "files:",
                   "preset: cpu"):
        assert needle in text, needle
    # summary table: rows x BASE/MID/SFT/RL
    assert "| Metric | BASE | MID | SFT | RL |" in text
    assert "| CORE | 0.0321 | - | - | - |" in text
    assert "| ARC-Easy | - | 0.2500 | 0.3125 | - |" in text
    assert "| MMLU | - | skipped | 0.2700 | - |" in text
    assert "| ChatCORE | - | - | 0.0456 | - |" in text
    assert "Total wall clock time: 1h00m" in text
    assert "Estimated cost: $24.0" in text
    # every section, in the order written, after the summary
    order = [text.index(f"## {s}") for s in ("Summary", "Tokenizer training", "Base model training",
                                             "Base model evaluation", "Chat evaluation mid", "Chat evaluation sft")]
    assert order == sorted(order)
    # the plot: linked and a real PNG with three panels
    assert "![base curves](base_curves.png)" in text
    img = plot.read_png((base_dir / "report" / "base_curves.png").read_bytes())
    assert img.shape[0] == 3 * 300 and img.shape[2] == 3
    # generating again does not read report.md back as a section
    text2 = report.generate_report().read_text()
    assert text2.count("## Base model training") == 1


def test_read_metrics_resume_keeps_last(base_dir, tmp_path):
    p = tmp_path / "metrics.jsonl"
    p.write_text('{"step": 1, "time": 0, "train/loss": 5}\n{"step": 2, "time": 0, "train/loss": 4}\n'
                 '{"step": 2, "time": 1, "train/loss": 3.5}\n{"step": 2, "tag": "samples", "text": "hi"}\n'
                 '{"step": 3, "time": 1, "train/lo')   # cut by a kill
    m = report.read_metrics(p)
    assert m["train/loss"] == ([1, 2], [5.0, 3.5])


def test_no_header_no_metrics(base_dir):
    report.log("Tokenizer training", {"vocab size": 512})
    text = report.generate_report().read_text()
    assert "no environment header" in text and "Total wall clock time: unknown" in text
    assert "no training metrics found" in text


def test_script_reset_and_generate(base_dir, capsys):
    from scripts import report as script
    (base_dir / "report").mkdir(exist_ok=True)
    (base_dir / "report" / "old-section.md").write_text("## Old section\n")
    script.main(["reset", "--hourly-cost", "3"])
    assert not (base_dir / "report" / "old-section.md").exists()
    assert json.loads((base_dir / "report" / "header.json").read_text())["hourly_cost"] == 3.0
    _fake_run(base_dir)
    out = script.main(["generate", "--output", str(base_dir / "out" / "report.md")])
    assert out.is_file() and (base_dir / "out" / "base_curves.png").is_file()
    assert "report: " in capsys.readouterr().out
