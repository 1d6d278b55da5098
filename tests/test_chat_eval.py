"""Chat evaluation: the categorical argmax over letter tokens, batched generation equal to one-by-one, ChatCORE."""

import numpy as np
import pytest

from nanochat_jax.evaluation import chat_eval
from nanochat_jax.tasks.gsm8k import GSM8K
from nanochat_jax.tasks.mc import MultipleChoice
from tests.chat_fixtures import gsm8k_rows, tiny_config, tiny_params, tiny_tokenizer


@pytest.fixture(scope="module")
def tiny():
    tok = tiny_tokenizer()
    cfg = tiny_config(tok, seq_len=128)
    return tok, cfg, tiny_params(cfg, seed=5)


def test_categorical_is_argmax_over_letter_logits(tiny):
    from nanochat_jax import model
    tok, cfg, params = tiny
    rows = [{"question": f"Which is {i}?", "choices": ["w", "x", "y", "z"], "letters": ("A", "B", "C", "D"),
             "answer": "ABCD"[i % 4]} for i in range(12)]
    task = MultipleChoice(rows, name="fixture-mc")
    correct, total = chat_eval.run_categorical(task, params, cfg, tok, batch_size=5)
    want = 0
    ids = chat_eval.letter_ids(tok, "ABCD")
    for i in range(12):
        conv = task[i]
        p = tok.render_for_completion(conv)
        logits = np.asarray(model.forward(params, np.asarray([p], np.int32), cfg))[0, -1]
        want += "ABCD"[int(np.argmax(logits[ids]))] == conv["messages"][-1]["content"]
    assert total == 12 and correct == want


def test_generative_batched_equals_one_by_one(tiny):
    from nanochat_jax.infer.engine import Engine
    tok, cfg, params = tiny
    task = GSM8K(rows=gsm8k_rows(6))
    engine = Engine(params, cfg, tok, max_batch=16)
    solved_b, n = chat_eval.run_generative(task, engine, tok, batch_size=16, max_tokens=12)
    assert n == 6
    # the same completions one prompt at a time
    got_batched = engine.generate_batch([tok.render_for_completion(task[i]) for i in range(6)], max_tokens=12,
                                        temperature=0.0)
    for i in range(6):
        alone, _ = engine.generate(tok.render_for_completion(task[i]), max_tokens=12, temperature=0.0)
        assert got_batched[i][0] == alone[0][len(tok.render_for_completion(task[i])):]
    solved_1, _ = chat_eval.run_generative(task, engine, tok, batch_size=1, max_tokens=12)
    assert solved_1 == solved_b


def test_chatcore_centered_and_only_when_all_ran():
    base = {"ARC-Easy": 0.25, "GSM8K": 0.0}
    assert chat_eval.chatcore({"ARC-Easy": 0.5, "GSM8K": 0.1}, base) == pytest.approx((1 / 3 + 0.1) / 2)
    assert chat_eval.chatcore({"ARC-Easy": 0.5, "GSM8K": None}, base) is None


def test_a_long_task_prints_its_progress(monkeypatch):
    """evaluate_tasks logs `name: done/total problems` while a task runs (every progress_every seconds), so a
    GSM8K or HumanEval run that takes minutes is not silent."""
    from types import SimpleNamespace

    class QuickEngine:
        def fit_conversation(self, conversation, max_tokens):
            return [1]

        def generate_batch(self, prompts, num_samples=1, **kwargs):
            return [[[]] * num_samples for _ in prompts]

    monkeypatch.setattr(chat_eval, "get_task", lambda name, split: GSM8K(rows=gsm8k_rows(5)))
    lines = []
    results, notes = chat_eval.evaluate_tasks(["GSM8K"], None, None, SimpleNamespace(decode=lambda ids: ""),
                                              QuickEngine, batch_size=2, log=lines.append, progress_every=0)
    assert [line.split(" (")[0] for line in lines[:-1]] == ["GSM8K: 2/5 problems", "GSM8K: 4/5 problems"]
    assert lines[-1].startswith("GSM8K: 0.0000 (0/5)") and results == {"GSM8K": 0.0}


def test_humaneval_is_skipped_with_the_reason_where_there_is_no_sandbox(monkeypatch):
    """Model-written code never runs unsandboxed: without bubblewrap HumanEval is reported skipped (with the
    sandbox's own reason) before any generation, and the other tasks still run."""
    from types import SimpleNamespace

    from nanochat_jax.tasks.humaneval import HumanEval

    def no_engine():
        raise AssertionError("no generation may start for a task that cannot be scored")

    monkeypatch.setattr(chat_eval, "sandbox_problem", lambda: "bwrap not found: apt-get install bubblewrap")
    monkeypatch.setattr(chat_eval, "get_task", lambda name, split: HumanEval(rows=[]))
    lines = []
    results, notes = chat_eval.evaluate_tasks(["HumanEval"], None, None, SimpleNamespace(decode=lambda ids: ""),
                                              no_engine, log=lines.append)
    assert results == {"HumanEval": None}
    assert notes["HumanEval"] == "skipped: no code sandbox (bwrap not found: apt-get install bubblewrap)"
    assert lines == ["HumanEval: " + notes["HumanEval"]]
