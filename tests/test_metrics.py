"""metrics.py: tensorboardX event files that TensorBoard's own reader understands, plus a JSONL file."""

import json
import socket
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest

from nanochat_jax.train.metrics import MetricsLogger


def _read_events(log_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def test_scalars_and_text_read_back_by_tensorboard(base_dir):
    with MetricsLogger("base", "d4-test") as logger:
        assert logger.log_dir == base_dir / "tensorboard" / "base" / "d4-test"
        for step in range(3):
            logger.scalars({"train/loss": 5.0 - step, "train/lr": np.float32(0.02)}, step)
        logger.scalar("val/bpb", 1.75, 2)
        logger.text("samples", "The capital of France is Paris", 2)
    acc = _read_events(logger.log_dir)
    tags = acc.Tags()
    assert {"train/loss", "train/lr", "val/bpb"} <= set(tags["scalars"])
    loss = acc.Scalars("train/loss")
    assert [e.step for e in loss] == [0, 1, 2]
    assert [e.value for e in loss] == pytest.approx([5.0, 4.0, 3.0])
    assert acc.Scalars("val/bpb")[0].value == pytest.approx(1.75)
    # text is stored as a tensor summary by the text plugin
    assert any("samples" in t for t in tags["tensors"])
    lines = [json.loads(line) for line in (logger.log_dir / "metrics.jsonl").read_text().splitlines()]
    assert lines[0]["step"] == 0 and lines[0]["train/loss"] == 5.0
    assert lines[-1]["text"] == "The capital of France is Paris"


def test_explicit_log_dir_and_jax_scalars(tmp_path):
    import jax.numpy as jnp
    logger = MetricsLogger("sft", "r", log_dir=tmp_path / "tb")
    logger.scalar("train/loss", jnp.float32(2.5), 7)
    logger.close()
    acc = _read_events(tmp_path / "tb")
    assert acc.Scalars("train/loss")[0].value == pytest.approx(2.5)
    assert acc.Scalars("train/loss")[0].step == 7


def test_tensorboard_serves_scalars_over_http(base_dir):
    with MetricsLogger("base", "served") as logger:
        logger.scalars({"train/loss": 3.0}, 1)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "tensorboard.main", "--logdir", str(base_dir / "tensorboard"),
                             "--host", "127.0.0.1", "--port", str(port), "--load_fast", "false"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        body = None
        for _ in range(120):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/data/plugin/scalars/tags", timeout=2) as r:
                    body = json.loads(r.read())
                if body:
                    break
            except OSError:
                pass
            time.sleep(0.5)
        assert body is not None, "tensorboard did not answer"
        assert "train/loss" in body["base/served"]
    finally:
        proc.terminate()
        proc.wait(timeout=10)
