"""The OpenAI-compatible responses: chat.completion and text_completion objects (whole, with usage), their streamed
chunks (chat.completion.chunk, text_completion; a final usage chunk when asked; `data: [DONE]`), and logprobs in
each API's format. They are built from serve/generate.py's events; nothing here needs Flask.
"""

from __future__ import annotations

from dataclasses import dataclass

from nanochat_jax.serve.generate import Choice
from nanochat_jax.serve.protocol import error_body, sse


@dataclass
class Reply:
    """Who is answering what: the route's kind ("chat" or "completion"), the completion's id, creation time and
    model name, whether a streamed reply ends with a usage chunk, and the prompts' token count (usage)."""
    kind: str
    cid: str
    created: int
    model: str
    n_prompt: int
    include_usage: bool = False

    def object(self, chunk: bool) -> str:
        if self.kind == "chat":
            return "chat.completion.chunk" if chunk else "chat.completion"
        return "text_completion"

    def head(self, chunk: bool) -> dict:
        return {"id": self.cid, "object": self.object(chunk), "created": self.created, "model": self.model}


def usage(n_prompt: int, n_completion: int) -> dict:
    return {"prompt_tokens": n_prompt, "completion_tokens": n_completion, "total_tokens": n_prompt + n_completion}


# ---------------------------------------------------------------------------------------------------------------
# Whole responses (stream: false)

def whole(reply: Reply, events, tokenizer) -> tuple[int, dict]:
    """(HTTP status, body) from the events after ("start", worker): the completion object with every choice and
    usage, or a 500 error if generation failed."""
    choices = []
    for ev in events:
        if ev[0] == "end":
            choices.append(ev[1])
        elif ev[0] == "error":
            return 500, error_body(ev[1], 500)
    choices.sort(key=lambda c: c.index)
    body = {**reply.head(False), "choices": [_choice_object(reply.kind, c, tokenizer) for c in choices],
            "usage": usage(reply.n_prompt, sum(c.n_tokens for c in choices))}
    return 200, body


def _choice_object(kind: str, c: Choice, tokenizer) -> dict:
    if kind == "chat":
        lp = chat_logprobs(tokenizer, c.scored) if c.scored is not None else None
        return {"index": c.index, "message": {"role": "assistant", "content": c.text, "refusal": None},
                "logprobs": lp, "finish_reason": c.finish}
    lp = completion_logprobs(tokenizer, c.scored) if c.scored is not None else None
    return {"index": c.index, "text": c.echo + c.text, "logprobs": lp, "finish_reason": c.finish}


# ---------------------------------------------------------------------------------------------------------------
# Streamed responses (stream: true)

def streamed(reply: Reply, events):
    """The SSE body from the events after ("start", worker): chunks per choice (a chat choice opens with its role),
    each choice's finish chunk, the usage chunk if asked, then `data: [DONE]`. A failure mid-stream is an error
    event in OpenAI's shape (the client raises it)."""
    opened, n_completion = set(), 0
    if reply.kind == "chat":
        opened.add(0)
        yield sse(_chunk(reply, 0, {"role": "assistant", "content": ""}))
    for ev in events:
        if ev[0] == "error":
            yield sse(error_body(ev[1], 500))
            break
        index = ev[1] if ev[0] == "piece" else ev[1].index
        if reply.kind == "chat" and index not in opened:
            opened.add(index)
            yield sse(_chunk(reply, index, {"role": "assistant", "content": ""}))
        if ev[0] == "piece":
            yield sse(_chunk(reply, index, {"content": ev[2]} if reply.kind == "chat" else ev[2]))
        else:
            n_completion += ev[1].n_tokens
            yield sse(_chunk(reply, index, {} if reply.kind == "chat" else "", ev[1].finish))
    else:
        if reply.include_usage:
            yield sse({**reply.head(True), "choices": [], "usage": usage(reply.n_prompt, n_completion)})
    yield "data: [DONE]\n\n"


def _chunk(reply: Reply, index: int, delta, finish: str | None = None) -> dict:
    """One streamed piece: a chat delta ({"role"}, {"content"} or {}), or a completion's text."""
    if reply.kind == "chat":
        choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
    else:
        choice = {"index": index, "text": delta, "logprobs": None, "finish_reason": finish}
    out = {**reply.head(True), "choices": [choice]}
    if reply.include_usage:
        out["usage"] = None
    return out


# ---------------------------------------------------------------------------------------------------------------
# logprobs

def _token_text(tokenizer, token_id: int) -> str:
    return tokenizer.decode([token_id])


def chat_logprobs(tokenizer, scored) -> dict:
    """Chat's format: {"content": [{"token", "logprob", "bytes", "top_logprobs": [{"token", "logprob", "bytes"}]}]}.
    `bytes` are the UTF-8 bytes of the token's text (a token ending mid-character shows U+FFFD)."""
    tokens, lps, top_ids, top_lps, _ = scored

    def entry(t, lp):
        text = _token_text(tokenizer, t)
        return {"token": text, "logprob": lp, "bytes": list(text.encode("utf-8"))}

    content = [{**entry(t, lp), "top_logprobs": [entry(i, v) for i, v in zip(ids, vals)]}
               for t, lp, ids, vals in zip(tokens, lps, top_ids, top_lps)]
    return {"content": content, "refusal": None}


def completion_logprobs(tokenizer, scored) -> dict:
    """The legacy completions' format: {"tokens", "token_logprobs", "top_logprobs": [{token: logprob}],
    "text_offset"}; the first echoed token of a prompt has null for both, as OpenAI's."""
    tokens, lps, top_ids, top_lps, offsets = scored
    tops = [None if lp is None else {_token_text(tokenizer, i): v for i, v in zip(ids, vals)}
            for lp, ids, vals in zip(lps, top_ids, top_lps)]
    return {"tokens": [_token_text(tokenizer, t) for t in tokens], "token_logprobs": list(lps),
            "top_logprobs": tops, "text_offset": list(offsets)}
