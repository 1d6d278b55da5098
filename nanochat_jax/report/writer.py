"""The run report: one markdown file per section under `<base dir>/report/`, written as each stage finishes.

`log("Base model training", {...})` writes `<base dir>/report/base-model-training.md`; a stage that runs again
replaces its own section. `read_sections()` reads them back (in the order they were written) so that the speedrun's
report can stitch `report.md` together; `reset()` starts a new report.

`write_header()` records the run's start, environment and hourly cost (header.json); `generate_report()` writes
report.md: the header, a summary table across BASE/MID/SFT/RL, wall-clock time and cost, PNG plots of the training
curves (from the metrics.jsonl files beside the TensorBoard events), then every section. `scripts/report.py` wraps both.
"""

from __future__ import annotations

import datetime
import json
import re
import time
from pathlib import Path

from nanochat_jax.core.common import get_base_dir, process_index
from nanochat_jax.report.system import code_size, git_info, gpu_info, hardware_info, hourly_cost, software_versions


def report_dir() -> Path:
    d = get_base_dir() / "report"
    d.mkdir(parents=True, exist_ok=True)
    return d


def slugify(section: str) -> str:
    """'Base model training' -> 'base-model-training'."""
    slug = re.sub(r"[^a-z0-9]+", "-", section.lower()).strip("-")
    return slug or "section"


def _format_value(v) -> str:
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) >= 1e-3 or v == 0 else f"{v:.3e}"
    if hasattr(v, "item") and getattr(v, "shape", None) == ():  # numpy / jax scalars
        return _format_value(v.item())
    return str(v)


def _table(rows: list[dict]) -> str:
    """A list of dicts as a markdown table (columns in first-seen order)."""
    cols = []
    for r in rows:
        cols += [k for k in r if k not in cols]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(_format_value(r.get(c, "")) for c in cols) + " |")
    return "\n".join(lines)


def render(section: str, data, timestamp: str | None = None) -> str:
    """The markdown of one section: a title, a time stamp, then `- key: value` lines, tables and paragraphs.

    data: a dict (key: value lines; a value that is a list of dicts becomes a table), or a list of such dicts
    and strings (strings are written as they are).
    """
    timestamp = timestamp or datetime.datetime.now().strftime("%Y-%m-%d %H:%M:%S")
    out = [f"## {section}", f"timestamp: {timestamp}", ""]
    items = data if isinstance(data, list) else [data]
    for item in items:
        if item is None:
            continue
        if isinstance(item, str):
            out += [item, ""]
            continue
        if not isinstance(item, dict):
            raise TypeError(f"report.log: expected dict, list or str items, got {type(item).__name__}")
        for k, v in item.items():
            if isinstance(v, list) and v and all(isinstance(r, dict) for r in v):
                out += ["", f"{k}:", "", _table(v), ""]
            else:
                out.append(f"- {k}: {_format_value(v)}")
        out.append("")
    return "\n".join(out).rstrip() + "\n"


def log(section: str, data) -> Path | None:
    """Write (or replace) a stage's section `<base dir>/report/<slug>.md`. Only process 0 writes."""
    if process_index() != 0:
        return None
    path = report_dir() / f"{slugify(section)}.md"
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text(render(section, data), encoding="utf-8")
    tmp.replace(path)
    return path


def read_sections() -> list[tuple[str, str]]:
    """[(title, markdown)] of every section written so far, oldest first."""
    d = get_base_dir() / "report"
    if not d.is_dir():
        return []
    files = sorted(d.glob("*.md"), key=lambda p: (p.stat().st_mtime_ns, p.name))
    out = []
    for p in files:
        if p.name == "report.md":  # the stitched report, not a section
            continue
        text = p.read_text(encoding="utf-8")
        first = text.splitlines()[0] if text else ""
        title = first[3:].strip() if first.startswith("## ") else p.stem
        out.append((title, text))
    return out


def reset() -> None:
    """Start a new report: remove every section file (process 0 only)."""
    if process_index() != 0:
        return
    d = get_base_dir() / "report"
    if d.is_dir():
        for p in d.glob("*.md"):
            p.unlink()


# ---------------------------------------------------------------------------------------------------------------
# The stitched report.md (nanochat's layout): a header (environment, cost, code size), a summary table across the
# stages, the plots, then every stage's section in the order the stages ran.
#
#     write_header(hourly=None)           # at the start of a run (scripts.report reset): start time, environment
#     generate_report()                   # at the end: <base dir>/report/report.md + PNG plots beside it

HEADER_FILE = "header.json"
# the summary table: rows, and where each value comes from
SUMMARY_ROWS = ["CORE", "ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval", "ChatCORE"]
SUMMARY_STAGES = ["BASE", "MID", "SFT", "RL"]
TRAIN_STAGES = ("base", "mid", "sft", "rl")


def write_header(hourly: float | None = None, preset: str | None = None) -> Path:
    """Record the run's start time and environment in `<report dir>/header.json` (process 0 only)."""
    path = report_dir() / HEADER_FILE
    if process_index() != 0:
        return path
    gpus = gpu_info()
    data = {"start_time": time.time(), "preset": preset,
            "hourly_cost": float(hourly) if hourly is not None else hourly_cost(gpus),
            "git": git_info(), "hardware": hardware_info(), "software": software_versions(),
            "code": code_size()}
    path.write_text(json.dumps(data, indent=1), encoding="utf-8")
    return path


def read_header() -> dict | None:
    path = get_base_dir() / "report" / HEADER_FILE
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _fmt_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, m, s = seconds // 3600, seconds % 3600 // 60, seconds % 60
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


# ---------------------------------------------------------------------------------------------------------------
# Reading sections back

def parse_section(text: str) -> dict:
    """The `- key: value` lines of a section as {key: value string} (tables and paragraphs are ignored)."""
    out = {}
    for line in text.splitlines():
        if line.startswith("- ") and ": " in line:
            k, v = line[2:].split(": ", 1)
            out[k.strip()] = v.strip()
    return out


def _section_time(text: str) -> float | None:
    m = re.search(r"^timestamp: (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)", text, re.M)
    if not m:
        return None
    return time.mktime(time.strptime(m.group(1), "%Y-%m-%d %H:%M:%S"))


def _stage_of(title: str) -> str | None:
    """'Chat evaluation sft' -> 'SFT'; 'Base model evaluation' -> 'BASE'; other sections -> None."""
    t = title.lower().strip()
    if t == "base model evaluation":
        return "BASE"
    m = re.fullmatch(r"chat evaluation (\w+)", t)
    if m and m.group(1).upper() in SUMMARY_STAGES:
        return m.group(1).upper()
    return None


def summary_values(sections: list[tuple[str, str]]) -> dict:
    """{row: {stage: value string}} for the summary table, from the evaluation sections (later ones win)."""
    table = {row: {} for row in SUMMARY_ROWS}
    for title, text in sections:
        stage = _stage_of(title)
        if stage is None:
            continue
        kv = parse_section(text)
        if stage == "BASE" and "CORE metric" in kv:
            table["CORE"]["BASE"] = kv["CORE metric"]
        for row in SUMMARY_ROWS[1:]:
            v = kv.get(row)
            if v is not None and v != "None":
                table[row][stage] = v
    return table


def summary_markdown(sections: list[tuple[str, str]], header: dict | None, end_time: float | None = None) -> str:
    values = summary_values(sections)
    lines = ["## Summary", "", "| Metric | " + " | ".join(SUMMARY_STAGES) + " |",
             "|" + "---|" * (len(SUMMARY_STAGES) + 1)]
    for row in SUMMARY_ROWS:
        lines.append(f"| {row} | " + " | ".join(values[row].get(s, "-") for s in SUMMARY_STAGES) + " |")
    lines.append("")
    lines.append("'-': not measured at that stage; 'skipped': the task's data was not available (offline).")
    lines.append("")
    times = [t for t in (_section_time(x) for _, x in sections) if t is not None]
    start = header.get("start_time") if header else None
    end = end_time if end_time is not None else (max(times) if times else None)
    if start is not None and end is not None:
        # section timestamps are whole seconds (truncated): compare the start at the same resolution, or a
        # report written within the start's second reads up to a second short
        wall = max(0.0, end - (int(start) if end_time is None else start))
        rate = header.get("hourly_cost") or 0.0
        lines.append(f"Total wall clock time: {_fmt_duration(wall)}")
        lines.append(f"Estimated cost: ${wall / 3600 * rate:,.2f} (at ${rate:,.2f}/hour)")
    else:
        lines.append("Total wall clock time: unknown (no header: run `python -m scripts.report reset` at the start)")
    return "\n".join(lines) + "\n"


def header_markdown(header: dict | None, generated: float | None = None) -> str:
    generated = generated or time.time()
    lines = ["# nanochat-jax training report", "",
             f"Generated: {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(generated))}", ""]
    if not header:
        return "\n".join(lines + ["(no environment header recorded)", ""])
    g, hw, sw, code = header.get("git", {}), header.get("hardware", {}), header.get("software", {}), \
        header.get("code", {})
    lines += ["## Environment", "",
              f"- git commit: {g.get('commit')}" + (f" on {g['branch']}" if g.get("branch") else "")
              + (f" ({g['message']})" if g.get("message") else ""),
              f"- started: {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(header['start_time']))}"]
    if header.get("preset"):
        lines.append(f"- preset: {header['preset']}")
    lines += ["", "Hardware:", ""] + [f"- {k}: {v}" for k, v in hw.items()]
    lines += [f"- hourly cost: ${header.get('hourly_cost', 0.0):,.2f}", ""]
    lines += ["Software:", "", "- " + ", ".join(f"{k} {v}" for k, v in sw.items()), ""]
    if code:
        lines += ["Code size (tracked .py/.rs/.sh/.html/.toml):", "",
                  f"- characters: {code['characters']:,}", f"- lines: {code['lines']:,}",
                  f"- files: {code['files']:,}", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# Plots from the JSONL metrics that MetricsLogger writes beside its TensorBoard files

def read_metrics(path) -> dict[str, tuple[list, list]]:
    """{tag: (steps, values)} from one metrics.jsonl; a step logged twice (a resumed run) keeps its last value."""
    by_tag: dict[str, dict[int, float]] = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                rec = json.loads(line)
            except ValueError:
                continue  # a line cut by a kill
            if "tag" in rec:  # text records
                continue
            step = rec.get("step")
            for k, v in rec.items():
                if k in ("step", "time"):
                    continue
                try:
                    by_tag.setdefault(k, {})[int(step)] = float(v)
                except (TypeError, ValueError):
                    continue
    return {k: (sorted(d), [d[s] for s in sorted(d)]) for k, d in by_tag.items()}


def latest_metrics(stage: str) -> Path | None:
    """The newest metrics.jsonl under `<base dir>/tensorboard/<stage>/`."""
    d = get_base_dir() / "tensorboard" / stage
    files = sorted(d.glob("*/metrics.jsonl"), key=lambda p: p.stat().st_mtime) if d.is_dir() else []
    return files[-1] if files else None


def make_plots(out_dir, stages=TRAIN_STAGES) -> tuple[list[tuple[str, Path]], list[tuple[str, str]]]:
    """One PNG per training stage with metrics: train loss (per step and smoothed), validation, evaluation
    accuracies, RL reward, LR schedule. Returns ([(stage, path)], [(stage, why it has no plot)])."""
    # matplotlib takes ~0.5 s to import: paid here, when plots are drawn, not by every stage that logs a section
    from nanochat_jax.report import plot
    made, skipped = [], []
    for stage in stages:
        src = latest_metrics(stage)
        if src is None:
            skipped.append((stage, f"no metrics.jsonl under tensorboard/{stage}/"))
            continue
        panels = plot.stage_panels(stage, read_metrics(src))
        if not panels:
            skipped.append((stage, f"no finite train/val/eval values in {src.parent.name}/metrics.jsonl"))
            continue
        path = Path(out_dir) / f"{stage}_curves.png"
        made.append((stage, plot.write_figure(path, panels, f"{stage} training ({src.parent.name})")))
    return made, skipped


# ---------------------------------------------------------------------------------------------------------------
# report.md

def stage_timings() -> list[dict]:
    """Per-stage wall time recorded by run_speedrun.sh (`<base dir>/speedrun/<stage>.done`: `seconds=N`)."""
    d = get_base_dir() / "speedrun"
    rows = []
    for p in sorted(d.glob("*.done"), key=lambda p: p.stat().st_mtime) if d.is_dir() else []:
        kv = dict(line.split("=", 1) for line in p.read_text().splitlines() if "=" in line)
        try:
            rows.append({"stage": p.stem, "seconds": float(kv.get("seconds", "nan"))})
        except ValueError:
            continue
    return rows


def generate_report(out_path=None, plots: bool = True) -> Path:
    """Stitch `report.md` (default `<base dir>/report/report.md`): header, summary, plots, every stage's section.
    The plots are PNG files beside it, linked by relative path. Returns the report's path."""
    out_path = Path(out_path) if out_path else report_dir() / "report.md"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    header = read_header()
    sections = read_sections()
    parts = [header_markdown(header), summary_markdown(sections, header)]
    timings = stage_timings()
    if timings:
        rate = (header or {}).get("hourly_cost") or 0.0
        parts.append(render("Stage timings", {"stages": [
            {"stage": r["stage"], "wall time": _fmt_duration(r["seconds"]),
             "est. cost ($)": f"{r['seconds'] / 3600 * rate:.2f}"} for r in timings]},
            timestamp=time.strftime("%Y-%m-%d %H:%M:%S")))
    if plots:
        made, skipped = make_plots(out_path.parent)
        lines = ["## Plots", ""]
        for stage, p in made:
            lines += [f"![{stage} curves]({p.name})", ""]
        if not made:
            lines.append("(no training metrics found under the base dir's tensorboard/)")
        if made and skipped:
            lines.append("Not plotted: " + "; ".join(f"{stage} ({why})" for stage, why in skipped) + ".")
        parts.append("\n".join(lines) + "\n")
    parts += [text for _, text in sections]
    tmp = out_path.with_suffix(".md.tmp")
    tmp.write_text("\n".join(p.rstrip() + "\n" for p in parts), encoding="utf-8")
    tmp.replace(out_path)
    return out_path
