"""Generation: a static KV cache, a jitted prefill per prompt-length bucket, decoding in device-side chunks of
steps with sampling inside the jit, and nanochat's tool-use state machine on the host between chunks.

Shapes never depend on a prompt or a step: the cache holds, per layer, (B, KV, D, Tmax) keys and (B, KV, Tmax, D)
values (see model.KVCache) for a fixed batch of B *rows*, each row at its own position (pos: int32[B], traced), so
rows at different positions share one decode step. A prompt is prefilled in a batch-1 cache, padded up to a length
bucket (powers of two up to max_len), then copied into the rows that will continue it (num_samples rows share one
prefill).

Decoding runs up to DECODE_CHUNK steps per device call (`Engine._chunk`, a `lax.while_loop`): every step feeds each
row's last token back in, and a row pauses on the device where the host must act (a stop token, a closed tool
call, its token budget), so the host sees the same tokens as with one call per step, without a round trip per
token. `generate`/`generate_batch` run whole chunks; `stream` and `BatchScheduler` size theirs to about
STREAM_SECONDS from the measured step time, so text still arrives every few tens of milliseconds. While a row has
tool output to force in, the batch takes single steps (`Engine._step`). Compiled functions: one prefill per bucket
used, and one chunk, one single step and one row-admission function per batch size and sampling kind (plain, or
top-k/top-p).

    engine = Engine(params, config, tokenizer)
    results, masks = engine.generate(prompt_ids, num_samples=4, max_tokens=64, temperature=0.8, top_k=50)
    for token_id, text_piece in engine.stream(prompt_ids, max_tokens=64): print(text_piece, end="")
    per_prompt = engine.generate_batch([ids_a, ids_b], num_samples=2, max_tokens=64)   # completions only
    scheduler = BatchScheduler(engine)        # continuous batching: requests join and leave a running batch
    for token_id, text_piece in scheduler.stream(prompt_ids, max_tokens=64): ...

Tool use (as nanochat): the text between <|python_start|> and <|python_end|> goes to `tool` (the calculator, run in
the sandbox); its result is forced into the row as <|output_start|> result <|output_end|>, with mask 0. A row ends at
<|assistant_end|> or <|bos|> (neither is returned), at max_tokens, or when it fills the context.
"""

from __future__ import annotations

import collections
import queue
import threading
import time
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np

from nanochat_jax.core.common import compute_dtype
from nanochat_jax.infer.execution import calculator

MIN_BUCKET = 16  # smallest prefill length: shorter prompts share one compiled prefill
DECODE_CHUNK = 64        # most decode steps in one device call (the chunk's output buffer is (B, DECODE_CHUNK))
STREAM_SECONDS = 0.02    # a streamed chunk's target duration: tokens reach the client at least every ~20 ms
FIRST_STREAM_CHUNK = 4   # a stream's first chunk, before its step time is known
STOP_SLOTS = 4           # room for the stop tokens in the chunk's stop array


def prompt_buckets(max_len: int, smallest: int = MIN_BUCKET) -> tuple[int, ...]:
    """Prefill lengths: powers of two from `smallest` below max_len, then max_len itself."""
    out, b = [], smallest
    while b < max_len:
        out.append(b)
        b *= 2
    return tuple(out) + (max_len,)


def _pow2_at_least(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


# ---------------------------------------------------------------------------------------------------------------
# Sampling (inside the jit; every knob is a per-row array, so changing it never recompiles)

def sample_logits(logits, keys, pos, temperature, top_k, top_p, filtered: bool):
    """Next token per row. logits (B, V) fp32; keys (B, 2) uint32 (the row's base key; folded with `pos`, the
    position of the token being sampled, so a row never reuses a key); temperature (B,) (0 = greedy); top_k (B,)
    int32 (0 = off); top_p (B,) (>= 1 = off). `filtered` (static): whether any row uses top-k/top-p (that path
    sorts the vocabulary)."""
    logits = logits.astype(jnp.float32)
    B, V = logits.shape
    greedy = jnp.argmax(logits, axis=-1)
    t = jnp.where(temperature > 0, temperature, 1.0).astype(jnp.float32)
    scaled = logits / t[:, None]
    if filtered:
        desc = -jnp.sort(-scaled, axis=-1)                                         # (B, V) largest first
        k = jnp.where((top_k > 0) & (top_k < V), top_k, V)
        desc = jnp.where(jnp.arange(V)[None, :] < k[:, None], desc, -jnp.inf)      # top-k
        probs = jax.nn.softmax(desc, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs                                # mass strictly above each
        keep = (before < top_p[:, None]) | (top_p[:, None] >= 1.0)                  # top-p: smallest set >= p
        keep = keep & jnp.isfinite(desc)
        n_keep = jnp.maximum(keep.sum(axis=-1), 1)
        threshold = jnp.take_along_axis(desc, (n_keep - 1)[:, None], axis=-1)      # (B, 1)
        scaled = jnp.where(scaled >= threshold, scaled, -jnp.inf)

    def draw():
        step_keys = jax.vmap(jax.random.fold_in)(keys, pos)
        sampled = jax.vmap(jax.random.categorical)(step_keys, scaled)
        return jnp.where(temperature > 0, sampled, greedy).astype(jnp.int32)

    # the Gumbel draw over (B, V) costs as much as a small model's step: skipped when every row is greedy
    return jax.lax.cond(jnp.any(temperature > 0), draw, lambda: greedy.astype(jnp.int32))


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


# ---------------------------------------------------------------------------------------------------------------
# The engine

class Engine:
    """Jitted, KV-cached generation for one model. Thread-safe for concurrent `generate`/`stream` calls (each call
    runs its own batch; the compiled functions are shared); use `BatchScheduler` to batch concurrent requests.

    params, config: the model (model.init_params / checkpoint.load_model). tokenizer: for the special tokens, the
    tool and text pieces. max_batch: the most rows one decode step runs. max_len: the cache length (prompt +
    completion), default config.sequence_len. tool: expr -> result string (default: the sandboxed calculator).
    model: the module providing init_cache/forward_cached (tests pass a fake).
    """

    def __init__(self, params, config, tokenizer, max_batch: int = 32, max_len: int | None = None,
                 tool=calculator, model=None, buckets: tuple[int, ...] | None = None):
        if model is None:
            from nanochat_jax import model
        self.params, self.config, self.tokenizer, self.model = params, config, tokenizer, model
        self.max_batch = int(max_batch)
        self.max_len = int(max_len or config.sequence_len)
        self.buckets = tuple(buckets) if buckets else prompt_buckets(self.max_len)
        self.tool = tool
        self.dtype = compute_dtype()
        sp = tokenizer.encode_special
        self.bos = tokenizer.get_bos_token_id()
        self.assistant_end = sp("<|assistant_end|>")
        self.python_start, self.python_end = sp("<|python_start|>"), sp("<|python_end|>")
        self.output_start, self.output_end = sp("<|output_start|>"), sp("<|output_end|>")
        self.stop_tokens = frozenset((self.bos, self.assistant_end))
        # which axis of each cache leaf is the batch (k, v: 1; per-row state: 0), found from shapes alone
        s1 = jax.eval_shape(lambda: model.init_cache(config, 1, self.max_len, self.dtype))
        s2 = jax.eval_shape(lambda: model.init_cache(config, 2, self.max_len, self.dtype))
        self._batch_axes = jax.tree.map(lambda a, b: [x != y for x, y in zip(a.shape, b.shape)].index(True), s1, s2)
        self._prefill_cache = None  # the batch-1 cache, reused (donated) by every prefill
        self._prefill_lock = threading.Lock()
        self._build_jits()

    # -- compiled functions ----------------------------------------------------------------------------------------

    def _build_jits(self):
        model, config = self.model, self.config

        def prefill(params, cache1, tokens, length):
            """tokens (1, bucket) right-padded, `length` real ones -> (fp32 logits (V,) at length-1, cache1)."""
            logits, cache1 = model.forward_cached(params, tokens, cache1, jnp.zeros((1,), jnp.int32), config)
            last = jax.lax.dynamic_index_in_dim(logits[0], length - 1, axis=0, keepdims=False)
            return last[:config.vocab_size], cache1

        def admit(cache, cache1, rows, logits, keys, pos, temperature, top_k, top_p, filtered):
            """Copy the batch-1 cache into the rows where `rows` (B,) is set; sample each row's first token."""
            def put(big, small, axis):
                shape = [1] * big.ndim
                shape[axis] = big.shape[axis]
                return jnp.where(rows.reshape(shape), small.astype(big.dtype), big)
            cache = jax.tree.map(put, cache, cache1, self._batch_axes)
            B = rows.shape[0]
            first = sample_logits(jnp.broadcast_to(logits, (B, logits.shape[-1])), keys, pos, temperature, top_k,
                                  top_p, filtered)
            return first, cache

        def step(params, cache, tokens, pos, keys, temperature, top_k, top_p, filtered):
            """Feed tokens (B,) at positions pos (B,); sample the next token of every row."""
            logits, cache = model.forward_cached(params, tokens[:, None], cache, pos, config)
            logits = logits[:, -1, :config.vocab_size]
            nxt = sample_logits(logits, keys, pos + 1, temperature, top_k, top_p, filtered)
            return nxt, logits, cache

        def chunk(params, cache, tokens, pos, budget, in_python, keys, temperature, top_k, top_p, stop, python, n_steps,
                  exit_on_pause, filtered):
            """Up to n_steps decode steps on device, each feeding every live row's last token back in.

            tokens, pos (B,): each row's token to feed and its position; budget (B,) int32: how many tokens the row
            may still take (0: the row sits this chunk out); in_python (B,) bool: the row is inside a tool call;
            stop (P,) int32: the stop tokens (-1 pads); python (2,) int32: <|python_start|>, <|python_end|>.
            A row pauses where the host must act: after a stop token, after <|python_end|> closing a tool call (the
            tool's output is forced in next), or when its budget is spent. A paused row feeds its last token at its
            last position again, rewriting the same cache entry, until the chunk ends. The chunk ends after n_steps
            (traced, <= DECODE_CHUNK), when no row is live, or, with exit_on_pause, as soon as any row pauses (so the
            host can free and refill it).
            -> (out (B, DECODE_CHUNK) int32: row b's new tokens in out[b, :count[b]], count (B,), cache)."""
            B = tokens.shape[0]
            out = jnp.zeros((B, DECODE_CHUNK), jnp.int32)
            live0 = budget > 0

            def cond(c):
                i, _, _, _, _, live, _, _ = c
                paused = jnp.any(live0 & ~live)
                return (i < n_steps) & jnp.any(live) & ~(exit_on_pause & paused)

            def body(c):
                i, cache, tok, pos, count, live, in_py, out = c
                logits, cache = model.forward_cached(params, tok[:, None], cache, pos, config)
                nxt = sample_logits(logits[:, -1, :config.vocab_size], keys, pos + 1, temperature, top_k, top_p,
                                    filtered)
                nxt = jnp.where(live, nxt, tok)
                out = out.at[:, i].set(nxt)
                step = live.astype(jnp.int32)
                count, pos = count + step, pos + step
                tool_call = in_py & (nxt == python[1])
                in_py = (in_py | (nxt == python[0])) & ~tool_call
                halt = jnp.any(nxt[:, None] == stop[None, :], axis=1) | tool_call | (count >= budget)
                return i + 1, cache, nxt, pos, count, live & ~halt, in_py, out

            zero = jnp.zeros((B,), jnp.int32)
            _, cache, _, _, count, _, _, out = jax.lax.while_loop(
                cond, body, (jnp.int32(0), cache, tokens, pos, zero, live0, in_python, out))
            return out, count, cache

        self._prefill = jax.jit(prefill, donate_argnums=(1,))
        self._chunk = jax.jit(chunk, static_argnames=("filtered",), donate_argnums=(1,))
        self._admit = jax.jit(admit, static_argnames=("filtered",), donate_argnums=(0,))
        self._step = jax.jit(step, static_argnames=("filtered",), donate_argnums=(1,))
        self._new_cache = jax.jit(lambda batch: model.init_cache(config, batch, self.max_len, self.dtype),
                                  static_argnums=(0,))

    def compiled_count(self) -> int:
        """How many executables the engine's jitted functions hold (for tests that check nothing recompiles)."""
        return sum(f._cache_size() for f in (self._prefill, self._admit, self._step, self._chunk, self._new_cache))

    def bucket_for(self, n: int) -> int:
        for b in self.buckets:
            if b >= n:
                return b
        raise ValueError(f"prompt of {n} tokens does not fit the context ({self.max_len})")

    def prefill(self, prompt: list[int]):
        """Run the batch-1 prefill of `prompt`. Returns (fp32 logits (V,) for the next token, batch-1 cache); the
        caller must hand the cache back with `_release_prefill_cache` (it is reused, donated, by the next one)."""
        n = len(prompt)
        if n == 0:
            raise ValueError("empty prompt: start it with <|bos|>")
        if n >= self.max_len:
            raise ValueError(f"prompt of {n} tokens leaves no room in the context of {self.max_len} "
                             f"(trim it, e.g. with Engine.fit_conversation)")
        bucket = self.bucket_for(n)
        tokens = np.zeros((1, bucket), np.int32)
        tokens[0, :n] = prompt
        self._prefill_lock.acquire()
        try:
            cache1 = self._prefill_cache if self._prefill_cache is not None else self._new_cache(1)
            self._prefill_cache = None  # donated below
            logits, cache1 = self._prefill(self.params, cache1, tokens, np.int32(n))
        except BaseException:
            self._prefill_lock.release()
            raise
        return logits, cache1

    def _release_prefill_cache(self, cache1):
        self._prefill_cache = cache1
        self._prefill_lock.release()

    # -- public API ------------------------------------------------------------------------------------------------

    def generate(self, tokens: list[int], num_samples: int = 1, max_tokens: int | None = None,
                 temperature: float = 1.0, top_k: int | None = None, seed: int = 0, top_p: float | None = None):
        """nanochat's `generate_batch`: `num_samples` completions of one prompt (sharing one prefill).

        Returns (results, masks): per sample, the prompt followed by the generated tokens (the terminal
        <|assistant_end|>/<|bos|> left out); masks: 0 for prompt and forced (tool output) tokens, 1 for sampled.
        """
        reqs = self._requests([tokens], num_samples, max_tokens, temperature, top_k, top_p, seed)
        self._run(reqs, min(self.max_batch, _pow2_at_least(num_samples)))
        results, masks = [], []
        for r in reqs:
            for c, m in zip(r.completions, r.masks):
                results.append(list(r.prompt) + c)
                masks.append([0] * len(r.prompt) + m)
        return results, masks

    def generate_batch(self, prompts, num_samples: int = 1, max_tokens: int | None = None, temperature: float = 1.0,
                       top_k: int | None = None, seed: int = 0, top_p: float | None = None):
        """Many prompts of different lengths, batched together (rows join as others finish).

        `prompts` a list of token lists -> per prompt, a list of `num_samples` completions (generated tokens only,
        no prompt, no terminal token); prompt i's samples use seed `seed + i`. A single prompt (a list of ints)
        behaves as nanochat's generate_batch, i.e. as `generate` -> (results, masks).
        """
        if prompts and isinstance(prompts[0], (int, np.integer)):
            return self.generate(prompts, num_samples, max_tokens, temperature, top_k, seed, top_p)
        reqs, per_prompt = [], []
        for i, p in enumerate(prompts):
            rs = self._requests([p], num_samples, max_tokens, temperature, top_k, top_p, seed + i)
            reqs += rs
            per_prompt.append(rs)
        self._run(reqs, min(self.max_batch, _pow2_at_least(len(prompts) * num_samples)))
        return [[c for r in rs for c in r.completions] for rs in per_prompt]

    def stream(self, tokens: list[int], max_tokens: int | None = None, temperature: float = 1.0,
               top_k: int | None = None, seed: int = 0, top_p: float | None = None):
        """Yield (token_id, text_piece) for one completion as it is generated. Pieces hold back an incomplete
        UTF-8 character until it completes; the terminal token is not yielded. Closing the generator stops it."""
        req = self._requests([tokens], 1, max_tokens, temperature, top_k, top_p, seed)[0]
        batch = _DecodeBatch(self, 1)
        text = TextStream(self.tokenizer)
        try:
            batch.admit(req)
            while True:
                while not req.events.empty():
                    _, tok, _ = req.events.get()
                    if tok is None:  # done (an incomplete UTF-8 tail, if any, is dropped)
                        return
                    yield tok, text.push(tok)
                batch.step(batch.steps_within(STREAM_SECONDS))
        finally:
            req.cancel()

    def fit_conversation(self, conversation: dict, max_tokens: int = 0) -> list[int]:
        """The prompt ids for `conversation` (render_for_completion), leaving `max_tokens` of room (at most half
        the context): the oldest user/assistant turns are dropped (the system message kept) until it fits; a
        single turn too long on its own keeps <|bos|> and its last tokens. Never raises for length."""
        budget = max(self.max_len - max_tokens, self.max_len // 2) - 1
        messages = list(conversation.get("messages", []))
        if messages and messages[-1].get("role") == "assistant":
            messages = messages[:-1]   # the answer to be generated (render_for_completion drops it too)
        ids = self.tokenizer.render_for_completion({**conversation, "messages": messages})
        start = 1 if messages and messages[0].get("role") == "system" else 0
        while len(ids) > budget and len(messages) - start > 1:
            drop = 2 if len(messages) - start > 2 else 1  # a user turn and its answer, so roles still alternate
            messages = messages[:start] + messages[start + drop:]
            ids = self.tokenizer.render_for_completion({**conversation, "messages": messages})
        if len(ids) > budget:
            ids = ids[:1] + ids[len(ids) - budget + 1:]
        return ids

    # -- internals -------------------------------------------------------------------------------------------------

    def _requests(self, prompts, num_samples, max_tokens, temperature, top_k, top_p, seed) -> list[Request]:
        """Requests for prompts x samples, split so that none needs more rows than max_batch."""
        if num_samples < 1:
            raise ValueError("num_samples must be >= 1")
        if temperature < 0:
            raise ValueError("temperature must be >= 0")
        sampling = Sampling(max_tokens=int(max_tokens) if max_tokens is not None else self.max_len,
                            temperature=float(temperature), top_k=int(top_k) if top_k else None,
                            top_p=float(top_p) if top_p is not None else None, seed=int(seed))
        out = []
        for p in prompts:
            for off in range(0, num_samples, self.max_batch):
                out.append(Request(p, min(self.max_batch, num_samples - off), sampling, sample_offset=off))
        return out

    def _run(self, reqs: list[Request], batch_size: int):
        """Run requests to completion in one batch of `batch_size` rows, admitting each when rows free up."""
        batch = _DecodeBatch(self, batch_size)
        waiting = collections.deque(reqs)
        while waiting or batch.active:
            while waiting and waiting[0].num_samples <= batch.free_rows:
                batch.admit(waiting.popleft())
            if batch.active:   # whole chunks; with requests waiting, back as soon as a row frees up
                batch.step(DECODE_CHUNK, exit_on_pause=bool(waiting))

    def _tool_output(self, expr_tokens: list[int]) -> list[int]:
        """Run the tool on the decoded expression; its result (or error, as text) as forced tokens."""
        expr = self.tokenizer.decode(expr_tokens)
        try:
            result = str(self.tool(expr))
        except Exception as e:  # a tool failure is the model's problem, shown to it as output
            result = f"Error: {type(e).__name__}: {e}"
        return [self.output_start] + list(self.tokenizer.encode(result)) + [self.output_end]


class _DecodeBatch:
    """B rows of one KV cache and their host state: admit requests into free rows, step all rows at once."""

    def __init__(self, engine: Engine, batch_size: int, logits_hook=None):
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


# ---------------------------------------------------------------------------------------------------------------
# Continuous batching

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
        self._batch = _DecodeBatch(engine, self.batch_size)
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
