"""evaluation/core.py: CORE prompts, scoring of the three task types, centered accuracy, bundle download."""

import http.server
import io
import json
import random
import threading
import zipfile

import jax.numpy as jnp
import numpy as np
import pytest

from nanochat_jax.evaluation import core

V = 128
BOS = 1


class CharTokenizer:
    """One token per ASCII character; BOS = 1."""

    def get_bos_token_id(self):
        return BOS

    def encode(self, text, prepend=None, append=None):
        if isinstance(text, list):
            return [self.encode(t, prepend, append) for t in text]
        return ([prepend] if prepend is not None else []) + [ord(c) for c in text]


def bigram_forward(table, tokens):
    """A fake model: the logits after token x are table[x], so each next-token loss is set by the table."""
    return table[tokens]


def make_table(favoured):
    """table with ~+8 on each (prev char, next char) in `favoured`, 0 elsewhere."""
    t = np.zeros((V, V), np.float32)
    for i, (a, b) in enumerate(favoured):
        t[ord(a), ord(b)] = 8.0 + 0.1 * i   # later pairs win ties
    return jnp.asarray(t)


def scorer_for(table, batch_tokens=256):
    return core.ForwardScorer(bigram_forward, table, BOS, batch_tokens=batch_tokens)


MC = {"label": "mc", "task_type": "multiple_choice", "num_fewshot": 0, "continuation_delimiter": " ",
      "random_baseline": 50.0, "dataset_uri": "mc.jsonl"}
SCHEMA = {"label": "schema", "task_type": "schema", "num_fewshot": 0, "continuation_delimiter": " ",
          "random_baseline": 50.0, "dataset_uri": "schema.jsonl"}
LM = {"label": "lm", "task_type": "language_modeling", "num_fewshot": 0, "continuation_delimiter": " ",
      "random_baseline": 0.0, "dataset_uri": "lm.jsonl"}
MC_DATA = [{"query": "Q1:", "choices": ["ab", "cd"], "gold": 1},    # the model prefers "cd": right
           {"query": "Q2:", "choices": ["cd", "ab"], "gold": 1},    # prefers "cd" = choice 0: wrong
           {"query": "Q3:", "choices": ["ab", "cdq", "x"], "gold": 1}]   # mean (not sum) loss: "cdq" still wins
SCHEMA_DATA = [{"context_options": ["The cat", "The dog"], "continuation": "ran", "gold": 1},
               {"context_options": ["The dog", "A cow"], "continuation": "ran", "gold": 1}]
LM_DATA = [{"context": "xy  ", "continuation": "zz"},     # greedy reproduces " zz" after y: right
           {"context": "xw", "continuation": "zz"},       # after w the argmax is token 0: wrong
           {"context": "xy", "continuation": "zq"}]       # misses the last token: wrong
FAVOURED = [(" ", "c"), ("c", "d"), ("d", "q"), ("g", " "), ("y", " "), (" ", "z"), ("z", "z")]


# ---------------------------------------------------------------------------------------------------------------

def test_prompts_match_nanochat_templates():
    jinja2 = pytest.importorskip("jinja2")
    mc_t = jinja2.Template("""
{%- for example in fewshot_examples -%}
{{ example.query }}{{ continuation_delimiter }}{{ example.choices[example.gold] }}

{% endfor -%}
{{ item.query }}{{ continuation_delimiter }}{{ choice }}""".strip())
    lm_t = jinja2.Template("""
{%- for example in fewshot_examples -%}
{{ example.context | trim }}{{ continuation_delimiter }}{{ example.continuation }}

{% endfor -%}
{{ item.context | trim }}{{ continuation_delimiter }}{% if include_continuation %}{{ item.continuation }}{% endif %}""".strip())
    schema_t = jinja2.Template("""
{%- for example in fewshot_examples -%}
{{ example.context_options[example.gold] }}{{ continuation_delimiter }}{{ example.continuation }}

{% endfor -%}
{{ context }}{{ continuation_delimiter }}{{ item.continuation }}""".strip())
    for delim in (" ", "\nAnswer: "):
        for shots in ([], MC_DATA[1:]):
            want = [mc_t.render(choice=c, fewshot_examples=shots, continuation_delimiter=delim, item=MC_DATA[0])
                    for c in MC_DATA[0]["choices"]]
            assert core.render_prompts_mc(MC_DATA[0], delim, shots) == want
        shots = LM_DATA[1:]
        item = {"context": " ctx with spaces  ", "continuation": "cont"}
        kw = dict(fewshot_examples=shots, continuation_delimiter=delim, item=item)
        assert core.render_prompts_lm(item, delim, shots) == [lm_t.render(include_continuation=False, **kw).strip(),
                                                              lm_t.render(include_continuation=True, **kw)]
        shots = SCHEMA_DATA[1:]
        want = [schema_t.render(context=c, fewshot_examples=shots, continuation_delimiter=delim, item=SCHEMA_DATA[0])
                for c in SCHEMA_DATA[0]["context_options"]]
        assert core.render_prompts_schema(SCHEMA_DATA[0], delim, shots) == want


def test_item_rows_spans_and_fewshot_sampling():
    tok = CharTokenizer()
    rows, gold = core.item_rows(0, MC_DATA, MC, tok)
    assert gold == 1
    assert [r[0] for r in rows] == [[BOS] + [ord(c) for c in "Q1: ab"], [BOS] + [ord(c) for c in "Q1: cd"]]
    assert [(s, e) for _, s, e in rows] == [(5, 7), (5, 7)]      # the choice tokens, after "<bos>Q1: "
    rows, _ = core.item_rows(0, SCHEMA_DATA, SCHEMA, tok)
    assert [(s, e) for _, s, e in rows] == [(8, 12), (8, 12)]     # the common suffix " ran"
    rows, _ = core.item_rows(1, LM_DATA, LM, tok)
    assert rows == [([BOS] + [ord(c) for c in "xw zz"], 3, 6)]
    # few-shot: Random(1234 + i) over the other items, BOS first
    data = [{"query": f"q{i}", "choices": ["a", "b"], "gold": i % 2} for i in range(10)]
    task = {**MC, "num_fewshot": 3}
    rows, _ = core.item_rows(4, data, task, tok)
    picked = random.Random(1234 + 4).sample([i for i in range(10) if i != 4], 3)
    text = "".join(chr(t) for t in rows[0][0][1:])
    assert text == "".join(f"q{i} {'ab'[i % 2]}\n\n" for i in picked) + "q4 a"
    # cropping to max_len keeps the end and shifts the span
    rows, _ = core.item_rows(0, MC_DATA, MC, tok, max_len=4)
    assert rows[0] == ([ord(c) for c in ": ab"], 2, 4)


def test_forward_scorer_matches_numpy():
    rng = np.random.default_rng(0)
    table = rng.normal(size=(V, V)).astype(np.float32)
    table[5, 7] = 20.0
    rows = []
    for n in (3, 9, 40, 70, 5, 33):
        t = list(rng.integers(2, V, n))
        s = int(rng.integers(1, n))
        rows.append((t, s, n))
    rows.append(([BOS, 5, 7, 5, 7], 2, 5))   # greedy: 5 -> 7 favoured; 7 -> 5 ?
    means, greedy = scorer_for(jnp.asarray(table), batch_tokens=128)(rows)
    logp = table - np.log(np.exp(table.astype(np.float64)).sum(-1, keepdims=True))
    for (t, s, e), m, g in zip(rows, means, greedy):
        nll = [-logp[t[j], t[j + 1]] for j in range(s - 1, e - 1)]
        ok = all(np.argmax(table[t[j]]) == t[j + 1] for j in range(s - 1, e - 1))
        assert m == pytest.approx(np.mean(nll), rel=1e-5)
        assert g == ok
    assert greedy[-1] == (np.argmax(table[7]) == 5)


def test_multiple_choice_picks_lowest_mean_loss():
    acc = core.evaluate_task(MC_DATA, MC, CharTokenizer(), scorer_for(make_table(FAVOURED)))
    assert acc == pytest.approx(2 / 3)


def test_schema_scores_the_shared_continuation():
    acc = core.evaluate_task(SCHEMA_DATA, SCHEMA, CharTokenizer(), scorer_for(make_table(FAVOURED)))
    assert acc == pytest.approx(1 / 2)   # item 0: "The dog" (g -> ' ') wins = gold; item 1: no favourite -> 0


def test_language_modeling_needs_every_token_greedy():
    acc = core.evaluate_task(LM_DATA, LM, CharTokenizer(), scorer_for(make_table(FAVOURED)))
    assert acc == pytest.approx(1 / 3)


def test_centered_accuracy():
    assert core.centered(0.25, 25.0) == 0.0
    assert core.centered(1.0, 25.0) == 1.0
    assert core.centered(0.5, 0.0) == 0.5
    assert core.centered(0.4, 50.0) == pytest.approx(-0.2)


# ---------------------------------------------------------------------------------------------------------------
# A small bundle in the real format, served from 127.0.0.1

def make_bundle_zip() -> bytes:
    core_yaml = """icl_tasks:
- label: mc
  dataset_uri: mc.jsonl
  num_fewshot: [0]
  icl_task_type: multiple_choice
- label: schema
  dataset_uri: schema.jsonl
  num_fewshot: [0]
  icl_task_type: schema
- label: lm
  dataset_uri: lm.jsonl
  num_fewshot: [1]
  icl_task_type: language_modeling
  continuation_delimiter: ' '
"""
    meta = "Eval Task,Task Category,Random baseline\nmc,x,50.0\nschema,x,50.0\nlm,x,0.0\n"
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("eval_bundle/core.yaml", core_yaml)
        z.writestr("eval_bundle/eval_meta_data.csv", meta)
        for name, data in (("mc", MC_DATA), ("schema", SCHEMA_DATA), ("lm", LM_DATA)):
            z.writestr(f"eval_bundle/eval_data/{name}.jsonl", "".join(json.dumps(d) + "\n" for d in data))
    return buf.getvalue()


@pytest.fixture
def bundle_server():
    payload = make_bundle_zip()
    hits = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            hits.append(self.path)
            if self.path != "/eval_bundle.zip":
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *a):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}/eval_bundle.zip", hits
    srv.shutdown()


def test_download_and_evaluate_core(base_dir, bundle_server, monkeypatch, tmp_path):
    url, hits = bundle_server
    monkeypatch.setenv("NANOCHAT_EVAL_BUNDLE_URL", url)
    bundle = core.download_eval_bundle()
    assert bundle == base_dir / "eval_bundle" and (bundle / "core.yaml").is_file()
    assert core.download_eval_bundle() == bundle and len(hits) == 1     # cached
    tasks = core.load_tasks(bundle)
    assert [(t["label"], t["task_type"], t["num_fewshot"], t["random_baseline"]) for t in tasks] == [
        ("mc", "multiple_choice", 0, 50.0), ("schema", "schema", 0, 50.0), ("lm", "language_modeling", 1, 0.0)]
    out = core.evaluate_core(make_table(FAVOURED), None, CharTokenizer(), forward_fn=bigram_forward)
    assert set(out["results"]) == {"mc", "schema", "lm"}
    for label, acc in out["results"].items():
        base = {t["label"]: t["random_baseline"] for t in tasks}[label] / 100
        assert out["centered_results"][label] == pytest.approx((acc - base) / (1 - base))
    assert out["core_metric"] == pytest.approx(np.mean(list(out["centered_results"].values())))
    assert out["results"]["mc"] == pytest.approx(2 / 3)
    small = core.evaluate_core(make_table(FAVOURED), None, CharTokenizer(), forward_fn=bigram_forward,
                               max_per_task=1)
    assert all(acc in (0.0, 1.0) for acc in small["results"].values())
    csv_path = core.write_csv(tmp_path / "m.csv", out)
    lines = csv_path.read_text().splitlines()
    assert lines[0].split(",")[0].strip() == "Task" and lines[-1].startswith("CORE")
    assert float(lines[-1].split(",")[-1]) == pytest.approx(out["core_metric"], abs=1e-6)


def test_bad_bundle_url_is_a_user_error(base_dir, bundle_server, monkeypatch):
    from nanochat_jax.core.common import UserError
    url, _ = bundle_server
    monkeypatch.setenv("NANOCHAT_EVAL_BUNDLE_URL", url.replace("eval_bundle", "missing"))
    with pytest.raises(UserError):
        core.download_eval_bundle()


# ---------------------------------------------------------------------------------------------------------------
# End to end: scripts.base_eval on a tiny model against the served bundle

def save_tiny_base_model(tag="d2", seq_len=64):
    """A d2 model with a byte-level tokenizer (vocab 256 + 9 specials), saved as a base checkpoint."""
    import jax
    from nanochat_jax.train import checkpoint as ck
    from nanochat_jax import model
    from nanochat_jax.core.config import ModelConfig
    from nanochat_jax.data.tokenizer import Tokenizer
    tok = Tokenizer({bytes([i]): i for i in range(256)})
    config = ModelConfig.from_depth(2, d_model=64, n_heads=2, vocab_size=tok.get_vocab_size(), max_seq_len=seq_len)
    params = model.init_params(config, jax.random.PRNGKey(0))
    params = jax.tree.map(lambda p: p + 0.1 * jax.random.normal(jax.random.PRNGKey(1), p.shape), params)
    mngr = ck.CheckpointManager(ck.checkpoint_dir("base", tag), tokenizer=tok)
    mngr.save(7, {"params": params}, {}, {"model_config": config.to_dict()})
    mngr.close()
    return params, config, tok


def test_base_eval_end_to_end(base_dir, bundle_server, monkeypatch):
    from nanochat_jax import model
    from nanochat_jax.report import writer as report
    from nanochat_jax.cli import base_eval
    url, _ = bundle_server
    monkeypatch.setenv("NANOCHAT_EVAL_BUNDLE_URL", url)
    params, config, tok = save_tiny_base_model()
    out = base_eval.main(["--model-tag", "d2", "--batch-tokens", "512"])
    # the same numbers by scoring each row alone with the model (no batching, no buckets)
    scorer_one = core.ForwardScorer(lambda p, t: model.forward(p, t, config), params, BOS, batch_tokens=1)
    bundle = base_dir / "eval_bundle"
    for task in core.load_tasks(bundle):
        data = core.load_task_data(bundle, task)
        assert out["results"][task["label"]] == core.evaluate_task(data, task, tok, scorer_one)
    csv_path = base_dir / "base_eval" / "base_d2_000007.csv"
    assert csv_path.is_file()
    assert float(csv_path.read_text().splitlines()[-1].split(",")[-1]) == pytest.approx(out["core_metric"], abs=1e-6)
    (title, text), = report.read_sections()
    assert title == "Base model evaluation" and "| schema |" in text
