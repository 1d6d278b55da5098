"""Training metrics: TensorBoard event files (tensorboardX), a JSONL file beside them, and the console.

    logger = MetricsLogger("base", "d4-cpu")       # <base dir>/tensorboard/base/d4-cpu/
    logger.scalars({"train/loss": 3.2, "train/lr": 0.02}, step)
    logger.text("samples", "The capital of France is ...", step)
    logger.close()

Only process 0 writes; on other processes every method is a no-op. `tensorboard --logdir <base dir>/tensorboard`
shows every stage and run.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from tensorboardX import SummaryWriter

from nanochat_jax.core.common import get_base_dir, print0, process_index


def _to_float(value) -> float:
    """A Python float from a number, a numpy scalar or a 0-d jax array (the latter blocks until it is ready)."""
    if hasattr(value, "item"):
        value = value.item()
    return float(value)


class MetricsLogger:
    """Scalars and text for one run of one stage, under `<base dir>/tensorboard/<stage>/<run>` (or `log_dir`)."""

    def __init__(self, stage: str, run: str | None = None, log_dir: str | Path | None = None, console: bool = False):
        self.stage = stage
        self.run = run or time.strftime("%Y%m%d-%H%M%S")
        self.log_dir = Path(log_dir) if log_dir is not None else get_base_dir() / "tensorboard" / stage / self.run
        self.console = console
        self.enabled = process_index() == 0
        self._writer = None
        self._jsonl = None
        if not self.enabled:
            return
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._writer = SummaryWriter(logdir=str(self.log_dir), flush_secs=10)
        self._jsonl = open(self.log_dir / "metrics.jsonl", "a", encoding="utf-8")

    # ------------------------------------------------------------------------------------------------------------

    def _record(self, rec: dict):
        self._jsonl.write(json.dumps(rec) + "\n")

    def scalar(self, tag: str, value, step: int):
        self.scalars({tag: value}, step)

    def scalars(self, values: dict, step: int):
        """Log several scalars at one step (one JSONL line). Non-finite values are kept (TensorBoard shows NaN)."""
        if not self.enabled:
            return
        step = int(step)
        floats = {tag: _to_float(v) for tag, v in values.items()}
        for tag, v in floats.items():
            self._writer.add_scalar(tag, v, global_step=step)
        self._record({"step": step, "time": time.time(),
                      **{k: (v if math.isfinite(v) else str(v)) for k, v in floats.items()}})
        if self.console:
            print0(f"step {step:06d} | " + " | ".join(f"{k}: {v:.6g}" for k, v in floats.items()))

    def text(self, tag: str, text: str, step: int):
        """Log a piece of text (e.g. sample generations); also printed to the console."""
        if not self.enabled:
            return
        step = int(step)
        self._writer.add_text(tag, text, global_step=step)
        self._record({"step": step, "time": time.time(), "tag": tag, "text": text})
        print0(f"[{tag} @ step {step}]\n{text}")

    def flush(self):
        if not self.enabled:
            return
        self._writer.flush()
        self._jsonl.flush()

    def close(self):
        if not self.enabled or self._jsonl is None:
            return
        self._writer.close()
        self._writer = None
        self._jsonl.close()
        self._jsonl = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
