"""The slot pool: which worker serves which request, and the counters /stats reports.

A *worker* is anything with `.stream(tokens, max_tokens=, temperature=, top_k=, seed=)` yielding
`(token_id, text_piece)` (the `infer.engine.Engine` interface). Each worker offers `slots` concurrent streams: 1 for
a plain engine (nanochat's worker-per-device pool), more for an engine that batches requests into one decode step.
Requests beyond the free slots wait in a queue, at most `max_waiting` of them (each holds a server thread while it
waits; beyond that a request is answered "busy" at once, so threads stay free for /health and short requests).
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass


@dataclass
class Worker:
    """One engine (usually one per device). `slots` = how many streams it serves at once."""
    engine: object
    id: int = 0
    device: str = "cpu"
    slots: int = 1


class SlotPool:
    """A queue of free (worker, slot) pairs, plus request counters. Thread-safe."""

    def __init__(self, workers: list[Worker], max_waiting: int | None = None):
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
        self.waiting = 0
        self.max_waiting = max_waiting
        self.started = time.time()

    def acquire(self, timeout: float) -> Worker | None:
        """A free worker slot, waiting up to `timeout` s for one; None when none came or too many already wait."""
        with self.lock:
            if self.max_waiting is not None and self.waiting >= self.max_waiting and self.free.empty():
                return None
            self.waiting += 1
        try:
            w = self.free.get(timeout=timeout)
        except queue.Empty:
            return None
        finally:
            with self.lock:
                self.waiting -= 1
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
            active, waiting = self.active, self.waiting
        return {"total_slots": self.total, "available_slots": self.free.qsize(), "busy_slots": active,
                "waiting": waiting,
                "uptime_s": round(time.time() - self.started, 1), **c,
                "workers": [{"id": w.id, "device": w.device, "slots": w.slots,
                             **({"engine": w.engine.stats()} if callable(getattr(w.engine, "stats", None)) else {})}
                            for w in self.workers]}
