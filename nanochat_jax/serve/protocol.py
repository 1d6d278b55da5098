"""What both chat APIs share: the limits, request errors in OpenAI's shape, the checks on messages and sampling
settings, nanochat's own request (POST /chat/completions), the prompt and sampling settings of a conversation, SSE
events, and text made safe for the log.

Nothing here needs Flask: scripts/chat_cli.py plans its prompts with `plan_generation` too. The OpenAI routes'
requests are read by serve/openai_request.py on top of these checks.
"""

from __future__ import annotations

import json
import random
import re
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

NANOCHAT_FIELDS = ("messages", "temperature", "top_k", "top_p", "max_tokens", "seed", "stream")


# ---------------------------------------------------------------------------------------------------------------
# Errors: OpenAI's shape, {"error": {"message", "type", "param", "code"}}, on every route

class RequestError(ValueError):
    """A request the server refuses: HTTP `status` (400 unless said otherwise) with an OpenAI-shaped error body that
    names the offending field (`param`) and, for some kinds, a machine-readable `code`."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None, status: int = 400):
        super().__init__(message)
        self.param, self.code, self.status = param, code, status

    def body(self) -> dict:
        return error_body(str(self), self.status, self.param, self.code)


def error_body(message: str, status: int, param: str | None = None, code: str | None = None) -> dict:
    """OpenAI's error object; `type` is "invalid_request_error" for a 4xx status, "server_error" for a 5xx."""
    kind = "invalid_request_error" if status < 500 else "server_error"
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def shorten(text: str, n: int = 40) -> str:
    """`text` cut to `n` characters for an error message (a field name may be any length)."""
    return text if len(text) <= n else text[:n] + "..."


def check_fields(body: dict, allowed, unsupported=()):
    """Refuse every field of `body` the route does not know, or knows and does not implement (`unsupported`).
    A field sent as null asks for nothing, so it is let through whatever its name."""
    for key, value in body.items():
        if key in allowed or value is None:
            continue
        if key in unsupported:
            raise RequestError(f"'{key}' is not supported by this server", param=key, code="unsupported_parameter")
        raise RequestError(f"unrecognized request field '{shorten(key)}'", param=shorten(key),
                           code="unknown_parameter")


def is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def check_text(text: str, what: str, param: str | None = None) -> str:
    """`text`, refused when it cannot be encoded as UTF-8 (JSON lets a lone surrogate like \\ud800 through)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise RequestError(f"{what} is not valid Unicode text (it holds a lone surrogate)", param=param) from None
    return text


# ---------------------------------------------------------------------------------------------------------------
# Requests: nanochat's route, and the checks the OpenAI routes share

@dataclass
class ChatRequest:
    """A validated request. `messages` are {"role", "content": str}; None means "use the server default"."""
    messages: list
    temperature: float | None = None
    top_k: int | None = None
    max_tokens: int | None = None
    top_p: float | None = None
    seed: int | None = None


def validate_request(body) -> ChatRequest:
    """nanochat's request (POST /chat/completions): messages (user and assistant turns), the optional sampling
    settings, and `stream` (true if given: the route always streams); anything else is refused. Raises
    RequestError with one clear line."""
    if not isinstance(body, dict):
        raise RequestError("request body must be a JSON object")
    check_fields(body, NANOCHAT_FIELDS)
    if body.get("stream") not in (None, True):
        raise RequestError("this route always streams: stream must be true if given", param="stream")
    req = ChatRequest(messages=valid_messages(body.get("messages"), ("user", "assistant")))
    read_sampling(body, req)
    return req


def _content_text(content, i: int) -> str:
    """A message's content as one string; OpenAI clients may send a list of {"type": "text", "text": ...} parts."""
    if isinstance(content, str):
        return check_text(content, f"message {i}", "messages")
    if isinstance(content, list):
        texts = []
        for part in content:
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise RequestError(f"message {i}: content parts must be {{\"type\": \"text\", \"text\": string}} "
                                   "(this model reads text only)", param="messages")
            texts.append(check_text(part["text"], f"message {i}", "messages"))
        return "".join(texts)
    raise RequestError(f"message {i}: content must be a string", param="messages")


def valid_messages(messages, roles) -> list:
    """The messages as {"role", "content": str}, checked against the limits; a "developer" message (OpenAI's new name
    for the system message) counts as "system"."""
    if not isinstance(messages, list):
        raise RequestError("'messages' must be a list of {\"role\", \"content\"} objects", param="messages")
    if len(messages) == 0:
        raise RequestError("at least one message is required", param="messages")
    if len(messages) > MAX_MESSAGES:
        raise RequestError(f"too many messages: at most {MAX_MESSAGES} allowed per request", param="messages")
    clean, total = [], 0
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise RequestError(f"message {i} must be an object with 'role' and 'content'", param="messages")
        extra = sorted(k for k in m if k not in ("role", "content") and m[k] is not None)
        if extra:
            raise RequestError(f"message {i}: field '{shorten(extra[0])}' is not supported (only role and content)",
                               param="messages")
        role = m.get("role")
        if role == "developer" and "system" in roles:
            role = "system"
        if not isinstance(role, str) or role not in roles:
            raise RequestError(f"message {i} has invalid role {shorten(repr(role))}: must be one of "
                               f"{', '.join(roles)}", param="messages")
        text = _content_text(m.get("content"), i)
        if not text:
            raise RequestError(f"message {i} has empty content", param="messages")
        if len(text) > MAX_MESSAGE_CHARS:
            raise RequestError(f"message {i} is too long: at most {MAX_MESSAGE_CHARS} characters per message",
                               param="messages")
        total += len(text)
        clean.append({"role": role, "content": text})
    if total > MAX_TOTAL_CHARS:
        raise RequestError(f"conversation is too long: at most {MAX_TOTAL_CHARS} characters in total",
                           param="messages")
    if all(m["role"] == "assistant" for m in clean):
        raise RequestError("at least one user message is required", param="messages")
    return clean


def read_sampling(body: dict, req, max_tokens_key: str = "max_tokens", min_tokens: int = MAX_TOKENS_RANGE[0]):
    """The optional sampling settings (temperature, top_k, top_p, seed, and max_tokens read from `max_tokens_key`)
    into `req`'s attributes of those names, checked; null means unset."""
    t = body.get("temperature")
    if t is not None:
        if not is_number(t):
            raise RequestError("temperature must be a number", param="temperature")
        if not TEMPERATURE_RANGE[0] <= t <= TEMPERATURE_RANGE[1]:
            raise RequestError(f"temperature must be between {TEMPERATURE_RANGE[0]} and {TEMPERATURE_RANGE[1]}",
                               param="temperature")
        req.temperature = float(t)
    k = body.get("top_k")
    if k is not None:
        if not is_int(k):
            raise RequestError("top_k must be an integer", param="top_k")
        if not TOP_K_RANGE[0] <= k <= TOP_K_RANGE[1]:
            raise RequestError(f"top_k must be between {TOP_K_RANGE[0]} and {TOP_K_RANGE[1]}", param="top_k")
        req.top_k = k
    n = body.get(max_tokens_key)
    if n is not None:
        if not is_int(n):
            raise RequestError(f"{max_tokens_key} must be an integer", param=max_tokens_key)
        if not min_tokens <= n <= MAX_TOKENS_RANGE[1]:
            raise RequestError(f"{max_tokens_key} must be between {min_tokens} and {MAX_TOKENS_RANGE[1]}",
                               param=max_tokens_key)
        req.max_tokens = n
    p = body.get("top_p")
    if p is not None:
        if not is_number(p):
            raise RequestError("top_p must be a number", param="top_p")
        if not 0.0 < p <= 1.0:
            raise RequestError("top_p must be in (0, 1]", param="top_p")
        req.top_p = float(p)
    s = body.get("seed")
    if s is not None:
        if not is_int(s) or not 0 <= s < 2**31:
            raise RequestError("seed must be an integer in [0, 2**31)", param="seed")
        req.seed = s


def parse_json(raw: bytes):
    """A request body decoded as JSON; RequestError (never a crash) for bytes that are not UTF-8, malformed JSON,
    nesting too deep for the parser, or an integer of more digits than Python converts."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise RequestError("request body is not valid UTF-8") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise RequestError(f"malformed JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    except RecursionError:
        raise RequestError("malformed JSON: nested too deeply") from None
    except ValueError:  # int('1' * 5000): more digits than sys.get_int_max_str_digits()
        raise RequestError("malformed JSON: a number has too many digits") from None


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
# SSE events and the log

def sse(obj) -> str:
    """One server-sent event carrying `obj` as JSON."""
    return "data: " + json.dumps(obj, ensure_ascii=False) + "\n\n"


# control characters (C0, DEL, C1), the backslash, lone surrogates, line/paragraph separators, bidi controls
_LOG_UNSAFE = re.compile("[\\\\\x00-\x1f\x7f-\x9f\ud800-\udfff\u2028\u2029\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def log_text(text: str) -> str:
    """`text` safe for one log line: characters that could break the line, forge a record or hide text in a
    terminal written as Python escapes (a newline as \\n, ESC as \\x1b, a backslash as \\\\); the rest as is."""
    return _LOG_UNSAFE.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), text)
