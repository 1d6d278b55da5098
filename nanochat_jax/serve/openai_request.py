"""The OpenAI-compatible requests, POST /v1/chat/completions and POST /v1/completions: every field is checked, and
one that is unknown, or known and not implemented, is refused with a 400 naming it (never silently ignored).

Supported on both routes: model (must be the served one, see GET /v1/models), stream, stream_options.include_usage,
temperature, top_p, top_k (an extension), max_tokens, n (1..4), seed, stop (a string or up to 4), user. Chat adds
messages (system/developer, user, assistant; text content), max_completion_tokens, logprobs + top_logprobs (0..20);
completions add prompt (a string, or token ids, or a list of up to 16 of either), echo and logprobs (0..5). Accepted
only at their neutral value: frequency_penalty and presence_penalty 0, logit_bias {}, response_format text,
best_of 1 (completions).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from nanochat_jax.serve.protocol import (MAX_TOTAL_CHARS, RequestError, check_fields, check_text, is_int, is_number,
                                         read_sampling, shorten, valid_messages)

N_RANGE = (1, 4)                 # choices per prompt
MAX_STOPS = 4                    # stop strings per request, as OpenAI allows
MAX_STOP_CHARS = 256
TOP_LOGPROBS_RANGE = (0, 20)     # chat's top_logprobs, as OpenAI allows
COMPLETION_LOGPROBS_RANGE = (0, 5)  # the legacy completions' logprobs, as OpenAI allows
MAX_PROMPTS = 16                 # prompts in one /v1/completions request

COMMON_FIELDS = {"model", "stream", "stream_options", "temperature", "top_p", "top_k", "max_tokens", "n", "seed",
                 "stop", "user", "frequency_penalty", "presence_penalty", "logit_bias"}
CHAT_FIELDS = COMMON_FIELDS | {"messages", "max_completion_tokens", "logprobs", "top_logprobs", "response_format"}
COMPLETION_FIELDS = COMMON_FIELDS | {"prompt", "logprobs", "echo", "best_of"}
# OpenAI request fields this server knows and does not implement: refused as "not supported"
UNSUPPORTED = {"tools", "tool_choice", "functions", "function_call", "parallel_tool_calls", "audio", "modalities",
               "prediction", "reasoning_effort", "web_search_options", "service_tier", "store", "metadata", "suffix",
               "verbosity"}


@dataclass
class OpenAIRequest:
    """A validated OpenAI request. Sampling settings left None use the server's defaults.

    kind: "chat" (messages) or "completion" (prompts: each a str, or a list of token ids).
    logprobs: None = off; k = each token's logprob with the k most likely alternatives.
    """
    kind: str
    messages: list | None = None
    prompts: list | None = None
    stream: bool = False
    include_usage: bool = False
    temperature: float | None = None
    top_k: int | None = None
    max_tokens: int | None = None
    top_p: float | None = None
    seed: int | None = None
    n: int = 1
    stop: list = field(default_factory=list)
    logprobs: int | None = None
    echo: bool = False


def validate_chat(body, model_name: str) -> OpenAIRequest:
    """A /v1/chat/completions body, checked (RequestError on the first thing wrong with it)."""
    body = _object(body)
    check_fields(body, CHAT_FIELDS, UNSUPPORTED)
    if body.get("max_tokens") is not None and body.get("max_completion_tokens") is not None:
        raise RequestError("give max_tokens or max_completion_tokens, not both", param="max_tokens")
    req = OpenAIRequest("chat", messages=valid_messages(body.get("messages"), ("system", "user", "assistant")))
    _read_common(body, req, model_name)
    read_sampling(body, req, "max_completion_tokens" if body.get("max_tokens") is None else "max_tokens")
    fmt = body.get("response_format")
    if fmt is not None and fmt != {"type": "text"}:
        raise RequestError("response_format: only {\"type\": \"text\"} is supported", param="response_format",
                           code="unsupported_value")
    logprobs, top = body.get("logprobs"), body.get("top_logprobs")
    if logprobs is not None and not isinstance(logprobs, bool):
        raise RequestError("logprobs must be true or false", param="logprobs")
    if top is not None:
        if not logprobs:
            raise RequestError("top_logprobs needs logprobs: true", param="top_logprobs")
        _check_int(top, "top_logprobs", TOP_LOGPROBS_RANGE)
    if logprobs:
        req.logprobs = top or 0
    _no_streamed_logprobs(req)
    return req


def validate_completion(body, model_name: str) -> OpenAIRequest:
    """A /v1/completions body, checked. max_tokens may be 0 with echo: true (score a text without generating)."""
    body = _object(body)
    check_fields(body, COMPLETION_FIELDS, UNSUPPORTED)
    req = OpenAIRequest("completion", prompts=_valid_prompts(body.get("prompt")))
    _read_common(body, req, model_name)
    echo = body.get("echo")
    if echo is not None and not isinstance(echo, bool):
        raise RequestError("echo must be true or false", param="echo")
    req.echo = bool(echo)
    read_sampling(body, req, min_tokens=0 if req.echo else 1)
    logprobs = body.get("logprobs")
    if logprobs is not None:
        _check_int(logprobs, "logprobs", COMPLETION_LOGPROBS_RANGE)
        req.logprobs = logprobs
    best_of = body.get("best_of")
    if best_of is not None and best_of != 1:
        raise RequestError("best_of: only 1 is supported", param="best_of", code="unsupported_value")
    _no_streamed_logprobs(req)
    return req


# ---------------------------------------------------------------------------------------------------------------
# The parts

def _object(body) -> dict:
    if not isinstance(body, dict):
        raise RequestError("request body must be a JSON object")
    return body


def _check_int(x, name: str, bounds: tuple[int, int]):
    if not is_int(x) or not bounds[0] <= x <= bounds[1]:
        raise RequestError(f"{name} must be an integer from {bounds[0]} to {bounds[1]}", param=name)


def _no_streamed_logprobs(req: OpenAIRequest):
    # logprobs are scored after a choice is complete (infer/engine.Engine.score), so they cannot ride on its chunks
    if req.stream and req.logprobs is not None:
        raise RequestError("logprobs are not supported with stream: true; ask without streaming", param="logprobs",
                           code="unsupported_value")


def _read_common(body: dict, req: OpenAIRequest, model_name: str):
    """model, stream, stream_options, n, stop, user, and the neutral-only fields, into `req`."""
    model = body.get("model")
    if model is not None:
        if not isinstance(model, str):
            raise RequestError("model must be a string", param="model")
        if model != model_name:
            raise RequestError(f"The model '{shorten(model)}' does not exist; this server serves '{model_name}' "
                               "(GET /v1/models)", param="model", code="model_not_found", status=404)
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise RequestError("stream must be true or false", param="stream")
    req.stream = bool(stream)
    options = body.get("stream_options")
    if options is not None:
        if not req.stream:
            raise RequestError("stream_options is only allowed with stream: true", param="stream_options")
        if not isinstance(options, dict) or set(options) - {"include_usage"} \
                or not isinstance(options.get("include_usage", False), bool):
            raise RequestError("stream_options must be {\"include_usage\": true or false}", param="stream_options")
        req.include_usage = options.get("include_usage", False)
    n = body.get("n")
    if n is not None:
        _check_int(n, "n", N_RANGE)
        req.n = n
    req.stop = _valid_stop(body.get("stop"))
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise RequestError("user must be a string", param="user")
    for key in ("frequency_penalty", "presence_penalty"):
        value = body.get(key)
        if value is not None and (not is_number(value) or value != 0):
            raise RequestError(f"{key}: only 0 is supported", param=key, code="unsupported_value")
    bias = body.get("logit_bias")
    if bias is not None and bias != {}:
        raise RequestError("logit_bias is not supported (only {})", param="logit_bias", code="unsupported_value")


def _valid_stop(stop) -> list[str]:
    """`stop` as a list of up to MAX_STOPS non-empty strings."""
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise RequestError("stop must be a string or a list of strings", param="stop")
    if len(stops) > MAX_STOPS:
        raise RequestError(f"stop: at most {MAX_STOPS} sequences", param="stop")
    for s in stops:
        if not s or len(s) > MAX_STOP_CHARS:
            raise RequestError(f"stop sequences must hold 1 to {MAX_STOP_CHARS} characters", param="stop")
        check_text(s, "a stop sequence", "stop")
    return list(stops)


def _valid_prompts(prompt) -> list:
    """`prompt` as a list of prompts, each a str or a non-empty list of token ids (their range is checked against the
    vocabulary when the prompt is planned)."""
    if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and all(is_int(t) for t in prompt)):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt:
        prompts = prompt
    else:
        raise RequestError("prompt must be a string, a list of token ids, or a non-empty list of either",
                           param="prompt")
    if len(prompts) > MAX_PROMPTS:
        raise RequestError(f"at most {MAX_PROMPTS} prompts per request", param="prompt")
    total = 0
    for i, p in enumerate(prompts):
        if isinstance(p, str):
            check_text(p, f"prompt {i}", "prompt")
        elif not (isinstance(p, list) and p and all(is_int(t) for t in p)):
            raise RequestError(f"prompt {i} must be a string or a non-empty list of token ids", param="prompt")
        total += len(p)
    if total > MAX_TOTAL_CHARS:
        raise RequestError(f"prompt is too long: at most {MAX_TOTAL_CHARS} characters (or tokens) in total",
                           param="prompt")
    return prompts
