"""Prompts from conversations: the one place a conversation is rendered and cut to fit the context, for the engine's
callers (chat eval, RL) and the chat server alike. The chat format itself is the tokenizer's
`render_for_completion` (data/tokenizer.py)."""

from __future__ import annotations


def fit_conversation(tokenizer, conversation: dict, max_len: int, max_tokens: int = 0) -> list[int]:
    """The prompt ids for `conversation` (render_for_completion), leaving `max_tokens` of room (at most half
    the context of `max_len` tokens): the oldest user/assistant turns are dropped (the system message kept) until it
    fits; a single turn too long on its own keeps <|bos|> and its last tokens. Never raises for length."""
    budget = max(max_len - max_tokens, max_len // 2) - 1
    messages = list(conversation.get("messages", []))
    if messages and messages[-1].get("role") == "assistant":
        messages = messages[:-1]   # the answer to be generated (render_for_completion drops it too)
    ids = tokenizer.render_for_completion({**conversation, "messages": messages})
    start = 1 if messages and messages[0].get("role") == "system" else 0
    while len(ids) > budget and len(messages) - start > 1:
        drop = 2 if len(messages) - start > 2 else 1  # a user turn and its answer, so roles still alternate
        messages = messages[:start] + messages[start + drop:]
        ids = tokenizer.render_for_completion({**conversation, "messages": messages})
    if len(ids) > budget:
        ids = ids[:1] + ids[len(ids) - budget + 1:]
    return ids
