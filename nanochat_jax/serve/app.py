"""The Flask app: the chat page, nanochat's SSE API and the OpenAI-compatible API, served from a pool of generation
slots (serve/pool.py) by serve/generate.py, with requests checked by serve/protocol.py and serve/openai_request.py.

Every error is JSON in OpenAI's shape, {"error": {"message", "type", "param", "code"}}. A request is validated and
its prompt planned before a slot is taken, and a slot is taken before the response starts, so a bad request is a
400 and a busy server a 503 on every route, streamed or not. A client that disconnects mid-stream closes the
response generator (GeneratorExit at its yield), which closes the engine's stream and gives the slot back.
"""

from __future__ import annotations

import logging
import random
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from flask import Flask, Response, jsonify, request
from werkzeug.exceptions import HTTPException

from nanochat_jax.serve.generate import Generator, Job, Prompt
from nanochat_jax.serve.openai_request import OpenAIRequest, validate_chat, validate_completion
from nanochat_jax.serve.openai_response import Reply, streamed, whole
from nanochat_jax.serve.pool import SlotPool, Worker
from nanochat_jax.serve.protocol import (MAX_BODY_BYTES, RequestError, error_body, log_text, parse_json,
                                         plan_generation, sse, validate_request)

log = logging.getLogger("nanochat_jax.serve")

UI_PATH = Path(__file__).resolve().parent / "ui.html"


@dataclass
class Defaults:
    """The server's settings for what a request leaves unset, and the engine's context (prompt + reply)."""
    max_context: int
    temperature: float
    top_k: int
    max_tokens: int


def create_app(workers, tokenizer, *, max_context: int = 2048, temperature: float = 0.8, top_k: int = 50,
               max_tokens: int = 512, model_name: str = "nanochat", acquire_timeout: float = 600.0,
               max_waiting: int | None = None, ui_path: str | Path | None = None):
    """The Flask app serving `workers` (a list of Worker, or of engines: one slot each).

    max_context: the engine's longest sequence (prompt + reply), e.g. config.sequence_len.
    temperature, top_k, max_tokens: defaults for requests that do not set them.
    acquire_timeout: seconds a request waits for a free slot before it is answered "busy" (503).
    max_waiting: how many requests may wait for a slot at once (None: no limit); more are "busy" at once.
    """
    workers = [w if isinstance(w, Worker) else Worker(engine=w, id=i) for i, w in enumerate(workers)]
    pool = SlotPool(workers, max_waiting=max_waiting)
    gen = Generator(pool, tokenizer, acquire_timeout)
    defaults = Defaults(max_context, temperature, top_k, max_tokens)

    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY_BYTES
    app.json.sort_keys = False
    app.extensions["nanochat_pool"] = pool
    _register_errors(app, pool)
    _register_pages(app, pool, Path(ui_path or UI_PATH).read_text(encoding="utf-8"), model_name)
    _register_nanochat(app, gen, tokenizer, defaults)
    _register_openai(app, gen, tokenizer, defaults, model_name)
    return app


# ---------------------------------------------------------------------------------------------------------------
# Requests in, errors out

def _parse_body():
    """The current request's JSON body (RequestError on anything wrong with its encoding)."""
    if request.mimetype != "application/json":
        raise RequestError("Content-Type must be application/json")
    return parse_json(request.get_data(cache=False))  # get_data raises 413 past MAX_CONTENT_LENGTH


def _start(gen: Generator, job: Job, rid: str):
    """Run `job` up to holding a slot: (the worker, the rest of its events), or RequestError 503 when the server is
    busy."""
    events = gen.run(job, rid)
    first = next(events)
    if first[0] == "busy":
        raise RequestError("server busy, try again", code="server_busy", status=503)
    return first[1], events


def _sse_response(body_iter):
    return Response(body_iter, mimetype="text/event-stream",
                    headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _register_errors(app, pool: SlotPool):
    """Errors are always JSON in OpenAI's shape, never Flask's HTML pages; each request gets one escaped log line."""
    @app.errorhandler(HTTPException)
    def _http_error(e):
        if e.code == 413:
            msg = f"request body too large: at most {MAX_BODY_BYTES} bytes"
        elif e.code in (404, 405):
            msg = f"{e.name}: {request.method} {request.path}"
        else:
            msg = e.description or e.name
        return jsonify(error_body(msg, e.code)), e.code

    @app.errorhandler(RequestError)
    def _bad_request(e):
        pool.count("rejected")
        return jsonify(e.body()), e.status

    @app.errorhandler(Exception)
    def _internal_error(e):
        log.exception("internal error on %s %s", request.method, log_text(request.path))
        return jsonify(error_body("internal server error", 500)), 500

    @app.after_request
    def _access_log(response):
        log.info("%s %s %s %d", request.remote_addr, request.method, log_text(request.full_path.rstrip("?")),
                 response.status_code)
        return response


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


def _chat_job(tokenizer, d: Defaults, req, n: int = 1, stop=(), logprobs: int | None = None) -> Job:
    """The job of a chat request (nanochat's or OpenAI's): its conversation fitted to the context."""
    tokens, kw = plan_generation(
        tokenizer, req.messages, max_context=d.max_context,
        max_tokens=req.max_tokens if req.max_tokens is not None else d.max_tokens,
        temperature=req.temperature if req.temperature is not None else d.temperature,
        top_k=req.top_k if req.top_k is not None else d.top_k, top_p=req.top_p, seed=req.seed)
    n_new = kw.pop("max_tokens")
    lines = [f"request: {len(req.messages)} messages, {len(tokens)} prompt tokens, max_tokens {n_new}, {kw}"]
    lines += [f"[{m['role'].upper()}]: {m['content']}" for m in req.messages]
    return Job([Prompt(tokens, n_new)], kw, n=n, stop=list(stop), logprobs=logprobs, log_lines=lines)


def _register_nanochat(app, gen: Generator, tokenizer, d: Defaults):
    """POST /chat/completions: nanochat's SSE stream, `data: {"token": ..., "gpu": ...}` ... `data: {"done": true}`."""
    @app.post("/chat/completions")
    def chat_completions():
        job = _chat_job(tokenizer, d, validate_request(_parse_body()))
        worker, events = _start(gen, job, uuid.uuid4().hex[:8])

        def body():
            gpu = worker.id
            for ev in events:
                if ev[0] == "piece":
                    yield sse({"token": ev[2], "gpu": gpu})
                elif ev[0] == "error":
                    yield sse(error_body(ev[1], 500))
            yield sse({"done": True})

        return _sse_response(body())


def _register_openai(app, gen: Generator, tokenizer, d: Defaults, model_name: str):
    """POST /v1/chat/completions and /v1/completions: `stream: true` -> chunks ending in `data: [DONE]`,
    `stream: false` -> one object with usage (serve/openai_response.py)."""
    def answer(req: OpenAIRequest, job: Job, prefix: str):
        reply = Reply(req.kind, f"{prefix}-{uuid.uuid4().hex}", int(time.time()), model_name,
                      sum(len(p.tokens) for p in job.prompts), req.include_usage)
        _, events = _start(gen, job, uuid.uuid4().hex[:8])
        if req.stream:
            return _sse_response(streamed(reply, events))
        status, body = whole(reply, events, tokenizer)
        return jsonify(body), status

    @app.post("/v1/chat/completions")
    def openai_chat_completions():
        req = validate_chat(_parse_body(), model_name)
        return answer(req, _chat_job(tokenizer, d, req, req.n, req.stop, req.logprobs), "chatcmpl")

    @app.post("/v1/completions")
    def openai_completions():
        req = validate_completion(_parse_body(), model_name)
        return answer(req, _completion_job(tokenizer, d, req), "cmpl")


def _completion_job(tokenizer, d: Defaults, req: OpenAIRequest) -> Job:
    """The job of a /v1/completions request: each prompt as tokens (a text after <|bos|>, as documents are in
    pretraining; token ids as given), refused when it leaves the reply no room in the context."""
    vocab = tokenizer.get_vocab_size()
    want = req.max_tokens if req.max_tokens is not None else d.max_tokens
    prompts = []
    for i, p in enumerate(req.prompts):
        if isinstance(p, str):
            tokens, echo_start = [tokenizer.get_bos_token_id()] + tokenizer.encode(p), 1
        else:
            if not all(0 <= t < vocab for t in p):
                raise RequestError(f"prompt {i}: token ids must be in [0, {vocab})", param="prompt")
            tokens, echo_start = list(p), 0
        room = d.max_context - len(tokens)
        if room < min(want, 1):
            raise RequestError(f"prompt {i} is {len(tokens)} tokens; the model's context is {d.max_context} tokens "
                               "(prompt and reply)", param="prompt", code="context_length_exceeded")
        prompts.append(Prompt(tokens, min(want, room), echo_start if req.echo else None))
    kw = dict(temperature=req.temperature if req.temperature is not None else d.temperature,
              top_k=req.top_k if req.top_k is not None else d.top_k,
              seed=req.seed if req.seed is not None else random.randrange(2**31))
    if req.top_p is not None and req.top_p < 1.0:
        kw["top_p"] = req.top_p
    lines = [f"completion request: {len(prompts)} prompts of {[len(p.tokens) for p in prompts]} tokens, "
             f"max_tokens {want}, n {req.n}, {kw}"]
    lines += [f"[PROMPT {i}]: {p if isinstance(p, str) else tokenizer.decode(p)}" for i, p in enumerate(req.prompts)]
    return Job(prompts, kw, n=req.n, stop=req.stop, logprobs=req.logprobs, log_lines=lines)
