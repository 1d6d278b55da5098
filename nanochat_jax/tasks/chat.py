"""Conversation datasets: SmolTalk (HuggingFaceTB/smol-smoltalk), custom SFT files, and identity conversations.

Custom data comes in the two forms the nanochat docs teach:
- JSONL, one conversation a line: {"messages": [{"role": ..., "content": ...}, ...]} or a bare list of messages;
- JSON, a list of {"prompt": ..., "response": ...} pairs.
Every conversation is validated before training starts; a bad one is refused with its line (or item) number.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from nanochat_jax.core.common import UserError
from nanochat_jax.tasks.common import Task, hf_file, read_parquet_rows


def validate_messages(messages, where: str) -> None:
    """Optional system message, then user/assistant alternating (user first), each with non-empty content."""
    if not isinstance(messages, list) or not messages:
        raise UserError(f"{where}: 'messages' must be a non-empty list")
    start = 0
    if isinstance(messages[0], dict) and messages[0].get("role") == "system":
        start = 1
    if len(messages) <= start:
        raise UserError(f"{where}: a conversation needs at least one user message")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise UserError(f"{where}: message {i + 1} needs 'role' and 'content'")
        if i >= start:
            expected = "user" if (i - start) % 2 == 0 else "assistant"
            if m["role"] != expected:
                raise UserError(f"{where}: message {i + 1} has role {m['role']!r}, expected {expected!r} "
                                f"(roles must alternate user/assistant)")
        content = m["content"]
        text = content if isinstance(content, str) else "".join(
            p.get("text", "") for p in content if isinstance(p, dict)) if isinstance(content, list) else None
        if text is None:
            raise UserError(f"{where}: message {i + 1} content must be a string")
        if not text.strip():
            raise UserError(f"{where}: message {i + 1} has empty content")


class Conversations(Task):
    """A list of ready conversations ({"messages": [...]}) - the base of SmolTalk, custom data and identity."""

    def __init__(self, conversations, name="conversations", **kw):
        super().__init__(**kw)
        self.conversations, self.name = conversations, name

    def num_examples(self):
        return len(self.conversations)

    def get_example(self, index):
        return self.conversations[index]


def SmolTalk(split="train", **kw):
    path = hf_file("HuggingFaceTB/smol-smoltalk", f"data/{split}-00000-of-00001.parquet")
    convs = [{"messages": [{"role": m["role"], "content": m["content"]} for m in r["messages"]]}
             for r in read_parquet_rows(path)]
    return Conversations(convs, name="SmolTalk", **kw)


def load_custom(path) -> list[dict]:
    """Read and validate a custom SFT file (.jsonl conversations or .json prompt/response pairs)."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"custom data {p} not found")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"custom data {p}: not UTF-8 text (byte {e.start})") from None
    convs = []
    if p.suffix == ".json":
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"{p}: invalid JSON at line {e.lineno}: {e.msg}") from None
        if not isinstance(items, list):
            raise UserError(f"{p}: expected a JSON list of {{\"prompt\", \"response\"}} objects")
        for i, item in enumerate(items, 1):
            where = f"{p} item {i}"
            if not isinstance(item, dict):
                raise UserError(f"{where}: expected an object")
            if "messages" in item:
                messages = item["messages"]
            else:
                for key in ("prompt", "response"):
                    if key not in item:
                        raise UserError(f"{where}: missing field {key!r}")
                messages = [{"role": "user", "content": item["prompt"]},
                            {"role": "assistant", "content": item["response"]}]
            validate_messages(messages, where)
            convs.append({"messages": messages})
    elif p.suffix == ".jsonl":
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            where = f"{p} line {lineno}"
            try:
                item = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{where}: invalid JSON ({e.msg})") from None
            if isinstance(item, dict) and "messages" not in item and "prompt" in item:
                if "response" not in item:
                    raise UserError(f"{where}: missing field 'response'")
                item = [{"role": "user", "content": item["prompt"]},
                        {"role": "assistant", "content": item["response"]}]
            messages = item.get("messages") if isinstance(item, dict) else item
            if messages is None:
                raise UserError(f"{where}: missing field 'messages'")
            validate_messages(messages, where)
            convs.append({"messages": messages})
    else:
        raise UserError(f"custom data {p}: unknown file type {p.suffix!r} (use .jsonl or .json)")
    if not convs:
        raise UserError(f"custom data {p} holds no conversations")
    return convs


def hold_out(conversations: list[dict], name: str, fraction: float = 0.1, most: int = 500, seed: int = 0):
    """(train, val) `Conversations`: a random `fraction` of the conversations (at most `most`) held out for
    validation and never trained on, so that the val loss measures generalization, not memory. val is None when
    fewer than 1 / fraction conversations leave none to spare."""
    n_val = min(int(len(conversations) * fraction), most)
    if n_val == 0:
        return Conversations(conversations, name=name), None
    held = set(random.Random(seed).sample(range(len(conversations)), n_val))
    train = [c for i, c in enumerate(conversations) if i not in held]
    val = [conversations[i] for i in sorted(held)]
    return Conversations(train, name=name), Conversations(val, name=f"{name}-val")


def CustomJSON(path, **kw):
    return Conversations(load_custom(path), name=f"custom:{Path(path).name}", **kw)


# ---------------------------------------------------------------------------------------------------------------
# Identity: who the model is. Written here; combined from question variants and answers, deterministically.

_IDENTITY = [
    (["Who are you?", "What are you?", "Introduce yourself.", "hi, who am I talking to?", "Tell me about yourself."],
     "I'm nanochat-jax, a small chat model. I was pretrained from scratch, then midtrained and fine-tuned to "
     "chat, all with the nanochat-jax code, which re-implements Andrej Karpathy's nanochat in JAX."),
    (["What is your name?", "Do you have a name?", "What should I call you?"],
     "My name is nanochat-jax. You can call me nanochat."),
    (["Who made you?", "Who built you?", "Who created you?", "Who trained you?"],
     "I was trained with nanochat-jax, an open-source JAX port of nanochat, the project Andrej Karpathy started "
     "to show the whole life of a small ChatGPT-like model in one small, hackable repository."),
    (["Are you ChatGPT?", "Are you GPT-4?", "Are you Claude?", "Are you made by OpenAI?"],
     "No. I'm nanochat-jax, a much smaller model trained with the nanochat-jax code. I'm not ChatGPT, GPT-4 or "
     "any other assistant, though I was built in the same spirit."),
    (["How big are you?", "How many parameters do you have?", "Are you a large model?"],
     "I'm small: a few hundred million parameters at most, and far fewer in the miniature runs. That makes me "
     "cheap to train, and it also means I make mistakes, so please double-check what I say."),
    (["What can you do?", "How can you help me?", "What are you good at?"],
     "I can chat, answer simple questions, write short texts, and do arithmetic with a calculator tool. I'm a "
     "small model, so I'm best at simple things."),
    (["Can you make mistakes?", "Are you always right?", "Should I trust you?"],
     "I can and do make mistakes. I'm a small model with limited knowledge, so please check anything important."),
    (["What language are you written in?", "What framework trained you?", "How were you trained?"],
     "I was trained with JAX, Flax and Optax: a GPT-style transformer pretrained on web text, then taught to "
     "chat with supervised fine-tuning, and optionally reinforcement learning on math problems."),
]


def identity_conversations() -> list[dict]:
    convs = []
    for questions, answer in _IDENTITY:
        for q in questions:
            convs.append({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": answer}]})
            convs.append({"messages": [{"role": "user", "content": q.lower().rstrip("?.") },
                                       {"role": "assistant", "content": answer}]})
    return convs


def Identity(**kw):
    return Conversations(identity_conversations(), name="identity", **kw)
