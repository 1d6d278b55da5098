"""The chat server: a Flask app factory, request validation, prompt rendering and a pool of generation slots.

Endpoints (served by `scripts/chat_web.py`):
  GET  /                     the chat page (ui.html, one file, no build step)
  POST /chat/completions     nanochat's SSE stream: `data: {"token": "...", "gpu": 0}` ... `data: {"done": true}`
  POST /v1/chat/completions  OpenAI-compatible; `stream: true` -> chat.completion.chunk events ending in
                             `data: [DONE]`, `stream: false` -> one chat.completion JSON with usage
  GET  /v1/models            the one model served
  GET  /health               liveness + how many slots are free
  GET  /stats                slot pool and request counters

A *worker* is anything with `.stream(tokens, max_tokens=, temperature=, top_k=, seed=)` yielding
`(token_id, text_piece)` (the `engine.Engine` interface). Each worker offers `slots` concurrent streams: 1 for a
plain engine (nanochat's worker-per-device pool), more for an engine that batches requests into one decode step.
Requests beyond the free slots wait in a queue. A client that disconnects mid-stream closes the response generator
(GeneratorExit at its yield), which closes the engine's stream and gives the slot back.

Flask is imported lazily (inside `create_app`), so the CLI can use the prompt helpers without it.
"""

from __future__ import annotations

import json
import logging
import queue
import random
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("nanochat_jax.serve")

UI_PATH = Path(__file__).resolve().parent / "ui.html"

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
    messages = body.get("messages")
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

    req = ChatRequest(messages=clean)
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
    if openai:
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise RequestError("stream must be true or false")
        req.stream = stream
        nc = body.get("n", 1)
        if nc != 1 or not _is_int(nc):
            raise RequestError("only n=1 is supported")
    return req


# ---------------------------------------------------------------------------------------------------------------
# Prompt rendering: messages -> tokens, in the chat format the model was trained on

def render_prompt(tokenizer, messages: list, max_prompt_tokens: int) -> list[int]:
    """Tokens for `messages`, ending with <|assistant_start|> so the model answers next.

    The format is the tokenizer's `render_conversation`: <|bos|>, then each turn between its role's start/end tokens,
    with the system text merged into the first user turn. When the prompt exceeds `max_prompt_tokens`, the oldest
    turns are dropped (the system text is kept); if the last turn alone is too long, its oldest tokens are dropped.
    """
    bos = tokenizer.get_bos_token_id()
    special = {r: (tokenizer.encode_special(f"<|{r}_start|>"), tokenizer.encode_special(f"<|{r}_end|>"))
               for r in ("user", "assistant")}
    assistant_start = special["assistant"][0]
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    turns = [m for m in messages if m["role"] != "system"]
    if not turns:  # only a system message: treat it as the user's turn
        turns, system = [{"role": "user", "content": system}], ""

    def turn_ids(m, first):
        text = m["content"]
        if first and system and m["role"] == "user":
            text = system + "\n\n" + text
        start, end = special[m["role"]]
        return [start] + tokenizer.encode(text) + [end]

    encoded = [turn_ids(m, i == 0) for i, m in enumerate(turns)]
    budget = max(max_prompt_tokens - 2, 1)  # minus <|bos|> and the final <|assistant_start|>
    rest = [0] * (len(turns) + 1)  # rest[i]: tokens of turns i+1.. (as they are encoded)
    for i in range(len(turns) - 1, -1, -1):
        rest[i] = rest[i + 1] + (len(encoded[i + 1]) if i + 1 < len(turns) else 0)
    first = 0
    # drop the oldest turns while the prompt is too long, and then until it starts with a user turn again
    while first < len(turns) - 1 and (len(encoded[first]) + rest[first] > budget
                                      or (first > 0 and turns[first]["role"] != "user")):
        first += 1
        encoded[first] = turn_ids(turns[first], True)  # the system text moves to the new first turn
    ids = [t for e in encoded[first:] for t in e]
    if len(ids) > budget:  # the last turn alone is too long: keep its newest tokens
        ids = ids[:1] + ids[len(ids) - budget + 1:]
    return [bos] + ids + [assistant_start]


def plan_generation(tokenizer, messages: list, *, max_context: int, max_tokens: int, temperature: float,
                    top_k: int, top_p: float | None = None, seed: int | None = None) -> tuple[list[int], dict]:
    """(prompt tokens, keyword arguments for `engine.stream`) so that prompt + reply fit in `max_context`.

    The reply keeps its `max_tokens` budget unless that would leave the prompt less than half the context; the
    prompt is then cut (oldest turns first) to what is left. seed None draws a random one.
    """
    n_new = max(1, min(max_tokens, max_context - 2))
    tokens = render_prompt(tokenizer, messages, max(max_context - n_new, max_context // 2))
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
# The slot pool: which worker serves which request, and counters for /stats

@dataclass
class Worker:
    """One engine (usually one per device). `slots` = how many streams it serves at once."""
    engine: object
    id: int = 0
    device: str = "cpu"
    slots: int = 1


class SlotPool:
    """A queue of free (worker, slot) pairs, plus request counters. Thread-safe."""

    def __init__(self, workers: list[Worker]):
        if not workers:
            raise ValueError("the server needs at least one worker")
        self.workers = list(workers)
        self.free: queue.Queue = queue.Queue()
        for slot in range(max(w.slots for w in workers)):
            for w in workers:  # interleave, so load spreads over workers
                if slot < w.slots:
                    self.free.put(w)
        self.total = self.free.qsize()
        self.lock = threading.Lock()
        self.counters = {"requests": 0, "completed": 0, "cancelled": 0, "failed": 0, "rejected": 0,
                         "tokens_generated": 0}
        self.active = 0
        self.started = time.time()

    def acquire(self, timeout: float) -> Worker | None:
        try:
            w = self.free.get(timeout=timeout)
        except queue.Empty:
            return None
        with self.lock:
            self.active += 1
        return w

    def release(self, w: Worker):
        with self.lock:
            self.active -= 1
        self.free.put(w)

    def count(self, key: str, n: int = 1):
        with self.lock:
            self.counters[key] += n

    def stats(self) -> dict:
        with self.lock:
            c = dict(self.counters)
            active = self.active
        return {"total_slots": self.total, "available_slots": self.free.qsize(), "busy_slots": active,
                "uptime_s": round(time.time() - self.started, 1), **c,
                "workers": [{"id": w.id, "device": w.device, "slots": w.slots,
                             **({"engine": w.engine.stats()} if callable(getattr(w.engine, "stats", None)) else {})}
                            for w in self.workers]}


# ---------------------------------------------------------------------------------------------------------------
# The app

def _sse(obj) -> str:
    return "data: " + json.dumps(obj, ensure_ascii=False) + "\n\n"


def create_app(workers, tokenizer, *, max_context: int = 2048, temperature: float = 0.8, top_k: int = 50,
               max_tokens: int = 512, model_name: str = "nanochat", acquire_timeout: float = 600.0,
               ui_path: str | Path | None = None):
    """The Flask app serving `workers` (a list of Worker, or of engines: one slot each).

    max_context: the engine's longest sequence (prompt + reply), e.g. config.sequence_len.
    temperature, top_k, max_tokens: defaults for requests that do not set them.
    acquire_timeout: seconds a request waits for a free slot before it is answered "busy" (503).
    """
    from flask import Flask, Response, jsonify, request
    from werkzeug.exceptions import HTTPException

    workers = [w if isinstance(w, Worker) else Worker(engine=w, id=i) for i, w in enumerate(workers)]
    pool = SlotPool(workers)
    page = Path(ui_path or UI_PATH).read_text(encoding="utf-8")
    stop_ids = stop_token_ids(tokenizer)

    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY_BYTES
    app.config["JSON_SORT_KEYS"] = False
    app.extensions["nanochat_pool"] = pool

    # ---- errors: always JSON, never Flask's HTML pages
    @app.errorhandler(HTTPException)
    def _http_error(e):
        if e.code == 413:
            msg = f"request body too large: at most {MAX_BODY_BYTES} bytes"
        else:
            msg = e.description or e.name
        return jsonify(error=msg), e.code

    @app.errorhandler(RequestError)
    def _bad_request(e):
        pool.count("rejected")
        return jsonify(error=str(e)), 400

    def parse_body(openai: bool) -> ChatRequest:
        if request.mimetype != "application/json":
            raise RequestError("Content-Type must be application/json")
        raw = request.get_data(cache=False)  # raises 413 past MAX_CONTENT_LENGTH
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise RequestError("request body is not valid UTF-8") from None
        try:
            body = json.loads(text)
        except json.JSONDecodeError as e:
            raise RequestError(f"malformed JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
        return validate_request(body, openai=openai)

    def plan(req: ChatRequest):
        return plan_generation(
            tokenizer, req.messages, max_context=max_context,
            max_tokens=req.max_tokens if req.max_tokens is not None else max_tokens,
            temperature=req.temperature if req.temperature is not None else temperature,
            top_k=req.top_k if req.top_k is not None else top_k, top_p=req.top_p, seed=req.seed)

    def generate(req: ChatRequest, rid: str):
        """Yield ("worker", Worker), then ("piece", text) for each piece, then ("end", finish_reason, n_tokens).

        Holds a slot from the first next() until the generator finishes or is closed (client gone).
        """
        tokens, kw = plan(req)
        log.info("[%s] request: %d messages, %d prompt tokens, %s", rid, len(req.messages), len(tokens), kw)
        for m in req.messages:
            log.info("[%s] [%s]: %s", rid, m["role"].upper(), m["content"])
        pool.count("requests")
        w = pool.acquire(acquire_timeout)
        if w is None:
            pool.count("rejected")
            yield ("busy",)
            return
        t0, n, pieces, status = time.time(), 0, [], "cancelled"
        stream = None
        try:
            yield ("worker", w, len(tokens))
            stream = w.engine.stream(tokens, **kw)
            finish = "length"
            for token_id, piece in stream:
                if token_id in stop_ids:
                    finish = "stop"
                    break
                n += 1
                if piece:
                    pieces.append(piece)
                    yield ("piece", piece)
            else:
                finish = "length" if n >= kw["max_tokens"] else "stop"
            status = "completed"
            yield ("end", finish, n)
        except GeneratorExit:
            status = "cancelled"
            raise
        except Exception:
            status = "failed"
            log.exception("[%s] generation failed", rid)
            yield ("error", "generation failed")
        finally:
            if stream is not None and hasattr(stream, "close"):
                stream.close()  # an engine that batches requests frees this request's row here
            pool.release(w)
            pool.count(status)
            pool.count("tokens_generated", n)
            dt = time.time() - t0
            log.info("[%s] [ASSISTANT] (worker %d, %s, %d tokens, %.2fs): %s", rid, w.id, status, n, dt,
                     "".join(pieces))

    def sse_response(body_iter):
        return Response(body_iter, mimetype="text/event-stream",
                        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    # ---- routes
    @app.get("/")
    def index():
        return Response(page, mimetype="text/html")

    @app.get("/favicon.ico")
    def favicon():
        return "", 204

    @app.get("/health")
    def health():
        return jsonify(status="ok", ready=True, model=model_name, workers=len(pool.workers),
                       available_slots=pool.free.qsize())

    @app.get("/stats")
    def stats():
        return jsonify(pool.stats())

    @app.get("/v1/models")
    def models():
        return jsonify(object="list", data=[{"id": model_name, "object": "model", "created": int(pool.started),
                                             "owned_by": "nanochat-jax"}])

    @app.post("/chat/completions")
    def chat_completions():
        req = parse_body(openai=False)
        rid = uuid.uuid4().hex[:8]

        def events():
            gpu = 0
            for ev in generate(req, rid):
                if ev[0] == "worker":
                    gpu = ev[1].id
                elif ev[0] == "piece":
                    yield _sse({"token": ev[1], "gpu": gpu})
                elif ev[0] in ("busy", "error"):
                    yield _sse({"error": "server busy, try again" if ev[0] == "busy" else ev[1]})
            yield _sse({"done": True})

        return sse_response(events())

    @app.post("/v1/chat/completions")
    def openai_chat_completions():
        req = parse_body(openai=True)
        rid = uuid.uuid4().hex[:8]
        cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(delta, finish=None):
            return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model_name,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}

        if req.stream:
            def events():
                for ev in generate(req, rid):
                    if ev[0] == "worker":
                        yield _sse(chunk({"role": "assistant", "content": ""}))
                    elif ev[0] == "piece":
                        yield _sse(chunk({"content": ev[1]}))
                    elif ev[0] == "end":
                        yield _sse(chunk({}, ev[1]))
                    else:
                        msg = "server busy, try again" if ev[0] == "busy" else ev[1]
                        yield _sse({"error": {"message": msg, "type": "server_error"}})
                yield "data: [DONE]\n\n"
            return sse_response(events())

        gen = generate(req, rid)
        pieces, finish, n_new, n_prompt = [], "stop", 0, 0
        try:
            for ev in gen:
                if ev[0] == "worker":
                    n_prompt = ev[2]
                elif ev[0] == "piece":
                    pieces.append(ev[1])
                elif ev[0] == "end":
                    finish, n_new = ev[1], ev[2]
                elif ev[0] == "busy":
                    return jsonify(error="server busy, try again"), 503
                else:
                    return jsonify(error=ev[1]), 500
        finally:
            gen.close()
        return jsonify({
            "id": cid, "object": "chat.completion", "created": created, "model": model_name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(pieces)},
                         "finish_reason": finish}],
            "usage": {"prompt_tokens": n_prompt, "completion_tokens": n_new, "total_tokens": n_prompt + n_new},
        })

    return app


# ---------------------------------------------------------------------------------------------------------------
# Serving and model loading, shared by scripts/chat_web.py and scripts/chat_cli.py

def add_model_args(parser):
    """The flags that choose a model, as in every chat script."""
    parser.add_argument("--source", default="sft", choices=["base", "mid", "sft", "rl"],
                        help="which training stage's checkpoint to load from the base dir")
    parser.add_argument("--model-tag", "-g", default=None, help="model tag (e.g. d20); default: the largest")
    parser.add_argument("--step", "-s", type=int, default=None, help="checkpoint step; default: the newest")
    parser.add_argument("--checkpoint", default=None,
                        help="load this path instead (a stage's dir, one step's dir, or a weights-only export)")


def load_chat_model(args):
    """(params, config, tokenizer, meta) for the model chosen by add_model_args' flags."""
    from nanochat_jax.train.load import load_model_from_args
    return load_model_from_args(args)


def model_label(args, meta: dict) -> str:
    """A short name for the loaded model, e.g. "nanochat-sft-d20-step000700", for logs and /v1/models."""
    if args.checkpoint:
        name = Path(args.checkpoint).resolve().name
    else:
        name = "-".join(str(x) for x in (args.source, meta.get("model_tag") or args.model_tag) if x)
    step = meta.get("step")
    return f"nanochat-{name}" + (f"-step{int(step):06d}" if isinstance(step, int) else "")


def serve(app, host: str, port: int):
    """A werkzeug threaded server (one thread per request) for `app`; call .serve_forever() on it.

    port 0 picks a free port (read it back from .server_port).
    """
    from werkzeug.serving import make_server
    return make_server(host, port, app, threaded=True)
