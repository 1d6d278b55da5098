"""Test doubles for the chat server: a byte-level tokenizer and an engine that streams a scripted reply.

Shared by tests/test_web_server.py, tests/test_web_page.py and tests/test_chat_cli.py. The fake engine has the
`engine.Engine.stream` interface: stream(tokens, max_tokens=, temperature=, top_k=, seed=) -> (token_id, text).
"""

from __future__ import annotations

import contextlib
import http.client
import json
import threading
import time

import numpy as np

from nanochat_jax.data.tokenizer import Tokenizer
from nanochat_jax.serve.server import serve

SPECIALS = ["<|bos|>", "<|user_start|>", "<|user_end|>", "<|assistant_start|>", "<|assistant_end|>",
            "<|python_start|>", "<|python_end|>", "<|output_start|>", "<|output_end|>"]
OFFSET = len(SPECIALS)  # byte b is token b + OFFSET


class FakeTokenizer:
    """Bytes as tokens, the 9 special tokens first; conversations render in the real tokenizer's chat format."""

    bos_token_id = 0
    render_conversation = Tokenizer.render_conversation
    render_for_completion = Tokenizer.render_for_completion

    def get_bos_token_id(self):
        return 0

    def get_vocab_size(self):
        return OFFSET + 256

    def encode_special(self, name):
        return SPECIALS.index(name)

    def encode(self, text, prepend=None, append=None):
        return [b + OFFSET for b in text.encode("utf-8")]

    def decode(self, ids):
        return bytes(i - OFFSET for i in ids if i >= OFFSET).decode("utf-8", errors="replace")


def last_user_text(tokens) -> str:
    """The text of the last user turn in a rendered prompt."""
    us, ue = SPECIALS.index("<|user_start|>"), SPECIALS.index("<|user_end|>")
    start = len(tokens) - 1 - tokens[::-1].index(us)
    end = tokens.index(ue, start)
    return FakeTokenizer().decode(tokens[start + 1:end])


def fake_logprob(token: int) -> float:
    """The fake engine's logprob of `token`, whatever came before it."""
    return -0.25 * (token % 4) - 0.125


class FakeEngine:
    """Replies "echo: <last user message>" one character per token, sleeping `delay` s before each; a prompt without
    a user turn (a plain completion) gets `reply` or "echo: <the prompt's text>".

    Counts streams that are running, the most that ever ran at once, and those closed early (client gone).
    `reply` overrides the scripted text; `temperature > 0` appends " (t=<temperature>)" so tests see it arrive.
    """

    def __init__(self, delay=0.0, reply=None):
        self.delay, self.reply = delay, reply
        self.lock = threading.Lock()
        self.running = self.max_running = self.closed_early = self.finished = 0
        self.calls, self.scores = [], []

    def stream(self, tokens, max_tokens=64, temperature=0.0, top_k=0, seed=0, top_p=None):
        with self.lock:
            self.calls.append(dict(tokens=list(tokens), max_tokens=max_tokens, temperature=temperature,
                                   top_k=top_k, seed=seed, top_p=top_p))
            self.running += 1
            self.max_running = max(self.max_running, self.running)
        us = SPECIALS.index("<|user_start|>")
        said = last_user_text(tokens) if us in tokens else FakeTokenizer().decode(tokens)
        text = self.reply if self.reply is not None else "echo: " + said
        if self.reply is None and temperature > 0:
            text += f" (t={temperature:g})"
        done = False
        try:
            for i, ch in enumerate(text[:max_tokens]):
                if self.delay:
                    time.sleep(self.delay)
                yield ord(ch) + OFFSET, ch
            done = True
        finally:
            with self.lock:
                self.running -= 1
                if done:
                    self.finished += 1
                else:
                    self.closed_early += 1


    def score(self, tokens, start=1, top=0):
        """engine.Engine.score's interface: token t has logprob fake_logprob(t); the top alternatives at every
        position are tokens OFFSET + 0, 1, ... with logprobs -1, -2, ..."""
        self.scores.append(dict(tokens=list(tokens), start=start, top=top))
        n = len(tokens) - start
        lps = np.array([fake_logprob(t) for t in tokens[start:]], np.float32)
        ids = np.tile(np.arange(OFFSET, OFFSET + top, dtype=np.int32), (n, 1))
        vals = np.tile(-np.arange(1, top + 1, dtype=np.float32), (n, 1))
        return lps, ids, vals


# ---------------------------------------------------------------------------------------------------------------
# A real server on 127.0.0.1 in a background thread

@contextlib.contextmanager
def running_server(app, **kw):
    """Serve `app` on a free port of 127.0.0.1 (serve/server.py's waitress server; `kw` its settings); yields the
    port."""
    server = serve(app, "127.0.0.1", 0, **kw)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.port
    finally:
        server.shutdown()
        thread.join(timeout=10)


def request(port, method, path, body=None, content_type="application/json", timeout=30):
    """(status, headers dict, body bytes). `body` may be bytes, str or a JSON-able object."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        headers = {}
        if body is not None:
            if not isinstance(body, (bytes, str)):
                body = json.dumps(body)
            if isinstance(body, str):
                body = body.encode("utf-8")
            if content_type:
                headers["Content-Type"] = content_type
        try:
            conn.request(method, path, body=body, headers=headers)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server may answer (413) and close before reading all of a huge body
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def sse_events(raw: bytes) -> list[str]:
    """The `data:` payloads of an SSE body, in order."""
    out = []
    for block in raw.decode("utf-8").split("\n\n"):
        for line in block.splitlines():
            if line.startswith("data: "):
                out.append(line[len("data: "):])
    return out
