"""The run report: one markdown file per section under `<base dir>/report/`, written as each stage finishes.

`log("Base model training", {...})` writes `<base dir>/report/base-model-training.md`; a stage that runs again
replaces its own section. `read_sections()` reads them back (in the order they were written) so that the speedrun's
report can stitch `report.md` together; `reset()` starts a new report.
"""

from __future__ import annotations

import datetime
import re
from pathlib import Path

from nanochat_jax.common import get_base_dir, process_index


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
