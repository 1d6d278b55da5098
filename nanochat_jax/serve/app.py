"""The Flask app: the chat page, nanochat's SSE API and the OpenAI-compatible API, served from a pool of generation
slots (serve/pool.py), with requests checked and shaped by serve/protocol.py.

A client that disconnects mid-stream closes the response generator (GeneratorExit at its yield), which closes the
engine's stream and gives the slot back.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from flask import Flask, Response, jsonify, request
from werkzeug.exceptions import HTTPException
from werkzeug.serving import make_server

from nanochat_jax.serve.pool import SlotPool, Worker
from nanochat_jax.serve.protocol import (MAX_BODY_BYTES, ChatRequest, RequestError, openai_chunk, openai_completion,
                                         plan_generation, sse, stop_token_ids, validate_request)

log = logging.getLogger("nanochat_jax.serve")

UI_PATH = Path(__file__).resolve().parent / "ui.html"


def create_app(workers, tokenizer, *, max_context: int = 2048, temperature: float = 0.8, top_k: int = 50,
               max_tokens: int = 512, model_name: str = "nanochat", acquire_timeout: float = 600.0,
               ui_path: str | Path | None = None):
    """The Flask app serving `workers` (a list of Worker, or of engines: one slot each).

    max_context: the engine's longest sequence (prompt + reply), e.g. config.sequence_len.
    temperature, top_k, max_tokens: defaults for requests that do not set them.
    acquire_timeout: seconds a request waits for a free slot before it is answered "busy" (503).
    """
    workers = [w if isinstance(w, Worker) else Worker(engine=w, id=i) for i, w in enumerate(workers)]
    pool = SlotPool(workers)
    chat = _Chat(pool, tokenizer, max_context=max_context, temperature=temperature, top_k=top_k,
                 max_tokens=max_tokens, acquire_timeout=acquire_timeout)

    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY_BYTES
    app.config["JSON_SORT_KEYS"] = False
    app.extensions["nanochat_pool"] = pool
    _register_errors(app, pool)
    _register_pages(app, pool, Path(ui_path or UI_PATH).read_text(encoding="utf-8"), model_name)
    _register_nanochat(app, chat)
    _register_openai(app, chat, model_name)
    return app


def serve(app, host: str, port: int):
    """A werkzeug threaded server (one thread per request) for `app`; call .serve_forever() on it.

    port 0 picks a free port (read it back from .server_port).
    """
    return make_server(host, port, app, threaded=True)


# ---------------------------------------------------------------------------------------------------------------
# Generation: a request's prompt, a slot, and the engine's stream

@dataclass
class _Chat:
    """What the chat routes share: the slot pool, the tokenizer, and the defaults for what a request leaves unset."""
    pool: SlotPool
    tokenizer: object
    max_context: int
    temperature: float
    top_k: int
    max_tokens: int
    acquire_timeout: float
    stop_ids: set = field(init=False)

    def __post_init__(self):
        self.stop_ids = stop_token_ids(self.tokenizer)

    def plan(self, req: ChatRequest):
        return plan_generation(
            self.tokenizer, req.messages, max_context=self.max_context,
            max_tokens=req.max_tokens if req.max_tokens is not None else self.max_tokens,
            temperature=req.temperature if req.temperature is not None else self.temperature,
            top_k=req.top_k if req.top_k is not None else self.top_k, top_p=req.top_p, seed=req.seed)

    def generate(self, req: ChatRequest, rid: str):
        """Yield ("worker", Worker), then ("piece", text) for each piece, then ("end", finish_reason, n_tokens).

        Holds a slot from the first next() until the generator finishes or is closed (client gone).
        """
        pool = self.pool
        tokens, kw = self.plan(req)
        log.info("[%s] request: %d messages, %d prompt tokens, %s", rid, len(req.messages), len(tokens), kw)
        for m in req.messages:
            log.info("[%s] [%s]: %s", rid, m["role"].upper(), m["content"])
        pool.count("requests")
        w = pool.acquire(self.acquire_timeout)
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
                if token_id in self.stop_ids:
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


# ---------------------------------------------------------------------------------------------------------------
# Requests in, errors out

def _parse_body(openai: bool) -> ChatRequest:
    """The current request's JSON body, validated (RequestError on anything wrong with it)."""
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


def _sse_response(body_iter):
    return Response(body_iter, mimetype="text/event-stream",
                    headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _register_errors(app, pool: SlotPool):
    """Errors are always JSON, never Flask's HTML pages."""
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


# ---------------------------------------------------------------------------------------------------------------
# Routes

def _register_pages(app, pool: SlotPool, page: str, model_name: str):
    """The chat page and the read-only endpoints: /health, /stats, /v1/models."""
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


def _register_nanochat(app, chat: _Chat):
    """POST /chat/completions: nanochat's SSE stream, `data: {"token": ..., "gpu": ...}` ... `data: {"done": true}`."""
    @app.post("/chat/completions")
    def chat_completions():
        req = _parse_body(openai=False)
        rid = uuid.uuid4().hex[:8]

        def events():
            gpu = 0
            for ev in chat.generate(req, rid):
                if ev[0] == "worker":
                    gpu = ev[1].id
                elif ev[0] == "piece":
                    yield sse({"token": ev[1], "gpu": gpu})
                elif ev[0] in ("busy", "error"):
                    yield sse({"error": "server busy, try again" if ev[0] == "busy" else ev[1]})
            yield sse({"done": True})

        return _sse_response(events())


def _register_openai(app, chat: _Chat, model_name: str):
    """POST /v1/chat/completions: `stream: true` -> chat.completion.chunk events ending in `data: [DONE]`,
    `stream: false` -> one chat.completion with usage."""
    @app.post("/v1/chat/completions")
    def openai_chat_completions():
        req = _parse_body(openai=True)
        rid = uuid.uuid4().hex[:8]
        cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if req.stream:
            return _sse_response(_openai_events(chat.generate(req, rid), cid, created, model_name))
        return _openai_whole(chat.generate(req, rid), cid, created, model_name)


def _openai_events(gen, cid: str, created: int, model_name: str):
    """The SSE body of a streamed OpenAI completion."""
    for ev in gen:
        if ev[0] == "worker":
            yield sse(openai_chunk(cid, created, model_name, {"role": "assistant", "content": ""}))
        elif ev[0] == "piece":
            yield sse(openai_chunk(cid, created, model_name, {"content": ev[1]}))
        elif ev[0] == "end":
            yield sse(openai_chunk(cid, created, model_name, {}, ev[1]))
        else:
            msg = "server busy, try again" if ev[0] == "busy" else ev[1]
            yield sse({"error": {"message": msg, "type": "server_error"}})
    yield "data: [DONE]\n\n"


def _openai_whole(gen, cid: str, created: int, model_name: str):
    """The response to a non-streamed OpenAI request: one chat.completion, or a JSON error (503 busy, 500)."""
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
    return jsonify(openai_completion(cid, created, model_name, "".join(pieces), finish, n_prompt, n_new))
