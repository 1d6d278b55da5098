"""The stitched report.md: header, summary table across stages, PNG plots from metrics.jsonl (report/plot.py);
scripts.report."""

import json
import math
import time

import numpy as np
import pytest
from PIL import Image

from nanochat_jax.report import plot
from nanochat_jax.report import writer as report
from nanochat_jax.train.metrics import MetricsLogger

C0 = (31, 119, 180)   # matplotlib's first colour, #1f77b4


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


def _curve_pixels(png, bands: int) -> list[int]:
    """Pixels of matplotlib's first colour (C0, where every panel draws its main curve) in each of `bands`
    horizontal bands of the image, top to bottom."""
    rgb = np.asarray(Image.open(png).convert("RGB")).astype(int)
    near = (np.abs(rgb - np.array(C0)).sum(axis=-1) < 60)
    return [int(b.sum()) for b in np.array_split(near, bands, axis=0)]


def _metrics(n=200, **extra):
    steps = list(range(1, n + 1))
    m = {"train/raw_loss": (steps, [10 * math.exp(-s / 30) + 3.2 for s in steps]),
         "train/loss": (steps, [10 * math.exp(-s / 30) + 3 for s in steps]),
         "train/lrm": (steps, [min(1.0, (n - s) / 40) for s in steps]),
         "val/bpb": ([0, 50, 100, 150, 200], [3.4, 2.6, 2.3, 2.2, 2.1])}
    m.update(extra)
    return m


def test_stage_figure_is_a_png_of_the_expected_size_with_a_curve_in_every_panel(tmp_path):
    panels = plot.stage_panels("base", _metrics())
    assert [p.title for p in panels] == ["train loss", "validation bpb", "learning-rate schedule"]
    assert [p.ylabel for p in panels] == ["cross-entropy (nats/token)", "bits per byte", "multiple of the peak LR"]
    path = plot.write_figure(tmp_path / "base_curves.png", panels, "base training (d4)")
    img = Image.open(path)
    assert img.format == "PNG"
    assert img.size == (plot.WIDTH_IN * plot.DPI, 3 * plot.PANEL_IN * plot.DPI) == (900, 900)
    assert all(n > 100 for n in _curve_pixels(path, 3)), _curve_pixels(path, 3)


def test_an_empty_panel_is_caught(tmp_path):
    # the pixel check above sees a missing curve: a panel with nothing drawn in C0 fails it
    panels = plot.stage_panels("base", _metrics())
    panels[1].series[0].style = "faint"   # the bpb curve drawn grey: the middle band has no C0 pixels
    path = plot.write_figure(tmp_path / "x.png", panels, "t")
    assert _curve_pixels(path, 3)[1] == 0
    with pytest.raises(ValueError, match="no panels"):
        plot.write_figure(tmp_path / "y.png", [], "t")


def test_stage_panels_leave_out_what_is_missing_or_not_finite():
    nan = float("nan")
    m = _metrics(**{"val/loss": ([0, 10], [nan, nan]), "eval/mmlu": ([0, 10], [0.25, 0.3]),
                    "eval/arc_easy": ([0, 10], [0.3, nan])})
    del m["val/bpb"]
    panels = plot.stage_panels("sft", m)
    assert [p.title for p in panels] == ["train loss", "evaluation accuracy", "learning-rate schedule"]
    acc = panels[1]
    assert [s.label for s in acc.series] == ["arc_easy", "mmlu"] and len(acc.series[0].steps) == 1
    assert plot.stage_panels("sft", {"val/loss": ([0], [nan]), "train/tok_per_sec": ([1], [5.0])}) == []


def test_rl_panels_reward_mean_and_pass_at_k_order():
    steps = list(range(1, 101))
    m = {"train/loss": (steps, [0.0] * 100), "train/reward": (steps, [s % 2 for s in steps]),
         "train/lrm": (steps, [1.0] * 100),
         **{f"eval/pass@{k}": ([0, 100], [0.1 * k, 0.2 * k]) for k in (1, 2, 10, 4)}}
    panels = {p.title: p for p in plot.stage_panels("rl", m)}
    assert list(panels) == ["train loss", "pass@k on held-out problems", "mean reward", "learning-rate schedule"]
    assert panels["train loss"].ylabel == "policy-gradient loss" and not panels["train loss"].log_ok
    assert [s.label for s in panels["pass@k on held-out problems"].series] == ["pass@1", "pass@2", "pass@4",
                                                                                "pass@10"]
    raw, mean = panels["mean reward"].series
    assert raw.style == "faint" and mean.label == "mean of the last 5 steps"
    assert mean.steps[0] == 5 and np.allclose(mean.values, [0.6, 0.4] * 48)


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
    # the plot: linked, a PNG with three panels (loss, bpb, LR), each with its curve; the stages without metrics
    # are named, with no file
    assert "![base curves](base_curves.png)" in text
    png = base_dir / "report" / "base_curves.png"
    assert Image.open(png).size == (900, 900) and all(n > 100 for n in _curve_pixels(png, 3))
    assert ("Not plotted: mid (no metrics.jsonl under tensorboard/mid/); sft (no metrics.jsonl under "
            "tensorboard/sft/); rl (no metrics.jsonl under tensorboard/rl/).") in text
    assert not (base_dir / "report" / "mid_curves.png").exists()
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
    assert not list((base_dir / "report").glob("*.png"))


def test_stage_with_only_nan_metrics_is_skipped_with_a_note(base_dir):
    _fake_run(base_dir)
    with MetricsLogger("sft", "d4") as m:
        m.scalars({"val/loss": float("nan")}, 0)
    made, skipped = report.make_plots(base_dir / "plots")
    assert [s for s, _ in made] == ["base"]
    assert ("sft", "no finite train/val/eval values in d4/metrics.jsonl") in skipped
    assert not (base_dir / "plots" / "sft_curves.png").exists()


def test_script_reset_and_generate(base_dir, capsys):
    from nanochat_jax.cli import report as script
    (base_dir / "report").mkdir(exist_ok=True)
    (base_dir / "report" / "old-section.md").write_text("## Old section\n")
    script.main(["reset", "--hourly-cost", "3"])
    assert not (base_dir / "report" / "old-section.md").exists()
    assert json.loads((base_dir / "report" / "header.json").read_text())["hourly_cost"] == 3.0
    _fake_run(base_dir)
    out = script.main(["generate", "--output", str(base_dir / "out" / "report.md")])
    assert out.is_file() and (base_dir / "out" / "base_curves.png").is_file()
    assert "report: " in capsys.readouterr().out
