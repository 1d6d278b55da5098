"""The one end-to-end test of the chat chain on CPU: a tiny base checkpoint goes through mid_train, chat_sft and
chat_rl (a few steps each) and chat_eval, on fixture task data served from 127.0.0.1 (everything else 404s, so
those tasks are skipped with a note). Each stage writes checkpoints, TensorBoard curves and a report section; a
stage refuses to clobber its output dir and resumes with --resume."""

import json

import pytest

from nanochat_jax.core.common import UserError
from tests.chat_fixtures import FixtureHub, arc_rows, gsm8k_rows, save_base_checkpoint, tiny_config, tiny_params, \
    tiny_tokenizer


@pytest.fixture()
def hub(tmp_path, monkeypatch):
    h = FixtureHub()
    h.add_parquet("openai/gsm8k", "main/train-00000-of-00001.parquet", gsm8k_rows(40))
    h.add_parquet("openai/gsm8k", "main/test-00000-of-00001.parquet", gsm8k_rows(12, offset=100))
    for split, n in (("train", 40), ("test", 12)):
        h.add_parquet("allenai/ai2_arc", f"ARC-Easy/{split}-00000-of-00001.parquet", arc_rows(n))
    monkeypatch.setenv("HF_ENDPOINT", h.url)
    yield h
    h.close()


def _jsonl_tags(path):
    tags = set()
    for line in path.read_text().splitlines():
        tags |= set(json.loads(line))
    return tags


@pytest.mark.slow
def test_base_mid_sft_rl_eval_chain(base_dir, hub, tmp_path):
    from nanochat_jax.report import writer as report
    from nanochat_jax.cli import chat_eval, chat_rl, chat_sft, mid_train
    from scripts import eval as eval_alias
    tok = tiny_tokenizer()
    cfg = tiny_config(tok, depth=2, seq_len=128, recipe="2025")
    save_base_checkpoint(base_dir, tok, cfg, tiny_params(cfg), tag="d2")
    small = ["--device-batch-size", "1", "--max-seq-len", "128", "--eval-steps", "1", "--spelling-size", "40"]

    # -- mid: 3 steps ---------------------------------------------------------------------------------------------
    r = mid_train.main(small + ["--num-iterations", "3", "--eval-every", "3"])
    assert r.step == 3
    mid_dir = base_dir / "checkpoints" / "mid" / "d2"
    assert (mid_dir / "3").is_dir()
    with pytest.raises(UserError, match="--resume"):      # refuses to clobber
        mid_train.main(small + ["--num-iterations", "3"])

    # -- SFT: 2 steps, then resumed to 4 ----------------------------------------------------------------------------
    r = chat_sft.main(small + ["--num-iterations", "2", "--eval-every", "2", "--eval-metrics-every", "2",
                               "--eval-metrics-max-problems", "8"])
    assert r.step == 2
    r = chat_sft.main(small + ["--num-iterations", "4", "--eval-every", "2", "--eval-metrics-every", "-1",
                               "--resume"])
    assert r.step == 4 and [s for s, _ in r.losses] == [3, 4]
    assert (base_dir / "checkpoints" / "sft" / "d2" / "4").is_dir()

    # -- RL: 2 steps of 2 problems x 4 samples ----------------------------------------------------------------------
    out = chat_rl.main(["--num-iterations", "2", "--examples-per-step", "2", "--num-samples", "4",
                        "--device-batch-size", "1", "--max-new-tokens", "16", "--eval-every", "2",
                        "--eval-examples", "4", "--eval-samples", "2"])
    assert out["steps"] == 2 and set(out["passk"]) == {"1", "2"}
    assert (base_dir / "checkpoints" / "rl" / "d2" / "2").is_dir()
    out = chat_rl.main(["--num-iterations", "3", "--examples-per-step", "2", "--num-samples", "4",
                        "--device-batch-size", "1", "--max-new-tokens", "16", "--eval-every", "-1", "--resume"])
    assert out["steps"] == 3 and len(out["rewards"]) == 3      # resumed: two rewards from the checkpoint, one new
    assert (base_dir / "checkpoints" / "rl" / "d2" / "3").is_dir()

    # -- chat_eval on the RL model ----------------------------------------------------------------------------------
    results = chat_eval.main(["--source", "rl", "-a", "arc-easy,gsm8k,spellingbee", "--max-problems", "6",
                              "--max-new-tokens", "16"])
    assert set(results) == {"ARC-Easy", "GSM8K", "SpellingBee"}
    assert all(v is not None and 0 <= v <= 1 for v in results.values())
    # the docs' form: python -m scripts.eval --checkpoint DIR --tasks ... --report_path FILE
    md = tmp_path / "eval.md"
    eval_alias.main(["--checkpoint", str(base_dir / "checkpoints" / "sft" / "d2"), "--tasks", "arc,mmlu",
                     "--max-problems", "4", "--report_path", str(md)])
    text = md.read_text()
    assert "ARC-Easy" in text and "MMLU" in text and "skipped" in text   # ARC-Challenge: no data -> skipped

    # -- a report section per stage, TensorBoard curves per stage ---------------------------------------------------
    sections = dict(report.read_sections())
    for title in ("Midtraining", "Chat SFT", "Chat RL", "Chat evaluation rl"):
        assert title in sections, sorted(sections)
    assert "SmolTalk/train: skipped" in sections["Midtraining"]          # offline task data noted
    assert "val loss" in sections["Chat SFT"] and "pass@1" in sections["Chat RL"]
    tb = base_dir / "tensorboard"
    assert "train/loss" in _jsonl_tags(tb / "mid" / "d2" / "metrics.jsonl")
    assert {"train/loss", "val/loss"} <= _jsonl_tags(tb / "sft" / "d2" / "metrics.jsonl")
    assert {"train/reward", "eval/pass@1"} <= _jsonl_tags(tb / "rl" / "d2" / "metrics.jsonl")
    assert any(p.name.startswith("events.out.tfevents") for p in (tb / "rl" / "d2").iterdir())
