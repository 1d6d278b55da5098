"""The DCLM CORE metric (arXiv:2406.11794), scored as nanochat scores it.

The eval bundle (`eval_bundle.zip`, ~162 MB) is downloaded once into `<base dir>/eval_bundle/`:
    core.yaml            icl_tasks: [{label, dataset_uri, num_fewshot: [k], icl_task_type, continuation_delimiter?}]
    eval_data/<uri>      JSONL items: multiple_choice {query, choices, gold}; schema {context_options, continuation,
                         gold}; language_modeling {context, continuation}
    eval_meta_data.csv   columns "Eval Task", "Random baseline" (a percentage)
Each task's items are shuffled with Random(1337) (then cut to `max_per_task`); item i gets `num_fewshot` examples
drawn with Random(1234 + i) from the other items; every prompt starts with BOS.
- multiple choice / schema: the option whose continuation tokens have the lowest mean loss is the prediction;
- language modelling: correct when the greedy argmax reproduces every continuation token.
Centered accuracy = (acc - b) / (1 - b) with b = random baseline / 100; CORE = the mean over tasks.

The model runs on padded, fixed-shape batches: rows are sorted by length and packed into (rows, T) blocks with T a
power of two and rows * T ~ `batch_tokens`, so a whole evaluation compiles a handful of shapes.
"""

from __future__ import annotations

import csv
import json
import os
import random
import shutil
import time
import zipfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import yaml

from nanochat_jax import model
from nanochat_jax.core.common import UserError, get_base_dir, print0
from nanochat_jax.data.download import download_file

EVAL_BUNDLE_URL = "https://karpathy-public.s3.us-west-2.amazonaws.com/eval_bundle.zip"  # nanochat's address
TASK_TYPES = ("multiple_choice", "schema", "language_modeling")


# ---------------------------------------------------------------------------------------------------------------
# The bundle

def eval_bundle_url() -> str:
    return os.environ.get("NANOCHAT_EVAL_BUNDLE_URL") or EVAL_BUNDLE_URL


def _check_zip(path: Path):
    with zipfile.ZipFile(path) as z:
        if not any(n.endswith("core.yaml") for n in z.namelist()):
            raise UserError(f"{path} is not a CORE eval bundle (no core.yaml inside)")


def download_eval_bundle(url: str | None = None, base_dir=None) -> Path:
    """`<base dir>/eval_bundle`, downloaded and unpacked on first use (URL: $NANOCHAT_EVAL_BUNDLE_URL or nanochat's)."""
    base = Path(base_dir) if base_dir is not None else get_base_dir()
    bundle = base / "eval_bundle"
    if (bundle / "core.yaml").is_file():
        return bundle
    url = url or eval_bundle_url()
    zip_path = base / "eval_bundle.zip"
    print0(f"downloading the CORE eval bundle from {url}")
    try:
        download_file(url, zip_path, check=_check_zip)
    except (OSError, ValueError) as e:  # network errors after retries
        raise UserError(f"could not download the CORE eval bundle from {url}: {e}") from None
    tmp = base / "eval_bundle.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    with zipfile.ZipFile(zip_path) as z:
        z.extractall(tmp)
    cfg = next(iter(sorted(tmp.rglob("core.yaml"), key=lambda p: len(p.parts))), None)
    if cfg is None:
        raise UserError(f"{zip_path} holds no core.yaml")
    if bundle.exists():
        shutil.rmtree(bundle)
    cfg.parent.rename(bundle)
    shutil.rmtree(tmp, ignore_errors=True)
    zip_path.unlink(missing_ok=True)
    return bundle


def load_tasks(bundle_dir) -> list[dict]:
    """core.yaml + eval_meta_data.csv -> [{label, task_type, dataset_uri, num_fewshot, continuation_delimiter,
    random_baseline}]."""
    bundle_dir = Path(bundle_dir)
    config = yaml.safe_load((bundle_dir / "core.yaml").read_text(encoding="utf-8"))
    baselines = {}
    with open(bundle_dir / "eval_meta_data.csv", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            baselines[row["Eval Task"]] = float(row["Random baseline"])
    tasks = []
    for t in config["icl_tasks"]:
        if t["icl_task_type"] not in TASK_TYPES:
            raise UserError(f"core.yaml: task {t['label']} has unknown type {t['icl_task_type']!r}")
        if t["label"] not in baselines:
            raise UserError(f"eval_meta_data.csv has no random baseline for task {t['label']}")
        tasks.append({"label": t["label"], "task_type": t["icl_task_type"], "dataset_uri": t["dataset_uri"],
                      "num_fewshot": int(t["num_fewshot"][0]),
                      "continuation_delimiter": t.get("continuation_delimiter", " "),
                      "random_baseline": baselines[t["label"]]})
    return tasks


def load_task_data(bundle_dir, task: dict, max_per_task: int = -1) -> list[dict]:
    """The task's items, shuffled with Random(1337) as nanochat does, then cut to `max_per_task` (if > 0)."""
    path = Path(bundle_dir) / "eval_data" / task["dataset_uri"]
    with open(path, encoding="utf-8") as f:
        data = [json.loads(line) for line in f if line.strip()]
    random.Random(1337).shuffle(data)
    if max_per_task > 0:
        data = data[:max_per_task]
    return data


# ---------------------------------------------------------------------------------------------------------------
# Prompts (the same strings nanochat's jinja templates render)

def render_prompts_mc(item, delim, fewshot=()) -> list[str]:
    head = "".join(f"{ex['query']}{delim}{ex['choices'][ex['gold']]}\n\n" for ex in fewshot)
    return [f"{head}{item['query']}{delim}{choice}" for choice in item["choices"]]


def render_prompts_schema(item, delim, fewshot=()) -> list[str]:
    head = "".join(f"{ex['context_options'][ex['gold']]}{delim}{ex['continuation']}\n\n" for ex in fewshot)
    return [f"{head}{ctx}{delim}{item['continuation']}" for ctx in item["context_options"]]


def render_prompts_lm(item, delim, fewshot=()) -> list[str]:
    """[prompt without the continuation (stripped), prompt with it]; contexts are trimmed."""
    head = "".join(f"{ex['context'].strip()}{delim}{ex['continuation']}\n\n" for ex in fewshot)
    without = f"{head}{item['context'].strip()}{delim}"
    return [without.strip(), without + item["continuation"]]


def find_common_length(seqs, direction="left") -> int:
    """Length of the common prefix ('left') or suffix ('right') of token sequences."""
    min_len = min(len(s) for s in seqs)
    idx = range(min_len) if direction == "left" else range(-1, -min_len - 1, -1)
    for i, j in enumerate(idx):
        if not all(s[j] == seqs[0][j] for s in seqs):
            return i
    return min_len


def item_rows(idx: int, data: list[dict], task: dict, tokenizer, max_len: int | None = None):
    """Token rows of item `idx`: [(tokens, start, end)] with the continuation at tokens[start:end], and its gold."""
    item = data[idx]
    fewshot = []
    if task["num_fewshot"] > 0:
        rng = random.Random(1234 + idx)
        others = [i for i in range(len(data)) if i != idx]
        fewshot = [data[i] for i in rng.sample(others, min(task["num_fewshot"], len(others)))]
    kind, delim = task["task_type"], task["continuation_delimiter"]
    bos = tokenizer.get_bos_token_id()
    if kind == "multiple_choice":
        tokens = tokenizer.encode(render_prompts_mc(item, delim, fewshot), prepend=bos)
        start = find_common_length(tokens, "left")
        rows = [(t, start, len(t)) for t in tokens]
    elif kind == "schema":
        tokens = tokenizer.encode(render_prompts_schema(item, delim, fewshot), prepend=bos)
        suffix = find_common_length(tokens, "right")
        rows = [(t, len(t) - suffix, len(t)) for t in tokens]
    else:
        without, with_ = tokenizer.encode(render_prompts_lm(item, delim, fewshot), prepend=bos)
        if not (len(without) < len(with_) and with_[:len(without)] == without):
            raise ValueError(f"{task['label']} item {idx}: the prompt without the continuation does not tokenize "
                             f"to a prefix of the prompt with it")
        rows = [(with_, len(without), len(with_))]
    if max_len is not None:  # keep the last max_len tokens, shifting the indices (nanochat, for short models)
        rows = [(t[-max_len:], s - max(0, len(t) - max_len), e - max(0, len(t) - max_len)) for t, s, e in rows]
    return rows, item.get("gold")


# ---------------------------------------------------------------------------------------------------------------
# Scoring rows with the model

def _bucket(n: int, min_len: int = 32) -> int:
    return max(min_len, 1 << (n - 1).bit_length())


class ForwardScorer:
    """rows [(tokens, start, end)] -> (mean loss over the continuation, greedy argmax reproduces it) per row.

    forward_fn(params, tokens (B, T) int32) -> logits (B, T, V). The position t predicts token t+1, so the
    continuation tokens[start:end] is scored by positions start-1 .. end-2.
    """

    def __init__(self, forward_fn, params, pad_id: int, batch_tokens: int = 16384):
        self.params = params
        self.pad_id = int(pad_id)
        self.batch_tokens = batch_tokens

        @jax.jit
        def score(params, tokens, start, end):
            logits = forward_fn(params, tokens).astype(jnp.float32)       # (B, T, V)
            targets = jnp.roll(tokens, -1, axis=1)                          # position t predicts t+1
            nll = jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, targets[..., None], -1)[..., 0]
            pos = jnp.arange(tokens.shape[1])[None, :]
            mask = (pos >= start[:, None] - 1) & (pos < end[:, None] - 1)
            count = mask.sum(-1)
            mean = jnp.where(count > 0, (nll * mask).sum(-1) / jnp.maximum(count, 1), jnp.inf)
            greedy = jnp.all((jnp.argmax(logits, -1) == targets) | ~mask, axis=-1)
            return mean, greedy

        self._score = score

    def __call__(self, rows):
        n = len(rows)
        means, greedy = np.zeros(n, np.float64), np.zeros(n, bool)
        order = sorted(range(n), key=lambda i: -len(rows[i][0]))
        i = 0
        while i < n:
            T = _bucket(len(rows[order[i]][0]))
            B = max(1, self.batch_tokens // T)
            chunk = order[i:i + B]
            tokens = np.full((B, T), self.pad_id, np.int32)
            start, end = np.ones(B, np.int32), np.ones(B, np.int32)   # padding rows score nothing
            for r, j in enumerate(chunk):
                t, s, e = rows[j]
                tokens[r, :len(t)] = t
                start[r], end[r] = s, e
            m, g = self._score(self.params, tokens, start, end)
            m, g = np.asarray(m), np.asarray(g)
            for r, j in enumerate(chunk):
                means[j], greedy[j] = m[r], g[r]
            i += len(chunk)
        return means, greedy


def evaluate_task(data: list[dict], task: dict, tokenizer, scorer, max_len: int | None = None) -> float:
    """Accuracy of the scorer on one task's items."""
    rows, spans, golds = [], [], []
    for idx in range(len(data)):
        r, gold = item_rows(idx, data, task, tokenizer, max_len)
        spans.append((len(rows), len(rows) + len(r)))
        rows += r
        golds.append(gold)
    if not rows:
        return 0.0
    means, greedy = scorer(rows)
    correct = 0
    for (a, b), gold in zip(spans, golds):
        if task["task_type"] == "language_modeling":
            correct += bool(greedy[a])
        else:
            correct += int(np.argmin(means[a:b])) == gold   # first lowest mean loss, as nanochat's list.index(min)
    return correct / len(data)


def centered(accuracy: float, random_baseline_pct: float) -> float:
    b = 0.01 * random_baseline_pct
    return (accuracy - b) / (1.0 - b)


def evaluate_core(params, config, tokenizer, max_per_task: int = -1, bundle_dir=None, forward_fn=None,
                  scorer=None, batch_tokens: int = 16384, tasks: list[str] | None = None) -> dict:
    """Run every CORE task. Returns {"results": {label: acc}, "centered_results": {label: centered acc},
    "core_metric": mean centered accuracy, "seconds": wall time}.

    forward_fn(params, tokens) -> logits defaults to the model's forward. `scorer`: a ForwardScorer made once
    and passed to every periodic evaluation, so its jitted shapes compile once (its params are set to `params`);
    or any callable rows -> (mean losses, greedy ok), which replaces the model altogether (tests).
    tasks: only these labels (a debugging aid; CORE is then the mean over them).
    """
    bundle = Path(bundle_dir) if bundle_dir is not None else download_eval_bundle()
    if isinstance(scorer, ForwardScorer) and params is not None:
        scorer.params = params
    if scorer is None:
        if forward_fn is None:
            forward_fn = lambda p, t: model.forward(p, t, config)  # noqa: E731
        scorer = ForwardScorer(forward_fn, params, tokenizer.get_bos_token_id(), batch_tokens)
    results, centered_results = {}, {}
    t0 = time.time()
    for task in load_tasks(bundle):
        if tasks is not None and task["label"] not in tasks:
            continue
        t = time.time()
        data = load_task_data(bundle, task, max_per_task)
        acc = evaluate_task(data, task, tokenizer, scorer)
        results[task["label"]] = acc
        centered_results[task["label"]] = centered(acc, task["random_baseline"])
        print0(f"  {task['label']:<32} ({len(data):>5} items, {task['num_fewshot']}-shot) accuracy {acc:.4f} "
               f"centered {centered_results[task['label']]:+.4f}  [{time.time() - t:.1f}s]")
    if not centered_results:
        raise UserError("no CORE task was evaluated")
    core = sum(centered_results.values()) / len(centered_results)
    return {"results": results, "centered_results": centered_results, "core_metric": core,
            "seconds": time.time() - t0}


def write_csv(path, core: dict) -> Path:
    """nanochat's per-model CSV: Task, Accuracy, Centered, then a CORE row."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="") as f:
        f.write(f"{'Task':<35}, {'Accuracy':<10}, {'Centered':<10}\n")
        for label, acc in core["results"].items():
            f.write(f"{label:<35}, {acc:<10.6f}, {core['centered_results'][label]:<10.6f}\n")
        f.write(f"{'CORE':<35}, {'':<10}, {core['core_metric']:<10.6f}\n")
    return path

