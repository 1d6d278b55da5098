"""Continuous batching: one decode batch, running on a background thread, that concurrent requests join and
leave (infer/batch.py holds the batch; infer/engine.py the compiled functions it calls)."""

from __future__ import annotations

import collections
import threading

from nanochat_jax.infer.batch import STREAM_SECONDS, DecodeBatch, Request, TextStream
from nanochat_jax.infer.engine import Engine


class BatchScheduler:
    """Serves concurrent requests from one running decode batch: a request joins free rows as soon as there are
    enough (its prompt is prefilled between two steps), and its rows are freed when it finishes or is cancelled.
    A background thread runs the loop; `submit`/`stream` may be called from any thread.

        scheduler = BatchScheduler(engine, batch_size=16)
        for token_id, piece in scheduler.stream(ids, max_tokens=256, temperature=0.8, top_k=50, seed=1): ...
        req = scheduler.submit(ids, num_samples=2, max_tokens=64); req.wait(); req.completions
        scheduler.stats(); scheduler.close()
    """

    def __init__(self, engine: Engine, batch_size: int | None = None):
        self.engine = engine
        self.batch_size = int(batch_size or engine.max_batch)
        self._batch = DecodeBatch(engine, self.batch_size)
        self._waiting: collections.deque[Request] = collections.deque()
        self._cond = threading.Condition()
        self._closed = False
        self.counters = {"requests": 0, "completed": 0, "steps": 0, "tokens": 0}
        self._thread = threading.Thread(target=self._loop, name="nanochat-batch", daemon=True)
        self._thread.start()

    @property
    def slots(self) -> int:
        return self.batch_size

    def submit(self, tokens: list[int], num_samples: int = 1, max_tokens: int | None = None,
               temperature: float = 1.0, top_k: int | None = None, seed: int = 0,
               top_p: float | None = None) -> Request:
        if num_samples > self.batch_size:
            raise ValueError(f"num_samples {num_samples} > batch size {self.batch_size}")
        req = self.engine._requests([tokens], num_samples, max_tokens, temperature, top_k, top_p, seed)[0]
        with self._cond:
            if self._closed:
                raise RuntimeError("scheduler is closed")
            self._waiting.append(req)
            self.counters["requests"] += 1
            self._cond.notify()
        return req

    def stream(self, tokens: list[int], max_tokens: int | None = None, temperature: float = 1.0,
               top_k: int | None = None, seed: int = 0, top_p: float | None = None):
        """As Engine.stream, served from the shared batch. Closing the generator cancels the request."""
        req = self.submit(tokens, 1, max_tokens, temperature, top_k, seed, top_p)
        text = TextStream(self.engine.tokenizer)
        try:
            while True:
                _, tok, _ = req.events.get()
                if tok is None:
                    if req.error is not None:
                        raise RuntimeError(f"generation failed: {req.error}") from req.error
                    return
                yield tok, text.push(tok)
        finally:
            req.cancel()

    def generate(self, tokens, num_samples=1, **kw):
        """Blocking: (completions, masks) of one request served from the shared batch."""
        req = self.submit(tokens, num_samples, **kw)
        req.wait()
        if req.error is not None:
            raise RuntimeError(f"generation failed: {req.error}") from req.error
        return req.completions, req.masks

    def stats(self) -> dict:
        with self._cond:
            return {**self.counters, "active_rows": self._batch.active, "free_rows": self._batch.free_rows,
                    "waiting": len(self._waiting), "batch_size": self.batch_size}

    def close(self, timeout: float = 10.0):
        with self._cond:
            self._closed = True
            for r in self._waiting:
                r.cancel()
            self._cond.notify()
        self._thread.join(timeout)

    def _loop(self):
        batch, running = self._batch, []
        while True:
            with self._cond:
                while not self._closed and not self._waiting and not batch.active:
                    self._cond.wait()
                if self._closed:
                    break
                admit = []
                free = batch.free_rows
                while self._waiting and self._waiting[0].num_samples <= free:
                    req = self._waiting.popleft()
                    if not req.cancelled:
                        admit.append(req)
                        free -= req.num_samples
                    else:
                        req._fail(RuntimeError("cancelled"))
            for req in admit:
                try:
                    batch.admit(req)
                    running.append(req)
                except Exception:  # a bad prompt fails its own request (admit marks it), not the server
                    pass
            n_rows, steps, emitted = batch.active, 0, batch.emitted
            if n_rows:
                try:   # short chunks (a streamed piece every STREAM_SECONDS), back as soon as a row frees up
                    steps = batch.step(batch.steps_within(STREAM_SECONDS), exit_on_pause=True)
                except Exception as err:  # a broken step fails everything running, and the loop goes on
                    for b, r in enumerate(batch.rows):
                        if r is not None:
                            batch.rows[b] = None
                            r.req._fail(err)
                    batch.cache = self.engine._new_cache(self.batch_size)  # the old one was donated
            finished = [r for r in running if r.done]
            running = [r for r in running if not r.done]
            with self._cond:
                self.counters["steps"] += steps
                self.counters["tokens"] += batch.emitted - emitted
                self.counters["completed"] += len(finished)
        # closing: fail what is still running
        for b, r in enumerate(batch.rows):
            if r is not None:
                batch._free(b, "cancelled")
