"""Generation: a static KV cache, a jitted prefill per prompt-length bucket, decoding in device-side chunks of
steps with sampling inside the jit, and nanochat's tool-use state machine on the host between chunks.

Shapes never depend on a prompt or a step: the cache holds, per layer, (B, KV, D, Tmax) keys and (B, KV, Tmax, D)
values (see model.KVCache) for a fixed batch of B *rows*, each row at its own position (pos: int32[B], traced), so
rows at different positions share one decode step. A prompt is prefilled in a batch-1 cache, padded up to a length
bucket (powers of two up to max_len), the LM head applied at its last token only, then copied into the rows that
will continue it (num_samples rows share one prefill).

Decoding runs up to DECODE_CHUNK steps per device call (`Engine._chunk`, a `lax.while_loop`): every step feeds each
row's last token back in, and a row pauses on the device where the host must act (a stop token, a closed tool
call, its token budget), so the host sees the same tokens as with one call per step, without a round trip per
token. `generate`/`generate_batch` run whole chunks; `stream` and `BatchScheduler` size theirs to about
STREAM_SECONDS from the measured step time, so text still arrives every few tens of milliseconds. While a row has
tool output to force in, the batch takes single steps (`Engine._step`). Compiled functions: one prefill per bucket
used, and one chunk, one single step and one row-admission function per batch size and sampling kind (plain, or
top-k/top-p); `score` (per-token logprobs of a given sequence, one forward pass) compiles once per bucket it uses.

    engine = Engine(params, config, tokenizer)
    results, masks = engine.generate(prompt_ids, num_samples=4, max_tokens=64, temperature=0.8, top_k=50)
    for token_id, text_piece in engine.stream(prompt_ids, max_tokens=64): print(text_piece, end="")
    per_prompt = engine.generate_batch([ids_a, ids_b], num_samples=2, max_tokens=64)   # completions only
    reply = engine.chat("Why is the sky blue?")   # text in, text out (engine.complete(text) for a base model)
    logprobs, top_ids, top_logprobs = engine.score(prompt_ids + completion, start=len(prompt_ids), top=5)
    scheduler = BatchScheduler(engine)        # continuous batching: requests join and leave a running batch
    for token_id, text_piece in scheduler.stream(prompt_ids, max_tokens=64): ...

Tool use (as nanochat): the text between <|python_start|> and <|python_end|> goes to `tool` (the calculator, run in
the sandbox); its result is forced into the row as <|output_start|> result <|output_end|>, with mask 0. A row ends at
<|assistant_end|> or <|bos|> (neither is returned), at max_tokens, or when it fills the context.

This module holds the Engine (compiled functions, prefill, the generate/stream API); the rows' host state and the
tool state machine are in infer/batch.py, sampling in infer/sampling.py, continuous batching (BatchScheduler) in
infer/scheduler.py, and fitting a conversation into the context in infer/prompt.py.
"""

from __future__ import annotations

import collections
import threading

import jax
import jax.numpy as jnp
import numpy as np

from nanochat_jax import model as gpt
from nanochat_jax.core.common import compute_dtype
from nanochat_jax.infer.batch import DECODE_CHUNK, STREAM_SECONDS, DecodeBatch, Request, Sampling, TextStream
from nanochat_jax.infer.execution import calculator
from nanochat_jax.infer.prompt import fit_conversation
from nanochat_jax.infer.sampling import sample_logits

MIN_BUCKET = 16  # smallest prefill length: shorter prompts share one compiled prefill
SCORE_TOP = 20   # most alternatives `score` returns per position (OpenAI's top_logprobs limit)


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
# The engine

class Engine:
    """Jitted, KV-cached generation for one model. Thread-safe for concurrent `generate`/`stream` calls (each call
    runs its own batch; the compiled functions are shared); use `BatchScheduler` to batch concurrent requests.

    params, config: the model (model.init_params / nanochat_jax.load_model). tokenizer: for the special tokens, the
    tool and text pieces. max_batch: the most rows one decode step runs. max_len: the cache length (prompt +
    completion), default config.sequence_len. tool: expr -> result string (default: the sandboxed calculator).
    model: the module providing init_cache/forward_cached, with forward_cached's `last` (tests pass a fake).
    """

    def __init__(self, params, config, tokenizer, max_batch: int = 32, max_len: int | None = None,
                 tool=calculator, model=None, buckets: tuple[int, ...] | None = None):
        if model is None:
            model = gpt
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
            logits, cache1 = model.forward_cached(params, tokens, cache1, jnp.zeros((1,), jnp.int32), config,
                                                  last=jnp.reshape(length - 1, (1,)))
            return logits[0, 0, :config.vocab_size], cache1

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
        self._build_score_jit()

    def _build_score_jit(self):
        model, config = self.model, self.config

        def score(params, cache1, tokens):
            """tokens (1, bucket) -> for each position i, the logprob of tokens[i + 1] under the model (temperature
            1) and the SCORE_TOP most likely next tokens: (fp32 (bucket,), int32 (bucket, K), fp32 (bucket, K))."""
            logits, cache1 = model.forward_cached(params, tokens, cache1, jnp.zeros((1,), jnp.int32), config)
            logp = jax.nn.log_softmax(logits[0, :, :config.vocab_size].astype(jnp.float32), axis=-1)
            chosen = jnp.take_along_axis(logp, jnp.roll(tokens[0], -1)[:, None], axis=-1)[:, 0]
            top_lp, top_ids = jax.lax.top_k(logp, min(SCORE_TOP, config.vocab_size))
            return chosen, top_ids.astype(jnp.int32), top_lp, cache1

        self._score = jax.jit(score, donate_argnums=(1,))

    def compiled_count(self) -> int:
        """How many executables the engine's jitted functions hold (for tests that check nothing recompiles)."""
        return sum(f._cache_size() for f in (self._prefill, self._admit, self._step, self._chunk, self._new_cache,
                                             self._score))

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
        batch = DecodeBatch(self, 1)
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

    def score(self, tokens: list[int], start: int = 1, top: int = 0):
        """Log-probabilities of tokens[start:], each given the tokens before it, under the model's own distribution
        (temperature 1, no top-k/top-p: what OpenAI-style APIs report), and the `top` (<= SCORE_TOP) most likely
        tokens at each of those positions. One forward pass over the whole sequence, padded to a prefill bucket.
        -> (logprobs fp32 (n,), top_ids int32 (n, top), top_logprobs fp32 (n, top)), n = len(tokens) - start."""
        n = len(tokens)
        if not 1 <= start <= n or n > self.max_len:
            raise ValueError(f"cannot score tokens[{start}:] of {n} tokens in a context of {self.max_len}")
        if not 0 <= top <= SCORE_TOP:
            raise ValueError(f"top must be in [0, {SCORE_TOP}]")
        padded = np.zeros((1, self.bucket_for(n)), np.int32)
        padded[0, :n] = tokens
        with self._prefill_lock:  # the batch-1 prefill cache is the scratch space
            cache1 = self._prefill_cache if self._prefill_cache is not None else self._new_cache(1)
            self._prefill_cache = None  # donated below
            chosen, top_ids, top_lp, self._prefill_cache = self._score(self.params, cache1, padded)
        rows = slice(start - 1, n - 1)  # position i predicts token i + 1
        return np.asarray(chosen)[rows], np.asarray(top_ids)[rows, :top], np.asarray(top_lp)[rows, :top]

    def fit_conversation(self, conversation: dict, max_tokens: int = 0) -> list[int]:
        """The prompt ids for `conversation`, cut to leave `max_tokens` of room in this engine's context (see
        infer/prompt.fit_conversation: oldest turns dropped first, the system message kept)."""
        return fit_conversation(self.tokenizer, conversation, self.max_len, max_tokens)

    def chat(self, conversation, max_tokens: int = 256, temperature: float = 0.6, top_k: int | None = 50,
             seed: int = 0) -> str:
        """The assistant's reply as text: `conversation` is a user message (str), a list of {"role", "content"}
        messages, or nanochat's {"messages": [...]}. Fitted to the context and generated as `generate` does (tool
        calls run, their output included in the text); the defaults are chat_cli's sampling."""
        if isinstance(conversation, str):
            conversation = [{"role": "user", "content": conversation}]
        if isinstance(conversation, list):
            conversation = {"messages": conversation}
        prompt = self.fit_conversation(conversation, max_tokens)
        results, _ = self.generate(prompt, max_tokens=max_tokens, temperature=temperature, top_k=top_k, seed=seed)
        return self.tokenizer.decode(results[0][len(prompt):])

    def complete(self, text: str, max_tokens: int = 64, temperature: float = 0.0, top_k: int | None = None,
                 seed: int = 0) -> str:
        """The continuation of plain `text` (a base model's use): <|bos|> + text, then up to `max_tokens` tokens,
        greedy by default; only the new text comes back."""
        prompt = self.tokenizer.encode(text, prepend=self.bos)
        results, _ = self.generate(prompt, max_tokens=max_tokens, temperature=temperature, top_k=top_k, seed=seed)
        return self.tokenizer.decode(results[0][len(prompt):])

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
        batch = DecodeBatch(self, batch_size)
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
