"""Facts about nanochat_jax/infer (engine, batch, sampling, scheduler, prompt): exact KV-cached decoding, sampling,
no recompiles, tool use, streaming, batched and continuous-batched generation."""

import collections
import functools
import threading
from dataclasses import dataclass
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nanochat_jax.infer.batch import DecodeBatch, TextStream
from nanochat_jax.infer.engine import Engine, prompt_buckets
from nanochat_jax.infer.sampling import sample_logits
from nanochat_jax.infer.scheduler import BatchScheduler
from nanochat_jax.infer.execution import calculator

SPECIALS = ["<|bos|>", "<|user_start|>", "<|user_end|>", "<|assistant_start|>", "<|assistant_end|>",
            "<|python_start|>", "<|python_end|>", "<|output_start|>", "<|output_end|>"]


class ByteTokenizer:
    """Bytes are ids 0..255, the specials 256..264: enough tokenizer for the engine, and UTF-8 splits are real."""

    def encode_special(self, name):
        return 256 + SPECIALS.index(name)

    def get_bos_token_id(self):
        return 256

    def get_vocab_size(self):
        return 256 + len(SPECIALS)

    def encode(self, text, prepend=None, append=None):
        return list(text.encode("utf-8"))

    def decode(self, ids):
        out, buf = [], bytearray()
        for i in ids:
            if i < 256:
                buf.append(i)
            else:
                out.append(buf.decode("utf-8", errors="replace"))
                buf = bytearray()
                out.append(SPECIALS[i - 256] if i < 256 + len(SPECIALS) else "")
        out.append(buf.decode("utf-8", errors="replace"))
        return "".join(out)

    def render_for_completion(self, conversation):
        msgs = list(conversation["messages"])
        if msgs and msgs[0]["role"] == "system":
            msgs = [{"role": "user", "content": msgs[0]["content"] + "\n\n" + msgs[1]["content"]}] + msgs[2:]
        ids = [256]
        for m in msgs:
            s, e = ("<|user_start|>", "<|user_end|>") if m["role"] == "user" else \
                ("<|assistant_start|>", "<|assistant_end|>")
            ids += [self.encode_special(s)] + self.encode(m["content"]) + [self.encode_special(e)]
        return ids + [self.encode_special("<|assistant_start|>")]


TOK = ByteTokenizer()
SP = {name: TOK.encode_special(name) for name in SPECIALS}


# ---------------------------------------------------------------------------------------------------------------
# A scripted fake model: the token it predicts at position p is params["script"][p + 1], whatever came before.
# Its cache records every token written, so tests see what the engine fed at which position.

@dataclass(frozen=True)
class FakeConfig:
    vocab_size: int = 320
    sequence_len: int = 64


class FakeCache(NamedTuple):
    tokens: jax.Array  # (B, Tmax)


class ScriptedModel:
    @staticmethod
    def init_cache(config, batch, max_len, dtype=None):
        return FakeCache(jnp.full((batch, max_len), -1, jnp.int32))

    @staticmethod
    def forward_cached(params, tokens, cache, pos, config, last=None):
        B, t = tokens.shape
        positions = pos[:, None] + jnp.arange(t)[None, :]
        rows = jnp.broadcast_to(jnp.arange(B)[:, None], (B, t))
        new = cache.tokens.at[rows, positions].set(tokens, mode="drop")
        nxt = params["script"][jnp.minimum(positions + 1, params["script"].shape[0] - 1)]
        logits = 50.0 * jax.nn.one_hot(nxt, config.vocab_size)  # a 50-nat margin: sampling is deterministic
        if last is not None:
            logits = jnp.take_along_axis(logits, last[:, None, None], axis=1)
        return logits, FakeCache(new)


def scripted_engine(script, max_len=64, **kw):
    script = np.asarray(list(script) + [SP["<|assistant_end|>"]] * (max_len + 1 - len(script)), np.int32)
    return Engine({"script": jnp.asarray(script)}, FakeConfig(sequence_len=max_len), TOK, model=ScriptedModel,
                  **kw)


def text_ids(s):
    return TOK.encode(s)


# ---------------------------------------------------------------------------------------------------------------
# Sampling

def test_prompt_buckets():
    assert prompt_buckets(64) == (16, 32, 64)
    assert prompt_buckets(100) == (16, 32, 64, 100)


def test_sampling_greedy_topk_topp():
    sample = jax.jit(sample_logits, static_argnames=("filtered",))
    logits = jnp.asarray(np.random.default_rng(0).normal(size=(4, 50)).astype(np.float32))
    keys = jnp.zeros((4, 2), jnp.uint32)
    pos = jnp.arange(4, dtype=jnp.int32)
    greedy = np.argmax(np.asarray(logits), -1)
    out = sample(logits, keys, pos, jnp.zeros(4), jnp.zeros(4, jnp.int32), jnp.ones(4), filtered=False)
    assert (np.asarray(out) == greedy).all()
    out = sample(logits, keys, pos, jnp.ones(4), jnp.ones(4, jnp.int32), jnp.ones(4), filtered=True)
    assert (np.asarray(out) == greedy).all()  # top-k 1 is greedy at any temperature
    out = sample(logits, keys, pos, jnp.ones(4), jnp.zeros(4, jnp.int32), jnp.full(4, 1e-6), filtered=True)
    assert (np.asarray(out) == greedy).all()  # so is a tiny top-p
    # top-k 5 at a high temperature: many draws, all inside each row's top 5, and more than one of them
    n = 400
    big = jnp.repeat(logits[:1], n, axis=0)
    keys = jnp.stack([jnp.arange(n, dtype=jnp.uint32), jnp.zeros(n, jnp.uint32)], axis=1)
    draws = np.asarray(sample(big, keys, jnp.zeros(n, jnp.int32), jnp.full(n, 5.0),
                                     jnp.full(n, 5, jnp.int32), jnp.ones(n), filtered=True))
    top5 = set(np.argsort(-np.asarray(logits[0]))[:5].tolist())
    assert set(draws.tolist()) <= top5 and len(set(draws.tolist())) > 1
    # top-p 0.5: only the smallest set of tokens holding half the mass
    p = np.asarray(jax.nn.softmax(logits[0]))
    order = np.argsort(-p)
    nucleus = set(order[:np.searchsorted(np.cumsum(p[order]), 0.5) + 1].tolist())
    draws = np.asarray(sample(big, keys, jnp.zeros(n, jnp.int32), jnp.ones(n), jnp.zeros(n, jnp.int32),
                                     jnp.full(n, 0.5), filtered=True))
    assert set(draws.tolist()) <= nucleus


# ---------------------------------------------------------------------------------------------------------------
# The cache is exact: every decode step's logits equal a full forward recompute (real model, random weights)

def _tiny_model(recipe, n_kv_heads, short_window=None, seed=0):
    from nanochat_jax import model
    from nanochat_jax.core.config import ModelConfig

    cfg = ModelConfig.from_depth(3, d_model=64, head_dim=16, n_kv_heads=n_kv_heads, vocab_size=300,
                                 max_seq_len=64, recipe=recipe, window_pattern="SSL")
    if short_window is not None:  # small windows, so that tests at T <= 64 cross them

        @dataclass(frozen=True)
        class SmallWindows(type(cfg)):
            @property
            def short_window(self):
                return short_window

        cfg = SmallWindows(**cfg.to_dict())
    params = model.init_params(cfg, jax.random.PRNGKey(seed))
    # nanochat zero-inits output projections and (2025) lm_head: perturb every weight so that attention, the
    # cache and every extra path all move the logits
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(seed + 1), len(leaves))
    leaves = [x + (1.0 / np.sqrt(x.shape[0]) if x.ndim == 2 else 0.3) * jax.random.normal(k, x.shape, x.dtype)
              for x, k in zip(leaves, keys)]
    return jax.tree.unflatten(tree, leaves), cfg


@pytest.mark.parametrize("recipe, n_kv, window", [("2025", 4, None), ("2026", 2, 8), ("2026", 1, 5)],
                         ids=["2025-mha", "2026-gqa2-window8", "2026-mqa-window5"])
def test_cached_decode_equals_full_recompute(recipe, n_kv, window):
    from nanochat_jax import model

    params, cfg = _tiny_model(recipe, n_kv, window)
    assert window is None or min(cfg.window_sizes) == window
    engine = Engine(params, cfg, TOK, max_batch=2, tool=lambda e: "0")
    engine.stop_tokens = frozenset()  # random weights: let every row run its full length
    seen = []  # (row's sequence up to the fed token, logits predicting the next one)

    def hook(logits, rows):
        logits = np.asarray(logits)
        for b, r in enumerate(rows):
            if r is not None:
                seen.append((r.req.prompt + r.req.completions[r.sample], logits[b]))

    batch = DecodeBatch(engine, 2, logits_hook=hook)
    rng = np.random.default_rng(1)
    prompts = [[256] + rng.integers(0, 256, n - 1).tolist() for n in (7, 20)]  # rows at different positions
    reqs = engine._requests(prompts, 1, 30, 1.0, None, None, 3)
    for r in reqs:
        batch.admit(r)
    while batch.active:
        batch.step()
    assert len(seen) >= 2 * 25
    full = jax.jit(lambda p, t: model.forward(p, t, cfg))
    worst = 0.0
    for r in reqs:  # the first token: prefill logits (a padded bucket) vs the recompute
        seq = r.prompt + r.completions[0]
        assert len(r.completions[0]) == 30
        ref = np.asarray(full(params, jnp.asarray([seq + [0] * (64 - len(seq))], jnp.int32)))[0]
        pre, cache1 = engine.prefill(r.prompt)
        engine._release_prefill_cache(cache1)
        worst = max(worst, float(np.abs(np.asarray(pre) - ref[len(r.prompt) - 1]).max()))
        for s, step_logits in seen:
            if s[:len(r.prompt)] == r.prompt and len(s) >= len(r.prompt) + 1:
                worst = max(worst, float(np.abs(step_logits - ref[len(s) - 1]).max()))
    assert np.abs(ref).max() > 0.5  # the logits are not trivially zero
    assert worst <= 1e-5, worst


# ---------------------------------------------------------------------------------------------------------------
# Determinism, seeds, samples

@pytest.fixture(scope="module")
def tiny():
    params, cfg = _tiny_model("2026", 2, 8)
    engine = Engine(params, cfg, TOK, max_batch=8, tool=lambda e: "0")
    return engine


def test_greedy_is_deterministic(tiny):
    prompt = [256] + text_ids("hello there")
    a, _ = tiny.generate(prompt, num_samples=2, max_tokens=12, temperature=0.0, seed=1)
    b, _ = tiny.generate(prompt, num_samples=1, max_tokens=12, temperature=0.0, seed=99)
    assert a[0] == a[1] == b[0]


def test_same_seed_reproducible_different_samples_differ(tiny):
    prompt = [256] + text_ids("abc")
    a, ma = tiny.generate(prompt, num_samples=4, max_tokens=12, temperature=1.5, seed=7)
    b, mb = tiny.generate(prompt, num_samples=4, max_tokens=12, temperature=1.5, seed=7)
    c, _ = tiny.generate(prompt, num_samples=4, max_tokens=12, temperature=1.5, seed=8)
    assert a == b and ma == mb
    assert len({tuple(x) for x in a}) > 1  # one prefill, yet the samples differ (from the first token on)
    assert a != c
    assert all(x[:len(prompt)] == prompt for x in a)
    assert all(m[:len(prompt)] == [0] * len(prompt) for m in ma)


def test_generate_batch_equals_one_by_one(tiny):
    prompts = [[256] + text_ids("x" * n) for n in (1, 9, 30, 4, 17)]  # more prompts than rows below
    small = Engine(tiny.params, tiny.config, TOK, max_batch=2, tool=lambda e: "0")
    per_prompt = small.generate_batch(prompts, num_samples=1, max_tokens=8, temperature=0.0)
    assert len(per_prompt) == 5
    for p, samples in zip(prompts, per_prompt):
        alone, _ = tiny.generate(p, max_tokens=8, temperature=0.0)
        assert samples[0] == alone[0][len(p):]


def _run_rows(engine, prompts, chunk: int, max_tokens, temperature, seed=5):
    """Decode `prompts` in one batch, `chunk` steps per device call; -> per row (completion, mask, finish reason)."""
    batch = DecodeBatch(engine, len(prompts))
    reqs = engine._requests(prompts, 1, max_tokens, temperature, None, None, seed)
    for r in reqs:
        batch.admit(r)
    calls = 0
    while batch.active:
        batch.step(chunk)
        calls += 1
    return [(r.completions[0], r.masks[0], r.finish[0]) for r in reqs], calls


@pytest.mark.parametrize("temperature", [0.0, 1.3])
def test_device_chunks_equal_single_steps(temperature):
    """A chunk of device-side steps gives exactly the tokens, masks and finish reasons of one step per call:
    sampling keys, stop tokens, budgets and the context's end, and a tool call closed mid-chunk (its output is
    forced in afterwards). Rows sit at different positions."""
    params, cfg = _tiny_model("2026", 2, 8, seed=4)
    engine = Engine(params, cfg, TOK, max_batch=4, tool=lambda e: "42")
    rng = np.random.default_rng(2)
    prompts = [[256] + rng.integers(0, 256, n - 1).tolist() for n in (5, 12, 33, 58)]  # the last hits the end
    # random weights rarely emit the specials: make the three tokens they emit most often (in a free run) the
    # stop token, <|python_start|> and <|python_end|>, so that rows stop and call the tool mid-chunk
    engine.stop_tokens, engine.python_start = frozenset(), -1
    free, _ = _run_rows(engine, prompts, 1, 40, temperature)
    common = [t for t, _ in collections.Counter(t for c, _, _ in free for t in c).most_common(3)]
    engine.stop_tokens = frozenset({common[2], 256})
    engine.python_start, engine.python_end = common[0], common[1]
    single, calls1 = _run_rows(engine, prompts, 1, 40, temperature)
    chunked, calls = _run_rows(engine, prompts, 16, 40, temperature)
    assert chunked == single
    assert calls < calls1 / 2                      # the chunks really ran several steps per call
    assert {f for _, _, f in single} == {"length", "stop"}
    assert any(0 in m for _, m, _ in single)       # some row's tool output was forced in


# ---------------------------------------------------------------------------------------------------------------
# No recompiles

def test_no_recompiles_across_prompt_lengths_and_200_steps():
    from nanochat_jax.core.config import ModelConfig
    from nanochat_jax import model

    cfg = ModelConfig.from_depth(2, d_model=64, head_dim=16, vocab_size=300, max_seq_len=256, recipe="2026")
    params = model.init_params(cfg, jax.random.PRNGKey(0))
    engine = Engine(params, cfg, TOK, max_batch=4, tool=lambda e: "0")
    engine.stop_tokens = frozenset()
    engine.python_start = -1  # random weights: no tool calls, every row runs to max_tokens
    rng = np.random.default_rng(0)
    engine.generate([256] + [1] * 20, num_samples=2, max_tokens=3, temperature=1.0, top_k=20)  # warm up (bucket 32)
    before = engine.compiled_count()
    events = []
    listener = lambda name, *a, **k: events.append(name) if "/jax/core/compile" in name else None
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        for n in (17, 19, 24, 29, 32):  # 5 prompt lengths, one bucket; different sampling settings
            out, _ = engine.generate([256] + rng.integers(0, 256, n - 1).tolist(), num_samples=2, max_tokens=4,
                                     temperature=float(n % 3) / 2, top_k=int(n), seed=n)
            assert len(out[0]) == n + 4
        out, _ = engine.generate([256] + [5] * 20, num_samples=2, max_tokens=201, temperature=0.7, top_k=50)
        assert len(out[0]) == 21 + 201  # the first token from the prefill, then 200 decode steps
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert engine.compiled_count() == before
    assert events == []


# ---------------------------------------------------------------------------------------------------------------
# Tool use (scripted fake model)

def _tool_script(prompt, expr, forced_len, after="ok"):
    """What the fake model 'says' after the prompt: <|python_start|> expr <|python_end|>, then junk where the
    forced output goes (the engine must ignore it), then `after` and <|assistant_end|>."""
    body = [SP["<|python_start|>"]] + text_ids(expr) + [SP["<|python_end|>"]]
    return [0] * len(prompt) + body + text_ids("J" * forced_len) + text_ids(after) + [SP["<|assistant_end|>"]]


@pytest.mark.parametrize("expr, tool, output", [
    ("12*3+4", calculator, "40"),
    ("'strawberry'.count('r')", calculator, "3"),
    ("1/0", calculator, "Error: ZeroDivisionError: division by zero"),
    ("import os", calculator, "Error: invalid syntax"),
    ("1+1", functools.partial(calculator, timeout=0.001), "Error: timed out after 0.001 s"),
    ("2+2", lambda e: 1 / 0, "Error: ZeroDivisionError: division by zero"),  # a tool that raises
])
def test_tool_use_forces_output_with_mask_zero(expr, tool, output):
    prompt = [256] + text_ids("q?") + [SP["<|assistant_start|>"]]
    forced = [SP["<|output_start|>"]] + text_ids(output) + [SP["<|output_end|>"]]
    engine = scripted_engine(_tool_script(prompt, expr, len(forced)), tool=tool)
    results, masks = engine.generate(prompt, num_samples=2, max_tokens=60, temperature=1.0)
    call = [SP["<|python_start|>"]] + text_ids(expr) + [SP["<|python_end|>"]]
    expected = prompt + call + forced + text_ids("ok")
    assert results == [expected, expected]
    assert masks[0] == [0] * len(prompt) + [1] * len(call) + [0] * len(forced) + [1, 1]


@pytest.mark.parametrize("chunk", [1, 16])
def test_forced_tokens_are_fed_to_the_model(chunk):
    """Also in device chunks: the chunk pauses at <|python_end|>, the forced output goes in by single steps."""
    prompt = [256, SP["<|assistant_start|>"]]
    forced = [SP["<|output_start|>"]] + text_ids("7") + [SP["<|output_end|>"]]
    engine = scripted_engine(_tool_script(prompt, "3+4", len(forced)))
    req = engine._requests([prompt], 1, 60, 0.0, None, None, 0)[0]
    batch = DecodeBatch(engine, 2)
    batch.admit(req)
    while batch.active:
        batch.step(chunk)
    fed = np.asarray(batch.cache.tokens)[0]
    seq = prompt + req.completions[0]
    # every token but the last was written into the cache at its own position (the last is never fed)
    assert fed[len(prompt):len(seq) - 1].tolist() == seq[len(prompt):-1]
    assert req.finish == ["stop"]


def test_stops_at_bos_and_at_max_tokens_and_at_context_end():
    prompt = [256, 65]
    engine = scripted_engine([0, 0] + text_ids("abc") + [256] + text_ids("zzz"))
    out, _ = engine.generate(prompt, max_tokens=50)
    assert out[0] == prompt + text_ids("abc")
    out, _ = engine.generate(prompt, max_tokens=2)
    assert out[0] == prompt + text_ids("ab")
    engine = scripted_engine([0, 0] + text_ids("y" * 100), max_len=32)
    out, _ = engine.generate(prompt, max_tokens=1000)
    assert len(out[0]) == 32


def test_prompt_too_long_is_a_clear_error():
    engine = scripted_engine([], max_len=32)
    with pytest.raises(ValueError, match="context"):
        engine.generate([256] * 32, max_tokens=4)


# ---------------------------------------------------------------------------------------------------------------
# Scoring: per-token logprobs of a given sequence (the server's logprobs)

def test_score_gives_each_tokens_logprob_and_the_top_alternatives():
    script = [SP["<|bos|>"]] + text_ids("hello world")
    engine = scripted_engine(script)
    lps, top_ids, top_lps = engine.score(script[:8], start=3, top=2)
    assert lps.shape == (5,) and top_ids.shape == top_lps.shape == (5, 2)
    assert np.allclose(lps, 0.0, atol=1e-6)  # each token is the one the model predicts (a 50-nat margin)
    assert top_ids[:, 0].tolist() == script[3:8] and np.allclose(top_lps[:, 1], -50.0, atol=1e-3)
    assert engine.score(script[:3] + [SP["<|python_end|>"]], start=3)[0][0] < -40  # a token it did not predict
    n = engine.compiled_count()
    engine.score(script[:5], start=1, top=2)  # same bucket: no recompile
    assert engine.compiled_count() == n
    with pytest.raises(ValueError):
        engine.score(script[:5], start=0)  # nothing before the first token


def test_score_equals_log_softmax_of_a_full_forward():
    from nanochat_jax import model

    params, cfg = _tiny_model("2026", 2, 8)
    engine = Engine(params, cfg, TOK, max_batch=2)
    seq = [256] + np.random.default_rng(3).integers(0, 256, 40).tolist()
    lps, top_ids, top_lps = engine.score(seq, start=5, top=4)
    ref = np.asarray(jax.nn.log_softmax(model.forward(params, jnp.asarray([seq], jnp.int32), cfg)[0], axis=-1))
    assert np.allclose(lps, ref[np.arange(4, len(seq) - 1), seq[5:]], atol=1e-4)
    assert (top_ids == np.argsort(-ref[4:-1], axis=-1)[:, :4]).all()
    assert np.allclose(top_lps, np.sort(ref[4:-1], axis=-1)[:, ::-1][:, :4], atol=1e-4)


# ---------------------------------------------------------------------------------------------------------------
# Streaming and text

def test_text_stream_holds_back_incomplete_utf8():
    ts = TextStream(TOK)
    pieces = [ts.push(t) for t in text_ids("aé€!")]
    assert pieces == ["a", "", "é", "", "", "€", "!"]


def test_stream_yields_pieces_and_not_the_terminal_token():
    prompt = [256, 65]
    engine = scripted_engine([0, 0] + text_ids("hé!") + [SP["<|assistant_end|>"]])
    got = list(engine.stream(prompt, max_tokens=20, temperature=0.0))
    assert [t for t, _ in got] == text_ids("hé!")
    assert "".join(p for _, p in got) == "hé!"
    assert [p for _, p in got] == ["h", "", "é", "!"]


# ---------------------------------------------------------------------------------------------------------------
# Long conversations

def test_fit_conversation_drops_oldest_turns_keeps_system():
    engine = scripted_engine([], max_len=64)
    conv = {"messages": [{"role": "system", "content": "SYS"}]}
    for i in range(10):
        conv["messages"] += [{"role": "user", "content": f"question {i}"},
                             {"role": "assistant", "content": f"answer {i}"}]
    conv["messages"].append({"role": "user", "content": "last?"})
    ids = engine.fit_conversation(conv, max_tokens=16)
    assert len(ids) <= 64 - 16
    text = TOK.decode(ids)
    assert "SYS" in text and "last?" in text and "question 0" not in text
    assert text.endswith("<|assistant_start|>")
    huge = {"messages": [{"role": "user", "content": "w" * 500}]}
    ids = engine.fit_conversation(huge, max_tokens=16)
    assert len(ids) <= 48 and ids[0] == 256 and ids[-1] == SP["<|assistant_start|>"]
    engine.generate(ids, max_tokens=16)  # and it runs


# ---------------------------------------------------------------------------------------------------------------
# Continuous batching

def test_scheduler_serves_concurrent_streams_like_solo_runs(tiny):
    prompts = [[256] + text_ids("p" * (1 + 3 * i)) for i in range(8)]
    solo = [tiny.generate(p, max_tokens=10, temperature=0.0)[0][0][len(p):] for p in prompts]
    sched = BatchScheduler(tiny, batch_size=4)  # 8 requests, 4 rows: half of them wait for rows to free up
    try:
        got = [None] * 8

        def client(i):
            got[i] = [t for t, _ in sched.stream(prompts[i], max_tokens=10, temperature=0.0)]

        threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert got == solo
        for _ in range(500):  # the loop counts a request after the step that ended it
            if sched.stats()["completed"] == 8:
                break
            threading.Event().wait(0.01)
        stats = sched.stats()
        assert stats["completed"] == 8 and stats["free_rows"] == 4 and stats["requests"] == 8
    finally:
        sched.close()


def test_scheduler_cancel_frees_the_row(tiny):
    sched = BatchScheduler(tiny, batch_size=2)
    try:
        stream = sched.stream([256, 65], max_tokens=50, temperature=1.0)
        next(stream)
        assert sched.stats()["active_rows"] == 1
        stream.close()  # the client went away
        for _ in range(200):
            if sched.stats()["active_rows"] == 0:
                break
            threading.Event().wait(0.01)
        assert sched.stats()["active_rows"] == 0
        bad = sched.submit([256] * 100, max_tokens=4)  # too long a prompt fails its request only
        assert bad.wait(10) and bad.error is not None
        ok, _ = sched.generate([256, 66], max_tokens=3, temperature=0.0)
        assert len(ok[0]) <= 3
    finally:
        sched.close()
