"""The host side of a decode batch: requests, their rows in one KV cache, and the tool-use state machine.

A `Request` is one prompt and its `num_samples` completions; `DecodeBatch` holds B rows of one cache, admits a
request into free rows (one prefill, copied into each), and steps every row at once, either as one device call of up
to DECODE_CHUNK steps (`Engine._chunk`) or as single steps while a row has tool output to force in
(`Engine._step`). Between device calls it applies nanochat's tool-use state machine to each row's new tokens and
frees the rows that finished. `TextStream` turns a completion's tokens into text pieces for streaming.
"""

from __future__ import annotations

import collections
import queue
import threading
import time
from dataclasses import dataclass, field

import numpy as np

DECODE_CHUNK = 64        # most decode steps in one device call (the chunk's output buffer is (B, DECODE_CHUNK))
STREAM_SECONDS = 0.02    # a streamed chunk's target duration: tokens reach the client at least every ~20 ms
FIRST_STREAM_CHUNK = 4   # a stream's first chunk, before its step time is known
STOP_SLOTS = 4           # room for the stop tokens in the chunk's stop array


# ---------------------------------------------------------------------------------------------------------------
# Text pieces for streaming

class TextStream:
    """Turns token ids into text pieces, holding back bytes of an incomplete UTF-8 character until it completes."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.pending: list[int] = []

    def push(self, token: int) -> str:
        self.pending.append(token)
        text = self.tokenizer.decode(self.pending)
        if text.endswith("\ufffd") and len(self.pending) < 4:  # mid-character (<= 4 bytes): wait for the rest
            return ""
        self.pending = []
        return text

    def flush(self) -> str:
        text = self.tokenizer.decode(self.pending) if self.pending else ""
        self.pending = []
        return text


# ---------------------------------------------------------------------------------------------------------------
# Requests and rows (host state)

@dataclass
class Sampling:
    max_tokens: int
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int = 0

    @property
    def filtered(self) -> bool:
        return bool(self.top_k) or (self.top_p is not None and self.top_p < 1.0)


class Request:
    """One prompt and its `num_samples` completions. Tokens arrive through `events` (a queue of
    (sample, token, mask), then (sample, None, finish_reason) per sample) and accumulate in `completions`/`masks`
    (generated tokens only, no terminal token)."""

    def __init__(self, prompt: list[int], num_samples: int, sampling: Sampling, sample_offset: int = 0):
        self.prompt = [int(t) for t in prompt]
        self.num_samples = num_samples
        self.sampling = sampling
        self.sample_offset = sample_offset  # sample i uses key (i + offset, seed): chunks of one request agree
        self.completions = [[] for _ in range(num_samples)]
        self.masks = [[] for _ in range(num_samples)]
        self.finish = [None] * num_samples
        self.events: queue.SimpleQueue = queue.SimpleQueue()
        self.cancelled = False
        self.error: BaseException | None = None
        self._done = threading.Event()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def _emit(self, sample: int, token: int, mask: int):
        self.completions[sample].append(token)
        self.masks[sample].append(mask)
        self.events.put((sample, token, mask))

    def _finish(self, sample: int, reason: str):
        self.finish[sample] = reason
        self.events.put((sample, None, reason))
        if all(f is not None for f in self.finish):
            self._done.set()

    def _fail(self, error: BaseException):
        self.error = error
        for s in range(self.num_samples):
            if self.finish[s] is None:
                self._finish(s, "error")

    def cancel(self):
        """Stop generating (e.g. the client went away); its rows are freed at the next step."""
        self.cancelled = True

    def wait(self, timeout: float | None = None) -> bool:
        return self._done.wait(timeout)


@dataclass
class _Row:
    req: Request
    sample: int
    pos: int = 0                 # position of `last`, the token fed at the next step
    last: int = 0
    n_generated: int = 0
    forced: collections.deque = field(default_factory=collections.deque)
    in_python: bool = False
    expr: list = field(default_factory=list)


class DecodeBatch:
    """B rows of one KV cache and their host state: admit requests into free rows, step all rows at once. `engine`
    is the Engine (infer/engine.py) whose prefill and compiled functions it calls."""

    def __init__(self, engine, batch_size: int, logits_hook=None):
        self.e = engine
        self.B = batch_size
        self.cache = engine._new_cache(batch_size)
        self.rows: list[_Row | None] = [None] * batch_size
        self.tokens = np.zeros(batch_size, np.int32)
        self.pos = np.zeros(batch_size, np.int32)
        self.keys = np.zeros((batch_size, 2), np.uint32)
        self.temperature = np.zeros(batch_size, np.float32)
        self.top_k = np.zeros(batch_size, np.int32)
        self.top_p = np.ones(batch_size, np.float32)
        self.logits_hook = logits_hook  # f(logits (B, V), rows) after each step (tests)
        self.steps = 0
        self.emitted = 0                             # tokens accepted into rows, over the batch's life
        self.seconds_per_step: float | None = None   # measured by the last chunk

    @property
    def free_rows(self) -> int:
        return sum(r is None for r in self.rows)

    @property
    def active(self) -> int:
        return self.B - self.free_rows

    def _filtered(self) -> bool:
        return any(r is not None and r.req.sampling.filtered for r in self.rows)

    def admit(self, req: Request) -> list[int]:
        """Prefill `req.prompt` once and start its samples in free rows (raises if too few are free)."""
        free = [i for i, r in enumerate(self.rows) if r is None][:req.num_samples]
        if len(free) < req.num_samples:
            raise RuntimeError(f"{req.num_samples} rows needed, {len(free)} free")
        s = req.sampling
        mask = np.zeros(self.B, bool)
        for j, b in enumerate(free):
            mask[b] = True
            self.rows[b] = _Row(req, j, pos=len(req.prompt))
            self.pos[b] = len(req.prompt)
            self.keys[b] = (j + req.sample_offset, s.seed & 0xFFFFFFFF)  # = PRNGKey(seed) for sample 0
            self.temperature[b] = s.temperature
            self.top_k[b] = s.top_k or 0
            self.top_p[b] = s.top_p if s.top_p is not None else 1.0
        try:
            logits, cache1 = self.e.prefill(req.prompt)
        except Exception as err:
            for b in free:
                self.rows[b] = None
            req._fail(err)
            raise
        try:
            first, self.cache = self.e._admit(self.cache, cache1, mask, logits, self.keys, self.pos,
                                              self.temperature, self.top_k, self.top_p, filtered=self._filtered())
        finally:
            self.e._release_prefill_cache(cache1)
        first = np.asarray(first)
        for b in free:
            self._accept(b, int(first[b]))
        return free

    def step(self, max_steps: int = 1, exit_on_pause: bool = False):
        """Decode up to `max_steps` tokens for every row in one device call (free rows compute too, on dummy input,
        and are ignored). More than one step runs as a device-side chunk (Engine._chunk) that stops early where
        the host must act; a row with forced tokens queued (a tool's output), or a logits hook, takes single steps.
        Returns the number of device steps run."""
        for b, r in enumerate(self.rows):
            if r is not None and r.req.cancelled:
                self._free(b, "cancelled")
        if not self.active:
            return 0
        if max_steps > 1 and self.logits_hook is None and not any(r is not None and r.forced for r in self.rows):
            return self._run_chunk(min(max_steps, DECODE_CHUNK), exit_on_pause)
        self._single_step()
        return 1

    def _run_chunk(self, n: int, exit_on_pause: bool) -> int:
        e = self.e
        budget = np.zeros(self.B, np.int32)
        in_python = np.zeros(self.B, bool)
        for b, r in enumerate(self.rows):
            if r is not None:   # the same limits as _accept: max_tokens, and the context's last position
                budget[b] = max(0, min(r.req.sampling.max_tokens - r.n_generated, e.max_len - 1 - r.pos))
                in_python[b] = r.in_python
        stop = np.full(STOP_SLOTS, -1, np.int32)
        stop[:len(e.stop_tokens)] = sorted(e.stop_tokens)
        python = np.array([e.python_start, e.python_end], np.int32)
        t0 = time.perf_counter()
        out, count, self.cache = e._chunk(e.params, self.cache, self.tokens, self.pos, budget, in_python, self.keys,
                                          self.temperature, self.top_k, self.top_p, stop, python, np.int32(n),
                                          np.bool_(exit_on_pause), filtered=self._filtered())
        out, count = np.asarray(out), np.asarray(count)
        steps = int(count.max())
        if steps:
            self.seconds_per_step = (time.perf_counter() - t0) / steps
        self.steps += steps
        for b, r in enumerate(self.rows):
            for tok in out[b, :count[b]]:
                r.pos += 1
                self._accept(b, int(tok))
        return steps

    def steps_within(self, seconds: float) -> int:
        """How many decode steps fit in `seconds` at the measured rate (at least 1): a streaming chunk's size."""
        if self.seconds_per_step is None:
            return FIRST_STREAM_CHUNK
        return max(1, min(DECODE_CHUNK, int(seconds / self.seconds_per_step)))

    def _single_step(self):
        nxt, logits, self.cache = self.e._step(self.e.params, self.cache, self.tokens, self.pos, self.keys,
                                               self.temperature, self.top_k, self.top_p, filtered=self._filtered())
        if self.logits_hook is not None:
            self.logits_hook(logits, list(self.rows))
        nxt = np.asarray(nxt)
        self.steps += 1
        for b, r in enumerate(self.rows):
            if r is not None:
                r.pos += 1
                self._accept(b, int(nxt[b]))

    def _accept(self, b: int, sampled: int):
        """Row b's next token: a forced one if queued, else `sampled`; advance the tool state machine."""
        r, e = self.rows[b], self.e
        if r.forced:
            tok, mask = r.forced.popleft(), 0
        else:
            tok, mask = sampled, 1
        r.n_generated += 1
        self.emitted += 1
        if tok in e.stop_tokens:
            return self._free(b, "stop")
        r.req._emit(r.sample, tok, mask)
        if tok == e.python_start:
            r.in_python, r.expr = True, []
        elif tok == e.python_end and r.in_python:
            r.in_python = False
            if r.expr:
                r.forced.extend(e._tool_output(r.expr))
            r.expr = []
        elif r.in_python:
            r.expr.append(tok)
        if r.n_generated >= r.req.sampling.max_tokens or r.pos >= e.max_len - 1:
            return self._free(b, "length")
        r.last = tok
        self.tokens[b] = tok
        self.pos[b] = r.pos

    def _free(self, b: int, reason: str):
        r = self.rows[b]
        self.rows[b] = None
        self.tokens[b] = 0
        self.pos[b] = 0
        r.req._finish(r.sample, reason)
