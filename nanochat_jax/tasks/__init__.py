"""Tasks for midtraining, SFT, RL and chat evaluation (one small module per kind of task).

`get_task(name, split)` builds one by its name; `EVAL_TASKS` lists what chat_eval runs, with the random-guess
baseline that ChatCORE centers against (0.25 for four-way multiple choice, 0 for open answers, as nanochat).
"""

from __future__ import annotations

from nanochat_jax.core.common import UserError
from nanochat_jax.tasks.chat import Conversations, CustomJSON, Identity, SmolTalk, hold_out, \
    identity_conversations, load_custom, validate_messages
from nanochat_jax.tasks.common import Task, TaskDataUnavailable, TaskMixture, extract_answer, render_mc
from nanochat_jax.tasks.gsm8k import GSM8K
from nanochat_jax.tasks.humaneval import HumanEval
from nanochat_jax.tasks.mc import ARC, MMLU
from nanochat_jax.tasks.spelling import SimpleSpelling, SpellingBee

# chat_eval's tasks and their random baselines
EVAL_TASKS = {"ARC-Easy": 0.25, "ARC-Challenge": 0.25, "MMLU": 0.25, "GSM8K": 0.0, "HumanEval": 0.0,
              "SpellingBee": 0.0}
# the short names the docs use
ALIASES = {"arc": ["ARC-Easy", "ARC-Challenge"], "arc-easy": ["ARC-Easy"], "arc-challenge": ["ARC-Challenge"],
           "mmlu": ["MMLU"], "gsm8k": ["GSM8K"], "humaneval": ["HumanEval"], "spellingbee": ["SpellingBee"]}


def resolve_task_names(spec: str | None) -> list[str]:
    """'arc,gsm8k' -> ['ARC-Easy', 'ARC-Challenge', 'GSM8K']; None or 'all' -> every eval task."""
    if not spec or spec == "all":
        return list(EVAL_TASKS)
    names = []
    for part in spec.replace("|", ",").split(","):
        part = part.strip()
        if not part:
            continue
        found = ALIASES.get(part.lower()) or [n for n in EVAL_TASKS if n.lower() == part.lower()]
        if not found:
            raise UserError(f"unknown task {part!r}; known: {', '.join(list(ALIASES) + list(EVAL_TASKS))}")
        names += [n for n in found if n not in names]
    return names


def get_task(name: str, split: str = "test", **kw) -> Task:
    builders = {
        "ARC-Easy": lambda: ARC("ARC-Easy", split, **kw),
        "ARC-Challenge": lambda: ARC("ARC-Challenge", split, **kw),
        "MMLU": lambda: MMLU("all" if split == "test" else "auxiliary_train", "test" if split == "test" else "train",
                             **kw),
        "GSM8K": lambda: GSM8K(split, **kw),
        "HumanEval": lambda: HumanEval(**kw),
        "SpellingBee": lambda: SpellingBee(size=kw.pop("size", 256), split=split, **kw),
        "SimpleSpelling": lambda: SimpleSpelling(size=kw.pop("size", 256), split=split, **kw),
        "SmolTalk": lambda: SmolTalk(split, **kw),
        "identity": lambda: Identity(**kw),
    }
    if name not in builders:
        raise KeyError(name)
    return builders[name]()


def prefetch_all() -> list[str]:
    """Download every task's data into the cache (for nodes prepared before a run). Returns what failed."""
    failed = []
    for name, split in [("ARC-Easy", "test"), ("ARC-Easy", "train"), ("ARC-Challenge", "test"),
                        ("ARC-Challenge", "train"), ("MMLU", "test"), ("MMLU", "train"), ("GSM8K", "test"),
                        ("GSM8K", "train"), ("HumanEval", "test"), ("SmolTalk", "train"), ("SmolTalk", "test")]:
        try:
            get_task(name, split)
        except TaskDataUnavailable as e:
            failed.append(f"{name}/{split}: {e}")
    return failed


__all__ = ["Task", "TaskMixture", "TaskDataUnavailable", "ARC", "MMLU", "GSM8K", "HumanEval", "SmolTalk",
           "SpellingBee", "SimpleSpelling", "CustomJSON", "Identity", "Conversations", "identity_conversations",
           "hold_out", "load_custom", "validate_messages", "extract_answer", "render_mc", "get_task",
           "resolve_task_names", "prefetch_all", "EVAL_TASKS", "ALIASES"]
