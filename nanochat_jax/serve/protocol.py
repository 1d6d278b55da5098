"""The chat protocols: request validation (nanochat's limits), the prompt and sampling settings of a request, and
the shapes of the responses (SSE events, OpenAI chat.completion and chat.completion.chunk objects).

Nothing here needs Flask: scripts/chat_cli.py plans its prompts with `plan_generation` too.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass

from nanochat_jax.infer.prompt import fit_conversation

# ---------------------------------------------------------------------------------------------------------------
# Limits, as nanochat's server had them (abuse prevention)

MAX_MESSAGES = 500
MAX_MESSAGE_CHARS = 8_000
MAX_TOTAL_CHARS = 32_000
TEMPERATURE_RANGE = (0.0, 2.0)
TOP_K_RANGE = (0, 200)          # 0 = no top-k filtering
# also accepted: top_p in (0, 1] (nucleus sampling), seed in [0, 2**31)
MAX_TOKENS_RANGE = (1, 4_096)
# 32,000 chars of JSON-escaped non-ASCII text is at most ~200 KB; 1 MiB leaves room for 500 messages of overhead
MAX_BODY_BYTES = 1 << 20


class RequestError(ValueError):
    """A bad request: answered with HTTP 400 and {"error": message}."""


@dataclass
class ChatRequest:
    """A validated request. `messages` are {"role", "content": str}; None means "use the server default"."""
    messages: list
    temperature: float | None = None
    top_k: int | None = None
    max_tokens: int | None = None
    top_p: float | None = None
    seed: int | None = None
    stream: bool = True


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _content_text(content, i: int) -> str:
    """A message's content as one string; OpenAI clients may send a list of {"type": "text", "text": ...} parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise RequestError(f"message {i}: content parts must be {{\"type\": \"text\", \"text\": string}}")
            texts.append(part["text"])
        return "".join(texts)
    raise RequestError(f"message {i}: content must be a string")


def validate_request(body, openai: bool = False) -> ChatRequest:
    """Check a decoded JSON body against the limits; raise RequestError with one clear line if it breaks one.

    System messages are allowed only on the OpenAI route (`openai=True`).
    """
    if not isinstance(body, dict):
        raise RequestError("request body must be a JSON object")
    req = ChatRequest(messages=_valid_messages(body.get("messages"), openai))
    _read_sampling(body, req, openai)
    if openai:
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise RequestError("stream must be true or false")
        req.stream = stream
        nc = body.get("n", 1)
        if nc != 1 or not _is_int(nc):
            raise RequestError("only n=1 is supported")
    return req


def _valid_messages(messages, openai: bool) -> list:
    """The messages as {"role", "content": str}, checked against the limits."""
    if not isinstance(messages, list):
        raise RequestError("'messages' must be a list of {\"role\", \"content\"} objects")
    if len(messages) == 0:
        raise RequestError("at least one message is required")
    if len(messages) > MAX_MESSAGES:
        raise RequestError(f"too many messages: at most {MAX_MESSAGES} allowed per request")
    roles = ("system", "user", "assistant") if openai else ("user", "assistant")
    clean, total = [], 0
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise RequestError(f"message {i} must be an object with 'role' and 'content'")
        role = m.get("role")
        if not isinstance(role, str) or role not in roles:
            raise RequestError(f"message {i} has invalid role {role!r}: must be one of {', '.join(roles)}")
        text = _content_text(m.get("content"), i)
        if not text:
            raise RequestError(f"message {i} has empty content")
        if len(text) > MAX_MESSAGE_CHARS:
            raise RequestError(f"message {i} is too long: at most {MAX_MESSAGE_CHARS} characters per message")
        total += len(text)
        clean.append({"role": role, "content": text})
    if total > MAX_TOTAL_CHARS:
        raise RequestError(f"conversation is too long: at most {MAX_TOTAL_CHARS} characters in total")
    if all(m["role"] == "assistant" for m in clean):
        raise RequestError("at least one user message is required")
    return clean


def _read_sampling(body: dict, req: ChatRequest, openai: bool):
    """The optional sampling settings (temperature, top_k, max_tokens, top_p, seed) into `req`, checked."""
    t = body.get("temperature")
    if t is not None:
        if not _is_number(t):
            raise RequestError("temperature must be a number")
        if not TEMPERATURE_RANGE[0] <= t <= TEMPERATURE_RANGE[1]:
            raise RequestError(f"temperature must be between {TEMPERATURE_RANGE[0]} and {TEMPERATURE_RANGE[1]}")
        req.temperature = float(t)
    k = body.get("top_k")
    if k is not None:
        if not _is_int(k):
            raise RequestError("top_k must be an integer")
        if not TOP_K_RANGE[0] <= k <= TOP_K_RANGE[1]:
            raise RequestError(f"top_k must be between {TOP_K_RANGE[0]} and {TOP_K_RANGE[1]}")
        req.top_k = k
    n = body.get("max_tokens", body.get("max_completion_tokens") if openai else None)
    if n is not None:
        if not _is_int(n):
            raise RequestError("max_tokens must be an integer")
        if not MAX_TOKENS_RANGE[0] <= n <= MAX_TOKENS_RANGE[1]:
            raise RequestError(f"max_tokens must be between {MAX_TOKENS_RANGE[0]} and {MAX_TOKENS_RANGE[1]}")
        req.max_tokens = n
    p = body.get("top_p")
    if p is not None:
        if not _is_number(p):
            raise RequestError("top_p must be a number")
        if not 0.0 < p <= 1.0:
            raise RequestError("top_p must be in (0, 1]")
        req.top_p = float(p)
    s = body.get("seed")
    if s is not None:
        if not _is_int(s) or not 0 <= s < 2**31:
            raise RequestError("seed must be an integer in [0, 2**31)")
        req.seed = s


# ---------------------------------------------------------------------------------------------------------------
# The prompt: messages -> a conversation in the model's chat format -> tokens that fit the context

def chat_conversation(messages: list) -> dict:
    """Validated `messages` as a conversation the chat format (the tokenizer's render_conversation) can render: an
    optional system message, then turns alternating user, assistant, ..., starting with the user.

    A request need not follow that order, so it is reshaped: the system texts (wherever they are) are joined into
    the one system message; assistant turns before the first user turn are dropped; consecutive turns of one role
    are joined into one turn (a message sent again after a reply that never came follows the first). A request with
    only system text gets it as the user's turn. Conversations already in order are left as they are.
    """
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    turns = []
    for m in messages:
        if m["role"] == "system" or (not turns and m["role"] == "assistant"):
            continue
        if turns and turns[-1]["role"] == m["role"]:
            turns[-1] = {"role": m["role"], "content": turns[-1]["content"] + "\n\n" + m["content"]}
        else:
            turns.append({"role": m["role"], "content": m["content"]})
    if not turns:  # only a system message: treat it as the user's turn
        return {"messages": [{"role": "user", "content": system}]}
    return {"messages": ([{"role": "system", "content": system}] if system else []) + turns}


def plan_generation(tokenizer, messages: list, *, max_context: int, max_tokens: int, temperature: float,
                    top_k: int, top_p: float | None = None, seed: int | None = None) -> tuple[list[int], dict]:
    """(prompt tokens, keyword arguments for `engine.stream`) so that prompt + reply fit in `max_context`.

    The prompt is `chat_conversation(messages)` fitted by infer/prompt.fit_conversation, which leaves the reply
    its `max_tokens` budget unless that would leave the prompt less than half the context (oldest turns dropped
    first, the system text kept). seed None draws a random one.
    """
    n_new = max(1, min(max_tokens, max_context - 2))
    tokens = fit_conversation(tokenizer, chat_conversation(messages), max_context, n_new)
    n_new = max(1, min(n_new, max_context - len(tokens)))
    kw = dict(max_tokens=n_new, temperature=temperature, top_k=top_k,
              seed=seed if seed is not None else random.randrange(2**31))
    if top_p is not None and top_p < 1.0:  # only engines asked for nucleus sampling need to know about it
        kw["top_p"] = top_p
    return tokens, kw


def stop_token_ids(tokenizer) -> set[int]:
    """Tokens that end a reply: <|assistant_end|> and <|bos|> (the engine stops there too; this is a guard)."""
    return {tokenizer.get_bos_token_id(), tokenizer.encode_special("<|assistant_end|>")}


# ---------------------------------------------------------------------------------------------------------------
# Response shapes

def sse(obj) -> str:
    """One server-sent event carrying `obj` as JSON."""
    return "data: " + json.dumps(obj, ensure_ascii=False) + "\n\n"


def openai_chunk(cid: str, created: int, model: str, delta: dict, finish: str | None = None) -> dict:
    """A chat.completion.chunk: one streamed piece (`delta`) of completion `cid`."""
    return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}


def openai_completion(cid: str, created: int, model: str, text: str, finish: str, n_prompt: int,
                      n_new: int) -> dict:
    """A chat.completion: the whole reply, its finish reason and token usage."""
    return {
        "id": cid, "object": "chat.completion", "created": created, "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}],
        "usage": {"prompt_tokens": n_prompt, "completion_tokens": n_new, "total_tokens": n_prompt + n_new},
    }
