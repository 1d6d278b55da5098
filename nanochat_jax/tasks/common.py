"""What every task shares: the Task interface, multiple-choice rendering, answer extraction, mixtures, and fetching
task data from the Hugging Face Hub's parquet exports (huggingface_hub's cache and settings, retried).

A task is a list of conversations. `task[i]` is one conversation (nanochat's format: {"messages": [...]} plus
task-specific fields); `task.evaluate(conversation, completion)` scores a model's completion of it (1 right, 0 wrong).
`eval_type` is "categorical" (the answer is one of `conversation["letters"]`, scored from the logits of those letter
tokens) or "generative" (the engine samples a completion).
"""

from __future__ import annotations

import importlib.util
import json
import random
import re
from pathlib import Path

from nanochat_jax.core.common import UserError
from nanochat_jax.data.download import hub_download


class TaskDataUnavailable(UserError):
    """The task's data is neither cached nor downloadable (offline). Evaluations skip the task with a note."""


class Task:
    """Base class: subclasses fill `self.rows` (or override `num_examples`/`get_example`) and `evaluate`."""

    eval_type = "generative"
    name = "task"

    def __init__(self, start=0, stop=None, step=1):
        self.start, self.stop, self.step = start, stop, step

    # subclasses implement these two
    def num_examples(self) -> int:
        raise NotImplementedError

    def get_example(self, index: int) -> dict:
        raise NotImplementedError

    def evaluate(self, conversation: dict, completion: str) -> int:
        raise NotImplementedError

    # slicing view over the examples, as nanochat's tasks offer
    def _range(self):
        return range(self.start, self.num_examples() if self.stop is None else min(self.stop, self.num_examples()),
                     self.step)

    def __len__(self):
        return len(self._range())

    def __getitem__(self, i):
        return self.get_example(self._range()[i])

    def __iter__(self):
        for i in range(len(self)):
            yield self[i]


class TaskMixture(Task):
    """Several tasks shuffled together, deterministically (seed 42). List a task twice to oversample it."""

    def __init__(self, tasks, seed=42):
        super().__init__()
        self.tasks = list(tasks)
        self.index = [(t, i) for t, task in enumerate(self.tasks) for i in range(len(task))]
        random.Random(seed).shuffle(self.index)

    def num_examples(self):
        return len(self.index)

    def get_example(self, index):
        t, i = self.index[index]
        return self.tasks[t][i]


def render_mc(question: str, letters, choices) -> str:
    """nanochat's multiple-choice prompt: the question, '- choice=letter' lines, then the instruction."""
    lines = [f"Multiple Choice question: {question}"]
    lines += [f"- {choice}={letter}" for letter, choice in zip(letters, choices)]
    return "\n".join(lines) + "\n\nRespond only with the letter of the correct answer."


_ANSWER_RE = re.compile(r"####\s*(-?[0-9][0-9.,]*)")


def extract_answer(text: str) -> str | None:
    """The number after the last '####' (commas dropped, a trailing '.' dropped), or None when there is none."""
    found = _ANSWER_RE.findall(text or "")
    if not found:
        return None
    return found[-1].replace(",", "").rstrip(".")


def same_number(a: str | None, b: str | None) -> bool:
    """'18' == '18.0' == '18.00'; None never matches."""
    if a is None or b is None:
        return False
    try:
        return float(a) == float(b)
    except ValueError:
        return a == b


# ---------------------------------------------------------------------------------------------------------------
# Task data from the Hugging Face Hub (parquet exports), in the shared Hugging Face cache

def hf_file(repo: str, path: str) -> Path:
    """Local copy of file `path` of the Hub dataset `repo`, through `hub_download` (HF_TOKEN, HF_ENDPOINT,
    HF_HUB_OFFLINE and the shared cache apply; NANOCHAT_OFFLINE=1, the CPU miniature's switch, means cached or
    packaged data only). TaskDataUnavailable (one line) when it is neither cached nor downloadable."""
    try:
        return hub_download(repo, path)
    except UserError as e:
        raise TaskDataUnavailable(str(e)) from None


def read_parquet_rows(path: Path) -> list[dict]:
    import pyarrow.parquet as pq  # imported here: pyarrow is slow to import and only parquet tasks need it
    return pq.read_table(path).to_pylist()


def read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def packaged_file(package: str, *parts: str) -> Path | None:
    """A data file shipped inside an installed PyPI package, found without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    p = Path(list(spec.submodule_search_locations)[0]).joinpath(*parts)
    return p if p.exists() else None
