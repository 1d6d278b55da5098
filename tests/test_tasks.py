"""Facts about nanochat_jax.tasks: scoring, rendering, mixtures, custom data validation, data download."""

import io
import json

import pytest

from hubfake import FakeHub
from nanochat_jax.core.common import UserError
from nanochat_jax.tasks import (ARC, GSM8K, HumanEval, SimpleSpelling, SpellingBee, TaskDataUnavailable, TaskMixture,
                                extract_answer, get_task, load_custom, resolve_task_names)
from nanochat_jax.tasks.gsm8k import solution_parts
from nanochat_jax.tasks.mc import MultipleChoice


# --- scoring --------------------------------------------------------------------------------------------------

def test_extract_answer():
    assert extract_answer("so the total is 3 + 4 = 7\n#### 7") == "7"
    assert extract_answer("#### 1,234.") == "1234"
    assert extract_answer("#### -5 and later #### 6") == "6"
    assert extract_answer("the answer is 7") is None  # no ####: no answer
    assert extract_answer("#### seven") is None


def test_gsm8k_scoring_and_tool_parts():
    task = GSM8K(rows=[{"question": "What is 2*3+1?", "answer": "2*3 = <<2*3=6>>6, plus 1 is <<6+1=7>>7\n#### 7"}])
    conv = task[0]
    parts = conv["messages"][1]["content"]
    assert [p["type"] for p in parts] == ["text", "python", "python_output", "text", "python", "python_output",
                                          "text"]
    assert parts[1]["text"] == "2*3" and parts[2]["text"] == "6"
    assert task.evaluate(conv, "2*3=6, 6+1=7.\n#### 7") == 1      # right
    assert task.evaluate(conv, "#### 7.0") == 1                     # same number, other spelling
    assert task.evaluate(conv, "#### 8") == 0                       # wrong
    assert task.evaluate(conv, "The answer is 7") == 0              # no ####
    assert task.evaluate(conv, "####") == 0                         # malformed
    assert task.reward(conv, "#### 7") == 1.0


def test_solution_parts_keeps_text_around_calls():
    parts = solution_parts("a <<1+1=2>>2 b")
    assert "".join(p["text"] for p in parts if p["type"] == "text") == "a 2 b"


def test_multiple_choice_rendering_and_scoring():
    task = MultipleChoice([{"question": "2+2?", "choices": ["3", "4", "5", "6"], "letters": ["A", "B", "C", "D"],
                            "answer": "B"}], name="toy")
    conv = task[0]
    user = conv["messages"][0]["content"]
    assert user.startswith("Multiple Choice question: 2+2?\n- 3=A\n- 4=B\n")
    assert user.endswith("Respond only with the letter of the correct answer.")
    assert conv["letters"] == ["A", "B", "C", "D"] and task.eval_type == "categorical"
    assert task.evaluate(conv, "B") == 1 and task.evaluate(conv, " B ") == 1
    assert task.evaluate(conv, "A") == 0 and task.evaluate(conv, "B is right") == 0


def test_spelling_tasks_score_their_own_answers():
    bee = SpellingBee(size=20)
    for conv in bee:
        ref = "".join(p["text"] for p in conv["messages"][1]["content"])
        assert bee.evaluate(conv, ref) == 1
        n = int(extract_answer(ref))
        assert bee.evaluate(conv, f"#### {n + 1}") == 0
        word = conv["messages"][1]["content"][1]["text"].split("'")[1]
        letter = conv["messages"][1]["content"][1]["text"].split("'")[3]
        assert n == word.count(letter)
    simple = SimpleSpelling(size=5)
    conv = simple[0]
    assert simple.evaluate(conv, conv["messages"][1]["content"]) == 1
    assert simple.evaluate(conv, "x,y,z") == 0
    # train and test streams differ, and generation is deterministic
    assert SpellingBee(size=5, split="test")[0] != SpellingBee(size=5)[0]
    assert SpellingBee(size=5)[3] == SpellingBee(size=5)[3]


HUMANEVAL_ROW = {"task_id": "t/0", "prompt": "import math\n\ndef add(a, b):\n    \"\"\"Add.\"\"\"\n",
                 "canonical_solution": "    return a + b\n", "entry_point": "add",
                 "test": "def check(f):\n    assert f(1, 2) == 3\n    assert f(-1, 1) == 0\n"}


def test_humaneval_scoring_in_sandbox():
    pytest.importorskip("nanochat_jax.infer.execution")
    task = HumanEval(rows=[HUMANEVAL_ROW], timeout=3.0)
    conv = task[0]
    assert task.evaluate(conv, conv["messages"][1]["content"]) == 1                       # right
    assert task.evaluate(conv, "```python\ndef add(a, b):\n    return a - b\n```") == 0  # wrong
    assert task.evaluate(conv, "def add(a, b) return") == 0                              # malformed
    assert task.evaluate(conv, "def add(a, b):\n    while True:\n        pass\n") == 0    # times out


# --- mixtures ---------------------------------------------------------------------------------------------------

def test_mixture_is_deterministic_covers_everything_and_oversamples():
    a, b = SimpleSpelling(size=30), SpellingBee(size=10)
    m1, m2 = TaskMixture([a, b, b]), TaskMixture([a, b, b])
    assert len(m1) == 50
    assert [m1[i] for i in range(len(m1))] == [m2[i] for i in range(len(m2))]
    seen = [json.dumps(m1[i], sort_keys=True) for i in range(len(m1))]
    for conv in list(a) + list(b):
        assert json.dumps(conv, sort_keys=True) in seen
    from collections import Counter
    counts = Counter(t for t, _ in m1.index)
    assert counts == {0: 30, 1: 10, 2: 10}  # b listed twice: twice its share
    assert [t for t, _ in m1.index[:10]] != sorted(t for t, _ in m1.index[:10])  # shuffled, not blocked


# --- custom data --------------------------------------------------------------------------------------------------

def test_custom_json_prompt_response(tmp_path):
    p = tmp_path / "sft.json"
    p.write_text(json.dumps([{"prompt": "hi", "response": "hello!"}, {"prompt": "2+2?", "response": "4"}]))
    convs = load_custom(p)
    assert convs[1]["messages"] == [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]


@pytest.mark.parametrize("lines,msg", [
    ([{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
      {"messages": [{"role": "assistant", "content": "b"}]}], "line 2: message 1 has role 'assistant'"),
    ([{"messages": [{"role": "user", "content": "  "}]}], "line 1: message 1 has empty content"),
    ([{"text": "no messages"}], "line 1: missing field 'messages'"),
    ([{"prompt": "p"}], "line 1: missing field 'response'"),
])
def test_custom_jsonl_bad_input_names_the_line(tmp_path, lines, msg):
    p = tmp_path / "sft.jsonl"
    p.write_text("\n".join(json.dumps(x) for x in lines))
    with pytest.raises(UserError, match=msg):
        load_custom(p)


def test_custom_json_bad_item(tmp_path):
    p = tmp_path / "sft.json"
    p.write_text(json.dumps([{"prompt": "a", "response": "b"}, {"prompt": "x"}]))
    with pytest.raises(UserError, match="item 2: missing field 'response'"):
        load_custom(p)
    with pytest.raises(UserError, match="unknown file type"):
        load_custom(tmp_path.joinpath("x.csv").write_text("a") and tmp_path / "x.csv")


def test_task_names():
    assert resolve_task_names("arc,mmlu") == ["ARC-Easy", "ARC-Challenge", "MMLU"]
    assert resolve_task_names(None)[0] == "ARC-Easy"
    with pytest.raises(UserError, match="unknown task"):
        resolve_task_names("nope")


# --- data download from a fake Hugging Face Hub (tests/hubfake.py) -----------------------------------------------

@pytest.fixture()
def hub(monkeypatch, base_dir):
    """A fake Hub on 127.0.0.1 (HF_ENDPOINT) serving an ARC parquet export built here."""
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    rows = [{"id": "q1", "question": "Which is a fruit?",
             "choices": {"text": ["rock", "apple", "car", "cloud"], "label": ["A", "B", "C", "D"]}, "answerKey": "B"},
            {"id": "q2", "question": "Odd one?", "choices": {"text": ["1", "2", "3"], "label": ["1", "2", "3"]},
             "answerKey": "2"}]
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buf)
    server = FakeHub({"ARC-Easy/test-00000-of-00001.parquet": buf.getvalue()})
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.delenv("NANOCHAT_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    yield server
    server.close()


def test_arc_downloads_through_huggingface_hub_and_caches(hub, base_dir, monkeypatch):
    task = ARC("ARC-Easy", "test")
    assert len(task) == 2
    assert task[0]["messages"][1]["content"] == "B"
    assert task[1]["letters"] == ["1", "2", "3"]
    assert hub.paths_requested("GET") == ["/datasets/allenai/ai2_arc/resolve/main/ARC-Easy/test-00000-of-00001.parquet"]
    hub.close()  # cached now (the Hugging Face cache): works without the server, and offline
    assert len(get_task("ARC-Easy", "test")) == 2
    monkeypatch.setenv("NANOCHAT_OFFLINE", "1")
    assert len(get_task("ARC-Easy", "test")) == 2
    with pytest.raises(TaskDataUnavailable, match="ARC-Challenge.*not in the cache, and offline"):
        ARC("ARC-Challenge", "test")


def test_missing_task_data_is_unavailable_at_once(hub):
    with pytest.raises(TaskDataUnavailable, match="allenai/ai2_arc/ARC-Challenge/test-00000-of-00001.parquet: "
                                                  "HTTP 404"):
        ARC("ARC-Challenge", "test")
    assert len(hub.requests) == 1    # a 404 is final: no retry
