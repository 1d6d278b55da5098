"""The report's training curves as PNG files, drawn with matplotlib's Agg backend (no display, no pyplot state).

One figure per training stage: a column of panels sharing the step axis, each drawn only where the stage logged it.

    panels = stage_panels("base", metrics)        # metrics: {tag: (steps, values)}, as report.writer.read_metrics
    if panels:                                    # [] when none of the stage's plotted tags has a finite value
        write_figure("base_curves.png", panels, title="base training (d20)")

The panels: train loss (per step and smoothed), validation loss or bpb, evaluation accuracies (MMLU/ARC, RL's
pass@k), RL's mean reward, and the learning-rate schedule.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
from matplotlib import ticker
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

WIDTH_IN, PANEL_IN, DPI = 9.0, 3.0, 100   # 900 px wide: a markdown viewer's column shows it unscaled
LOG_RATIO = 3.0   # a log y axis once the curve spans 3x (a loss falling from ~11 to ~3): its tail stays readable


@dataclasses.dataclass
class Series:
    """One curve. style: "line" (every step), "faint" (a noisy per-step trace behind its smoothed line) or
    "points" (an evaluation every N steps: markers joined by a line)."""
    label: str
    steps: np.ndarray
    values: np.ndarray
    style: str = "line"


@dataclasses.dataclass
class Panel:
    """One axes of a figure: its curves, a title and the y axis' label (with the unit)."""
    title: str
    ylabel: str
    series: list[Series]
    log_ok: bool = True       # may switch to a log y axis (losses); False keeps it linear (accuracies, LR)
    from_zero: bool = False   # the y axis starts at 0 (accuracies, rewards, LR: quantities that are never negative)


def _series(label: str, data, style: str = "line") -> Series | None:
    """A Series of the finite points of (steps, values); None when there are none."""
    steps, values = np.asarray(data[0], float), np.asarray(data[1], float)
    ok = np.isfinite(steps) & np.isfinite(values)
    return Series(label, steps[ok], values[ok], style) if ok.any() else None


def _panel(title: str, ylabel: str, series, log_ok: bool = True, from_zero: bool = False) -> Panel | None:
    series = [s for s in series if s is not None]
    return Panel(title, ylabel, series, log_ok, from_zero) if series else None


def _running_mean(values: np.ndarray, window: int) -> np.ndarray:
    """The mean of each `window` consecutive values, at the last of them (len(values) - window + 1 points)."""
    c = np.cumsum(np.concatenate([[0.0], values]))
    return (c[window:] - c[:-window]) / window


def _name(tag: str) -> str:
    """'val/bpb' -> 'bpb'."""
    return tag.split("/", 1)[1]


def _unit(tag: str) -> str:
    """The y-axis label of a validation tag."""
    return {"val/bpb": "bits per byte", "val/loss": "cross-entropy (nats/token)"}.get(tag, _name(tag))


def stage_panels(stage: str, metrics: dict) -> list[Panel]:
    """The panels of one stage's figure from its {tag: (steps, values)}, in reading order; those without a finite
    value are left out."""
    rl = stage == "rl"
    loss_unit = "policy-gradient loss" if rl else "cross-entropy (nats/token)"
    raw = "train/raw_loss" in metrics   # the train loop logs the per-step loss beside its EMA; RL one loss only
    loss = [_series("per step", metrics["train/raw_loss"], "faint") if raw else None,
            _series("smoothed (EMA)" if raw else "loss", metrics.get("train/loss", ([], [])))]
    val_tags = sorted(t for t in metrics if t.startswith("val/"))
    eval_tags = sorted((t for t in metrics if t.startswith("eval/")), key=_natural_key)
    panels = [
        _panel("train loss", loss_unit, loss, log_ok=not rl),
        _panel("validation " + ", ".join(_name(t) for t in val_tags),
               _unit(val_tags[0]) if len(val_tags) == 1 else "value",
               [_series(_name(t), metrics[t], "points") for t in val_tags]),
        _panel("pass@k on held-out problems" if rl else "evaluation accuracy", "fraction correct",
               [_series(_name(t), metrics[t], "points") for t in eval_tags], log_ok=False, from_zero=True),
    ]
    reward = _series("per step", metrics["train/reward"]) if "train/reward" in metrics else None
    if reward is not None:
        window = len(reward.steps) // 20   # the running mean of a noisy reward: a twentieth of the run
        series = [reward]
        if window >= 2:
            reward.style = "faint"
            series.append(Series(f"mean of the last {window} steps", reward.steps[window - 1:],
                                 _running_mean(reward.values, window)))
        panels.append(_panel("mean reward", "reward per sample", series, log_ok=False, from_zero=True))
    if "train/lrm" in metrics or "train/lr" in metrics:
        lrm = "train/lrm" in metrics
        panels.append(_panel("learning-rate schedule", "multiple of the peak LR" if lrm else "learning rate",
                             [_series("lrm" if lrm else "lr", metrics["train/lrm" if lrm else "train/lr"])],
                             log_ok=False, from_zero=True))
    return [p for p in panels if p is not None]


def _natural_key(tag: str):
    """'eval/pass@10' after 'eval/pass@2'."""
    head = tag.rstrip("0123456789")
    return head, int(tag[len(head):]) if len(head) < len(tag) else -1


# ---------------------------------------------------------------------------------------------------------------
# Drawing

STYLES = {"line": dict(lw=1.8), "faint": dict(color="0.6", lw=0.8, alpha=0.7),   # faint: light grey
          "points": dict(lw=1.5, marker="o", ms=4)}


def _log_axis(ax, lo: float, hi: float):
    """A log y axis with plain-number ticks (3, 5, 7, 10 rather than 10^0.5): 1-2-5 steps past a decade."""
    ax.set_yscale("log")
    subs = (1.0, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 7.0) if math.log10(hi / lo) < 1.2 else (1.0, 2.0, 5.0)
    ax.yaxis.set_major_locator(ticker.LogLocator(subs=subs))
    ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(ticker.NullFormatter())


def _draw_panel(ax, panel: Panel):
    colors = iter(f"C{i}" for i in range(len(panel.series)))   # matplotlib's palette, C0 first
    for s in panel.series:
        style = STYLES[s.style] if s.style == "faint" else {"color": next(colors), **STYLES[s.style]}
        ax.plot(s.steps, s.values, label=s.label, **style)
    values = np.concatenate([s.values for s in panel.series])
    lo, hi = float(values.min()), float(values.max())
    title = panel.title
    if panel.log_ok and lo > 0 and hi / lo >= LOG_RATIO:
        _log_axis(ax, lo, hi)
        title += " (log scale)"
    if panel.from_zero:
        top = hi * 1.08 if hi > 0 else 1.0
        ax.set_ylim(-0.02 * top, top)   # a curve at 0 stays visible above the frame
    ax.set_title(title, fontsize=11, loc="left")
    ax.set_ylabel(panel.ylabel)
    ax.grid(True, alpha=0.3)
    if len(panel.series) > 1:   # one curve: the title names it
        ax.legend(loc="best", fontsize=9, framealpha=0.9)


def write_figure(path, panels: list[Panel], title: str, xlabel: str = "step") -> Path:
    """Draw `panels` one under the other (the step axis shared) under `title`; a PNG of WIDTH_IN x PANEL_IN per
    panel at DPI. Returns the path."""
    if not panels:
        raise ValueError(f"{path}: no panels to draw")
    fig = Figure(figsize=(WIDTH_IN, PANEL_IN * len(panels)), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)   # the Agg (raster) backend draws it: no display, no global pyplot state
    axes = fig.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0]
    for ax, panel in zip(axes, panels):
        _draw_panel(ax, panel)
    axes[-1].set_xlabel(xlabel)
    axes[-1].xaxis.set_major_locator(ticker.MaxNLocator(integer=True, steps=[1, 2, 2.5, 5, 10]))
    fig.suptitle(title, fontsize=13, fontweight="bold")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, facecolor="white")
    return path
