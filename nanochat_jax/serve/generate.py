"""Running a request on the slot pool: its choices (n per prompt) streamed from the engine one after another on one
slot, cut at stop strings, and scored for logprobs when asked.

`Generator.run(job, rid)` is a generator of events the routes turn into their protocol's responses:
    ("start", worker)             a slot is held (first event unless the pool is busy)
    ("piece", index, text)        text of choice `index`, as it is generated (stop text never appears)
    ("end", Choice)               choice `index` is complete
    ("busy",) or ("error", msg)   no slot within the wait, or the engine failed
A slot is held from the first next() until the generator finishes or is closed (the client went away).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from nanochat_jax.infer.batch import TextStream
from nanochat_jax.serve.pool import SlotPool
from nanochat_jax.serve.protocol import log_text, stop_token_ids

log = logging.getLogger("nanochat_jax.serve")


@dataclass
class Prompt:
    """One prompt's tokens, its reply budget, and where its echo starts (completions' `echo`: tokens[echo_start:]
    are returned with the text; 1 skips the <|bos|> the server put in front of a text prompt)."""
    tokens: list
    max_tokens: int
    echo_start: int | None = None


@dataclass
class Job:
    """What to generate: `n` choices for each prompt (choice index = prompt index * n + j), sampled with `kw`
    (engine.stream's temperature, top_k, top_p, seed; choice j uses seed + j), cut at the `stop` strings; with
    `logprobs` k (None: off) each choice is scored with its k most likely alternatives per token."""
    prompts: list
    kw: dict
    n: int = 1
    stop: list = field(default_factory=list)
    logprobs: int | None = None
    log_lines: list = field(default_factory=list)


@dataclass
class Choice:
    """A finished choice. `text` is the generated text; `echo` the echoed prompt's text, returned before it.
    `tokens` are the generated tokens whose text was returned (a stop string's tokens are not), `offsets` each one's
    character offset in `text`; `n_tokens` counts every token generated (usage).
    `scored` (with logprobs): (tokens, logprobs, top_ids, top_logprobs, offsets in echo + text) of the echoed prompt
    (if any) and `tokens`; a logprob is None where there is nothing before a token to predict it from."""
    index: int
    prompt: int
    text: str
    finish: str
    n_tokens: int
    tokens: list
    offsets: list
    echo: str = ""
    scored: tuple | None = None


class StopText:
    """Cuts a stream of text pieces at the first of the `stops` strings. Text that could be the start of one is held
    back until the next piece shows it is not, so no part of a stop string is ever returned."""

    def __init__(self, stops):
        self.stops = list(stops)
        self.held = ""

    def push(self, piece: str) -> tuple[str, bool]:
        """(text that may be returned now, whether a stop string was found: nothing more is returned then)."""
        text = self.held + piece
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.held = ""
            return text[:min(hits)], True
        keep = max((k for s in self.stops for k in range(1, min(len(s), len(text) + 1)) if text.endswith(s[:k])),
                   default=0)
        self.held = text[len(text) - keep:]
        return text[:len(text) - keep], False

    def flush(self) -> str:
        """The held text, once the stream ended without a stop string."""
        held, self.held = self.held, ""
        return held


class Generator:
    """Runs jobs on the slot pool's engines (see the module docstring for the events)."""

    def __init__(self, pool: SlotPool, tokenizer, acquire_timeout: float):
        self.pool, self.tokenizer, self.acquire_timeout = pool, tokenizer, acquire_timeout
        self.stop_ids = stop_token_ids(tokenizer)

    def run(self, job: Job, rid: str):
        pool = self.pool
        for line in job.log_lines:
            log.info("[%s] %s", rid, log_text(line))
        pool.count("requests")
        w = pool.acquire(self.acquire_timeout)
        if w is None:
            yield ("busy",)
            return
        t0, n, status, texts = time.time(), 0, "cancelled", []
        try:
            yield ("start", w)
            for p, prompt in enumerate(job.prompts):
                for j in range(job.n):
                    choice = yield from self._choice(w, job, p, prompt, j)
                    n += choice.n_tokens
                    texts.append(choice.text)
                    yield ("end", choice)
            status = "completed"
        except GeneratorExit:
            status = "cancelled"
            raise
        except Exception:
            status = "failed"
            log.exception("[%s] generation failed", rid)
            yield ("error", "generation failed")
        finally:
            pool.release(w)
            pool.count(status)
            pool.count("tokens_generated", n)
            log.info("[%s] [ASSISTANT] (worker %d, %s, %d tokens, %.2fs): %s", rid, w.id, status, n,
                     time.time() - t0, log_text(" | ".join(texts)))

    def _choice(self, w, job: Job, p: int, prompt: Prompt, j: int):
        """Stream choice j of prompt p (yielding its pieces); returns its Choice."""
        index = p * job.n + j
        echo = ""
        if prompt.echo_start is not None:
            echo = decode_with_offsets(self.tokenizer, prompt.tokens[prompt.echo_start:])[0]
            if echo:
                yield ("piece", index, echo)
        stops = StopText(job.stop)
        tokens, offsets, parts, raw_len, n, finish, stopped = [], [], [], 0, 0, "length", False
        if prompt.max_tokens > 0:
            kw = dict(job.kw, max_tokens=prompt.max_tokens, seed=(job.kw["seed"] + j) % 2**31)
            stream = w.engine.stream(prompt.tokens, **kw)
            try:
                for token_id, piece in stream:
                    if token_id in self.stop_ids:
                        finish = "stop"
                        break
                    n += 1
                    tokens.append(token_id)
                    offsets.append(raw_len)
                    raw_len += len(piece)
                    text, stopped = stops.push(piece)
                    if text:
                        parts.append(text)
                        yield ("piece", index, text)
                    if stopped:
                        finish = "stop"
                        break
                else:
                    finish = "length" if n >= prompt.max_tokens else "stop"
            finally:
                stream.close()  # an engine that batches requests frees this request's row here
        tail = "" if stopped else stops.flush()
        if tail:
            parts.append(tail)
            yield ("piece", index, tail)
        text = "".join(parts)
        if stopped:  # keep the tokens that hold returned text
            offsets = [o for o in offsets if o < len(text)]
            tokens = tokens[:len(offsets)]
        choice = Choice(index, p, text, finish, n, tokens, offsets, echo)
        if job.logprobs is not None:
            choice.scored = self._score(w, prompt, choice, job.logprobs)
        return choice

    def _score(self, w, prompt: Prompt, choice: Choice, top: int):
        """(tokens, logprobs, top_ids, top_logprobs, offsets) of the echoed prompt and the choice's tokens; the
        echoed text's offsets come first, the choice's follow it."""
        echo = prompt.tokens[prompt.echo_start:] if prompt.echo_start is not None else []
        seq = list(prompt.tokens) + list(choice.tokens)
        first = len(prompt.tokens) - len(echo)  # position of the first scored token
        if len(seq) == first:
            return [], [], [], [], []
        lps, top_ids, top_lps = w.engine.score(seq, max(first, 1), top)
        lps, top_ids, top_lps = [float(x) for x in lps], top_ids.tolist(), top_lps.tolist()
        if first == 0:  # the very first token has nothing before it
            lps, top_ids, top_lps = [None] + lps, [[]] + top_ids, [[]] + top_lps
        echo_offsets = decode_with_offsets(self.tokenizer, echo)[1]
        return (echo + list(choice.tokens), lps, top_ids, top_lps,
                echo_offsets + [len(choice.echo) + o for o in choice.offsets])


def decode_with_offsets(tokenizer, tokens) -> tuple[str, list[int]]:
    """The text of `tokens` and each token's character offset in it (a token ending mid-character gets the offset of
    the character it starts)."""
    stream, parts, offsets, n = TextStream(tokenizer), [], [], 0
    for t in tokens:
        offsets.append(n)
        piece = stream.push(t)
        parts.append(piece)
        n += len(piece)
    parts.append(stream.flush())
    return "".join(parts), offsets
