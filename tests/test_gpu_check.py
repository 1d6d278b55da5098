"""bench/gpu_check.py: its CPU flow (--cpu) runs every step and reports each step's figures in the summary table."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
STEPS = ["setup", "gpu-tests", "tokenizer", "d24", "d24-resume", "d20", "d20-resume", "serve"]


@pytest.fixture(scope="module")
def summary(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    # the flow as a user runs it: one CPU device and the default dtype, not conftest's 8 devices and float32
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "NANOCHAT_DTYPE")}
    p = subprocess.run([sys.executable, "bench/gpu_check.py", "--cpu", "--out", str(out),
                        "--base-dir", str(out / "base")], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert (out / "summary.md").read_text() in p.stdout   # the table printed is the table written
    data = json.loads((out / "summary.json").read_text())
    assert not (out / "base").exists()   # the runs' base dir (checkpoints) is removed at the end
    return data, out


@pytest.mark.slow
def test_every_step_ran_and_kept_its_log(summary):
    data, out = summary
    assert data["device"].startswith("cpu:")
    assert [row["step"] for row in data["rows"]] == STEPS
    assert all(row["status"] == "ok" for row in data["rows"]), data["rows"]
    assert all((out / f"{step}.log").is_file() for step in STEPS if step != "setup")   # nothing installed here
    assert data["rows"][0]["figures"] == {"installed": "nothing"}


@pytest.mark.slow
def test_training_rows_report_their_figures_and_resume_matches(summary):
    rows = {row["step"]: row["figures"] for row in summary[0]["rows"]}
    assert rows["gpu-tests"].get("skipped", 0) >= 1 and "failed" not in rows["gpu-tests"]   # the cuDNN test, on CPU
    for preset in ("d24", "d20"):
        fig = rows[preset]
        assert fig["steps"] == 6 and fig["step ms"] > 0 and fig["tok/s"] > 0 and fig["compile s"] > 0
        resumed = rows[f"{preset}-resume"]
        assert resumed["from step"] == 3 and resumed["steps"] == 3 and resumed["max loss diff"] == 0


@pytest.mark.slow
def test_serve_row_counts_the_streamed_and_concurrent_requests(summary):
    fig = next(row["figures"] for row in summary[0]["rows"] if row["step"] == "serve")
    assert fig["1: tokens"] > 0 and fig["32: ok"] == 32 and fig["32: tok/s"] > 0
    assert "error" not in fig
