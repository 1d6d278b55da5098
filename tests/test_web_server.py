"""Facts about the chat server (nanochat_jax/serve), over real HTTP on 127.0.0.1 with a scripted fake engine."""

import json
import socket
import threading
import time

import pytest

from nanochat_jax.serve.app import create_app
from nanochat_jax.serve.pool import Worker
from nanochat_jax.serve.protocol import (MAX_BODY_BYTES, MAX_MESSAGE_CHARS, MAX_MESSAGES, MAX_TOTAL_CHARS,
                                         plan_generation)
from webfakes import FakeEngine, FakeTokenizer, SPECIALS, last_user_text, request, running_server, sse_events

pytestmark = pytest.mark.timeout(120)

USER = [{"role": "user", "content": "hello"}]


@pytest.fixture(scope="module")
def server():
    """One server for the endpoint and validation tests: 2 workers x 2 slots, instant replies."""
    engine = FakeEngine()
    app = create_app([Worker(engine, id=0, slots=2), Worker(engine, id=1, slots=2)], FakeTokenizer(),
                     max_context=256, temperature=0.0, top_k=7, max_tokens=100, model_name="fake-d2")
    with running_server(app) as port:
        yield port, engine


def chat(port, messages, **kw):
    status, headers, raw = request(port, "POST", "/chat/completions", {"messages": messages, **kw})
    assert status == 200, raw
    assert headers["content-type"].startswith("text/event-stream")
    return [json.loads(e) for e in sse_events(raw)]


def wait_until(pred, timeout=10.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if pred():
            return True
        time.sleep(0.05)
    return pred()


# ---------------------------------------------------------------------------------------------------------------
# Endpoints

def test_page_is_served(server):
    port, _ = server
    status, headers, body = request(port, "GET", "/")
    assert status == 200 and headers["content-type"].startswith("text/html")
    assert b"/chat/completions" in body and b"<textarea" in body


def test_nanochat_stream_tokens_then_done(server):
    port, _ = server
    events = chat(port, USER)
    assert events[-1] == {"done": True}
    tokens = events[:-1]
    assert all(set(e) == {"token", "gpu"} and e["gpu"] in (0, 1) for e in tokens)
    assert "".join(e["token"] for e in tokens) == "echo: hello"
    assert len(tokens) == len("echo: hello")  # streamed piece by piece, not in one lump


def test_sampling_parameters_reach_the_engine(server):
    port, engine = server
    chat(port, USER, temperature=0.5, top_k=3, max_tokens=9, seed=123, top_p=0.9)
    call = engine.calls[-1]
    assert (call["temperature"], call["top_k"], call["max_tokens"], call["seed"], call["top_p"]) \
        == (0.5, 3, 9, 123, 0.9)
    chat(port, USER)  # server defaults
    call = engine.calls[-1]
    assert (call["temperature"], call["top_k"], call["max_tokens"], call["top_p"]) == (0.0, 7, 100, None)


def test_max_tokens_bounds_the_reply(server):
    port, _ = server
    events = chat(port, USER, max_tokens=4)
    assert "".join(e.get("token", "") for e in events) == "echo"


def test_prompt_uses_the_chat_format(server):
    port, engine = server
    chat(port, [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                {"role": "user", "content": "c"}])
    tok = FakeTokenizer()
    sp = {name: tok.encode_special(name) for name in SPECIALS}
    expected = ([sp["<|bos|>"], sp["<|user_start|>"]] + tok.encode("a") + [sp["<|user_end|>"],
                sp["<|assistant_start|>"]] + tok.encode("b") + [sp["<|assistant_end|>"], sp["<|user_start|>"]]
                + tok.encode("c") + [sp["<|user_end|>"], sp["<|assistant_start|>"]])
    assert engine.calls[-1]["tokens"] == expected


def test_openai_stream(server):
    port, _ = server
    status, headers, raw = request(port, "POST", "/v1/chat/completions",
                                   {"model": "fake-d2", "messages": [{"role": "system", "content": "be brief"},
                                                                     *USER], "stream": True})
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    events = sse_events(raw)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" and c["model"] == "fake-d2" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == "echo: be brief\n\nhello"  # the system text is merged into the first user turn
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])


def test_openai_non_stream_with_usage(server):
    port, engine = server
    status, headers, raw = request(port, "POST", "/v1/chat/completions", {"messages": USER, "max_tokens": 3})
    assert status == 200 and headers["content-type"].startswith("application/json")
    body = json.loads(raw)
    assert body["object"] == "chat.completion"
    choice = body["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": "ech", "refusal": None}
    assert choice["finish_reason"] == "length"
    usage = body["usage"]
    assert usage["prompt_tokens"] == len(engine.calls[-1]["tokens"])
    assert usage["completion_tokens"] == 3
    assert usage["total_tokens"] == usage["prompt_tokens"] + 3


def test_models_health_stats(server):
    port, _ = server
    status, _, raw = request(port, "GET", "/v1/models")
    assert status == 200 and json.loads(raw)["data"][0]["id"] == "fake-d2"
    status, _, raw = request(port, "GET", "/health")
    health = json.loads(raw)
    assert status == 200 and health["status"] == "ok" and health["ready"] is True
    status, _, raw = request(port, "GET", "/stats")
    stats = json.loads(raw)
    assert status == 200
    assert stats["total_slots"] == 4 and stats["available_slots"] == 4 and stats["busy_slots"] == 0
    assert stats["completed"] >= 1 and [w["id"] for w in stats["workers"]] == [0, 1]


def error_of(raw) -> dict:
    """The error object of an error body, checked to be in OpenAI's shape."""
    body = json.loads(raw)
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    return body["error"]


def test_unknown_route_and_method_are_json_errors(server):
    port, _ = server
    status, _, raw = request(port, "GET", "/nope")
    assert status == 404 and error_of(raw)["type"] == "invalid_request_error"
    status, _, raw = request(port, "GET", "/chat/completions")
    assert status == 405 and "GET /chat/completions" in error_of(raw)["message"]


# ---------------------------------------------------------------------------------------------------------------
# Validation: each bad request gets a 400 (413 for a huge body) with a JSON message, and the server keeps serving

def msgs(n, text="hi"):
    return [{"role": "user" if i % 2 == 0 else "assistant", "content": text} for i in range(n)]


BAD_BODIES = {
    "no messages key": {"temperature": 0.5},
    "messages not a list": {"messages": "hello"},
    "zero messages": {"messages": []},
    "too many messages": {"messages": msgs(MAX_MESSAGES + 1)},
    "message not an object": {"messages": ["hello"]},
    "empty content": {"messages": [{"role": "user", "content": ""}]},
    "content not a string": {"messages": [{"role": "user", "content": 42}]},
    "missing content": {"messages": [{"role": "user"}]},
    "message too long": {"messages": [{"role": "user", "content": "x" * (MAX_MESSAGE_CHARS + 1)}]},
    "conversation too long": {"messages": msgs(MAX_TOTAL_CHARS // MAX_MESSAGE_CHARS + 1, "y" * MAX_MESSAGE_CHARS)},
    "bad role": {"messages": [{"role": "wizard", "content": "hi"}]},
    "role not a string": {"messages": [{"role": 1, "content": "hi"}]},
    "system role on nanochat route": {"messages": [{"role": "system", "content": "hi"}, *USER]},
    "no user message": {"messages": [{"role": "assistant", "content": "hi"}]},
    "temperature too high": {"messages": USER, "temperature": 2.01},
    "temperature negative": {"messages": USER, "temperature": -0.1},
    "temperature a string": {"messages": USER, "temperature": "hot"},
    "temperature a bool": {"messages": USER, "temperature": True},
    "top_k too big": {"messages": USER, "top_k": 201},
    "top_k negative": {"messages": USER, "top_k": -1},
    "top_k a float": {"messages": USER, "top_k": 5.5},
    "top_p zero": {"messages": USER, "top_p": 0},
    "top_p above one": {"messages": USER, "top_p": 1.5},
    "top_p a string": {"messages": USER, "top_p": "0.9"},
    "seed negative": {"messages": USER, "seed": -1},
    "seed a float": {"messages": USER, "seed": 1.5},
    "max_tokens zero": {"messages": USER, "max_tokens": 0},
    "max_tokens too big": {"messages": USER, "max_tokens": 4097},
    "max_tokens a string": {"messages": USER, "max_tokens": "10"},
    "body a list": [USER],
    "body a number": 3,
    "unknown field": {"messages": USER, "temprature": 0.5},
    "content with a lone surrogate": {"messages": [{"role": "user", "content": "a\ud800b"}]},
    "message with an extra field": {"messages": [{"role": "user", "content": "hi", "name": "bob"}]},
}


@pytest.mark.parametrize("name", list(BAD_BODIES))
def test_invalid_requests_get_400(server, name):
    port, _ = server
    for path in ("/chat/completions", "/v1/chat/completions"):
        if name == "system role on nanochat route" and path.startswith("/v1"):
            continue
        status, headers, raw = request(port, "POST", path, BAD_BODIES[name])
        assert status == 400, (name, path, raw)
        assert headers["content-type"].startswith("application/json")
        assert error_of(raw)["type"] == "invalid_request_error"
    assert chat(port, USER)[-1] == {"done": True}  # still serving


def test_limits_are_inclusive(server):
    port, _ = server
    ok = [{"messages": msgs(MAX_MESSAGES)}, {"messages": [{"role": "user", "content": "x" * MAX_MESSAGE_CHARS}]},
          {"messages": USER, "temperature": 2, "top_k": 200, "max_tokens": 4096},
          {"messages": USER, "temperature": 0, "top_k": 0, "max_tokens": 1}]
    for body in ok:
        status, _, raw = request(port, "POST", "/chat/completions", body)
        assert status == 200, raw
        assert json.loads(sse_events(raw)[-1]) == {"done": True}


@pytest.mark.parametrize("path", ["/chat/completions", "/v1/chat/completions"])
def test_bad_encodings_get_400(server, path):
    port, _ = server
    cases = [
        (b'{"messages": [{"role": "user", "content": "hi"}', "application/json", "malformed JSON"),
        (b"", "application/json", "malformed JSON"),
        (b"\xff\xfe{\"messages\": []}", "application/json", "UTF-8"),
        (json.dumps({"messages": USER}).encode(), "text/plain", "Content-Type"),
        (json.dumps({"messages": USER}).encode(), "application/x-www-form-urlencoded", "Content-Type"),
        (json.dumps({"messages": USER}).encode(), None, "Content-Type"),
    ]
    for body, ctype, words in cases:
        status, _, raw = request(port, "POST", path, body, content_type=ctype)
        assert status == 400, (body[:20], ctype, raw)
        assert words in error_of(raw)["message"]
    status, _, raw = request(port, "POST", path, {"messages": USER, "stream": True})
    assert status == 200


def test_huge_body_gets_413_and_server_keeps_serving(server):
    port, _ = server
    huge = json.dumps({"messages": [{"role": "user", "content": "z" * (MAX_BODY_BYTES + 10)}]})
    status, _, raw = request(port, "POST", "/chat/completions", huge)
    assert status == 413
    assert "too large" in error_of(raw)["message"]
    assert chat(port, USER)[-1] == {"done": True}


def test_openai_route_specific_validation(server):
    port, _ = server
    for body in ({"messages": USER, "stream": "yes"}, {"messages": USER, "n": 5},
                 {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}):
        status, _, raw = request(port, "POST", "/v1/chat/completions", body)
        assert status == 400, raw
    parts = {"messages": [{"role": "user", "content": [{"type": "text", "text": "hel"}, {"type": "text",
                                                                                          "text": "lo"}]}]}
    status, _, raw = request(port, "POST", "/v1/chat/completions", parts)
    assert status == 200 and json.loads(raw)["choices"][0]["message"]["content"] == "echo: hello"


# ---------------------------------------------------------------------------------------------------------------
# Prompts: the tokenizer's chat format, fitted by infer/prompt.fit_conversation; too-long conversations drop their
# oldest turns, never crash

def prompt(tok, messages, max_context, max_tokens):
    return plan_generation(tok, messages, max_context=max_context, max_tokens=max_tokens, temperature=0.0, top_k=0,
                           seed=0)[0]


def test_prompt_drops_oldest_turns_and_keeps_system():
    tok = FakeTokenizer()
    messages = [{"role": "system", "content": "SYS"}]
    for i in range(20):
        messages += [{"role": "user", "content": f"question {i:02d}"}, {"role": "assistant", "content": "x" * 30}]
    messages.append({"role": "user", "content": "last one"})
    ids = prompt(tok, messages, max_context=240, max_tokens=120)
    assert len(ids) < 120  # the reply's 120 tokens fit after it
    assert ids[0] == tok.get_bos_token_id() and ids[-1] == tok.encode_special("<|assistant_start|>")
    assert ids[1] == tok.encode_special("<|user_start|>")  # starts with a user turn
    text = tok.decode(ids)
    assert text.startswith("SYS\n\n") and "last one" in text and "question 00" not in text
    assert last_user_text(ids) == "last one"
    # a single enormous message is cut from the left, keeping <|bos|> and its end
    ids = prompt(tok, [{"role": "user", "content": "a" * 500 + "END"}], max_context=128, max_tokens=64)
    assert len(ids) == 128 - 64 - 1 and ids[0] == tok.get_bos_token_id() and tok.decode(ids).endswith("END")


def test_requests_out_of_chat_order_are_reshaped():
    tok = FakeTokenizer()
    u, a, s = ({"role": r, "content": t} for r, t in (("user", "q"), ("assistant", "r"), ("system", "S")))
    # a message sent again after a reply that never came joins the first
    assert last_user_text(prompt(tok, [u, {"role": "user", "content": "q2"}], 256, 16)) == "q\n\nq2"
    # system texts, wherever they are, join the first user turn; an assistant turn before it is dropped
    ids = prompt(tok, [a, u, s, a, {"role": "system", "content": "T"}, u], 256, 16)
    assert ids == tok.render_for_completion({"messages": [{"role": "system", "content": "S\n\nT"}, u, a, u]})
    # system text alone is the user's turn
    sp = tok.encode_special
    assert prompt(tok, [s], 256, 16) == [0, sp("<|user_start|>"), *tok.encode("S"), sp("<|user_end|>"),
                                         sp("<|assistant_start|>")]


def test_long_conversation_is_served(server):
    port, engine = server
    long = msgs(10, "w" * 3000) + [{"role": "user", "content": "final"}]
    events = chat(port, long, max_tokens=20)
    assert "".join(e.get("token", "") for e in events) == "echo: final"
    assert len(engine.calls[-1]["tokens"]) + engine.calls[-1]["max_tokens"] <= 256


# ---------------------------------------------------------------------------------------------------------------
# Concurrency and disconnects

def stream_many(port, n, messages_of):
    results, errors = [None] * n, []

    def client(i):
        try:
            results[i] = chat(port, messages_of(i))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(repr(e))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors and not any(t.is_alive() for t in threads)
    return results


def test_16_concurrent_streaming_clients_all_complete():
    engine = FakeEngine(delay=0.02)  # ~0.3 s per reply
    app = create_app([Worker(engine, id=0, slots=8), Worker(engine, id=1, slots=8)], FakeTokenizer(),
                     max_context=256, temperature=0.0)
    with running_server(app) as port:
        t0 = time.time()
        results = stream_many(port, 16, lambda i: [{"role": "user", "content": f"client {i:02d}"}])
        elapsed = time.time() - t0
        for i, events in enumerate(results):
            assert events[-1] == {"done": True}
            assert "".join(e.get("token", "") for e in events) == f"echo: client {i:02d}"
        assert engine.max_running > 1  # served side by side, not one after another
        sequential = 16 * len("echo: client 00") * 0.02
        assert elapsed < sequential / 2, (elapsed, sequential)
        stats = json.loads(request(port, "GET", "/stats")[2])
        assert stats["completed"] == 16 and stats["available_slots"] == 16


def test_single_slot_queues_requests_and_never_overlaps():
    engine = FakeEngine(delay=0.005)
    app = create_app([engine], FakeTokenizer(), max_context=256)  # a bare engine = one slot
    with running_server(app) as port:
        results = stream_many(port, 6, lambda i: [{"role": "user", "content": f"q{i}"}])
    assert [("".join(e.get("token", "") for e in r)).startswith(f"echo: q{i}") for i, r in enumerate(results)] \
        == [True] * 6
    assert engine.max_running == 1


def test_busy_timeout_answers_instead_of_hanging():
    engine = FakeEngine(delay=0.05)
    app = create_app([engine], FakeTokenizer(), max_context=256, acquire_timeout=0.2)
    with running_server(app) as port:
        results = [None, None]

        def slow():
            results[0] = chat(port, [{"role": "user", "content": "x" * 40}])
        t = threading.Thread(target=slow)
        t.start()
        assert wait_until(lambda: engine.running == 1)
        for path in ("/v1/chat/completions", "/chat/completions"):  # streamed or not, a 503 before any event
            for stream in (False, True):
                status, _, raw = request(port, "POST", path, {"messages": USER} | ({"stream": True} if stream and
                                                                                   path.startswith("/v1") else {}))
                assert status == 503 and "busy" in error_of(raw)["message"]
                assert error_of(raw)["type"] == "server_error"
        t.join(timeout=30)
    assert results[0][-1] == {"done": True}


def test_client_disconnect_frees_the_slot():
    engine = FakeEngine(delay=0.05, reply="z" * 1000)  # 50 s if nobody stopped it
    app = create_app([engine], FakeTokenizer(), max_context=2048)
    with running_server(app) as port:
        for path in ("/chat/completions", "/v1/chat/completions"):
            sock = socket.create_connection(("127.0.0.1", port), timeout=10)
            body = json.dumps({"messages": USER, "stream": True}).encode()
            sock.sendall(b"POST " + path.encode() + b" HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         + b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
            got = b""
            while got.count(b"data: ") < 3:  # a few events arrive: generation is under way
                chunk = sock.recv(4096)
                assert chunk
                got += chunk
            assert engine.running == 1
            stats = json.loads(request(port, "GET", "/stats")[2])
            assert stats["busy_slots"] == 1 and stats["available_slots"] == 0
            sock.close()  # the client goes away mid-stream
            assert wait_until(lambda: engine.running == 0, timeout=10)
            stats = json.loads(request(port, "GET", "/stats")[2])
            assert stats["available_slots"] == 1 and stats["busy_slots"] == 0
        assert engine.closed_early == 2 and stats["cancelled"] == 2
        events = chat(port, USER, max_tokens=5)  # the freed slot serves the next client
        assert "".join(e.get("token", "") for e in events) == "zzzzz"


# ---------------------------------------------------------------------------------------------------------------
# nanochat_jax/cli/chat_web.py (python -m scripts.chat_web) wiring

def test_chat_web_main_serves_with_flags(monkeypatch):
    from types import SimpleNamespace

    from nanochat_jax.cli import chat_web

    engine, servers = FakeEngine(), []
    monkeypatch.setattr(chat_web, "load_chat_model",
                        lambda args: ({}, SimpleNamespace(n_layer=2, sequence_len=128, vocab_size=300),
                                      FakeTokenizer(), {"step": 7}))
    monkeypatch.setattr(chat_web, "build_workers", lambda p, c, t, n, s: [Worker(engine, id=0, slots=s)])
    real_serve = chat_web.serve

    def recording_serve(app, host, port, **kw):
        servers.append((real_serve(app, host, port, **kw), kw))
        return servers[-1][0]
    monkeypatch.setattr(chat_web, "serve", recording_serve)
    argv = ["--checkpoint", "/x/d4", "--host", "127.0.0.1", "--port", "0", "-t", "0.3", "-k", "9", "-m", "100",
            "--slots", "3"]
    thread = threading.Thread(target=chat_web.main, args=(argv,), daemon=True)
    thread.start()
    try:
        assert wait_until(lambda: bool(servers), timeout=20)
        port = servers[0][0].port
        # waitress (not Flask's development server), with its limits set from the flags and the slots
        assert request(port, "GET", "/health")[1]["server"] == "waitress"
        assert servers[0][1] == dict(threads=3 + 4 * 3 + 4, connection_limit=500, timeout=60, trusted_proxy=None)
        events = chat(port, USER)
        assert "".join(e.get("token", "") for e in events) == "echo: hello (t=0.3)"
        call = engine.calls[-1]  # the first two calls are the warm-up (top_k 9 and 0)
        assert [c["top_k"] for c in engine.calls[:2]] == [0, 9]
        assert (call["temperature"], call["top_k"], call["max_tokens"]) == (0.3, 9, 100) and len(engine.calls) == 3
        assert json.loads(request(port, "GET", "/v1/models")[2])["data"][0]["id"] == "nanochat-d4-step000007"
        assert json.loads(request(port, "GET", "/stats")[2])["total_slots"] == 3
    finally:
        if servers:
            servers[0][0].shutdown()
        thread.join(timeout=10)
    assert not thread.is_alive()


def test_chat_web_bad_flags():
    from nanochat_jax.cli import chat_web
    from nanochat_jax.core.common import UserError
    for argv in (["-t", "2.5"], ["-k", "201"], ["-m", "0"], ["--port", "99999"], ["-p", "-1"], ["--timeout", "0"]):
        with pytest.raises(UserError):
            chat_web.main(argv)


# ---------------------------------------------------------------------------------------------------------------
# With the real tokenizer (and, once it exists, the real engine on a tiny random model)

@pytest.fixture(scope="module")
def real_tokenizer():
    from nanochat_jax.data.tokenizer import Tokenizer
    ranks = {bytes([i]): i for i in range(256)}
    for pair in (b"th", b"he", b"e ", b" t", b"re"):  # a few merges, so tokens are not just bytes
        ranks[pair] = len(ranks)
    return Tokenizer(ranks)  # vocab 270: bytes, 5 merges, 9 specials


def test_prompt_is_the_tokenizer_chat_format(real_tokenizer):
    tok = real_tokenizer
    conv = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hello there"},
            {"role": "assistant", "content": "How are you?"}, {"role": "user", "content": "Why is the sky blue?"}]
    for messages in (conv, conv[1:2], conv[1:]):
        assert prompt(tok, messages, 10_000, 100) == tok.render_for_completion({"messages": messages})


@pytest.fixture(scope="module")
def tiny_export(real_tokenizer, tmp_path_factory):
    """A random d2 model with the real tokenizer, written as a weights-only export."""
    import jax

    from nanochat_jax.train.load import export_weights
    from nanochat_jax.core.config import ModelConfig
    from nanochat_jax.model import init_params
    config = ModelConfig.from_depth(2, vocab_size=real_tokenizer.get_vocab_size(), max_seq_len=128)
    params = init_params(config, jax.random.PRNGKey(0))
    return export_weights(tmp_path_factory.mktemp("tiny") / "export", params, config, real_tokenizer, dtype=None)


@pytest.mark.slow
def test_real_engine_serves_a_tiny_random_model(tiny_export):
    pytest.importorskip("nanochat_jax.infer.engine")
    from nanochat_jax.train.load import load_model_from_path
    from nanochat_jax.infer.engine import Engine
    params, config, tokenizer, meta = load_model_from_path(tiny_export)
    app = create_app([Engine(params, config, tokenizer)], tokenizer, max_context=config.sequence_len,
                     temperature=0.0, max_tokens=12)
    with running_server(app) as port:
        events = chat(port, USER, seed=1)
        assert events[-1] == {"done": True} and not any("error" in e for e in events)
        text = "".join(e.get("token", "") for e in events)
        status, _, raw = request(port, "POST", "/v1/chat/completions", {"messages": USER, "seed": 1})
        body = json.loads(raw)
        assert status == 200 and body["choices"][0]["message"]["content"] == text  # greedy: same reply
        assert 0 <= body["usage"]["completion_tokens"] <= 12
        sampled = [chat(port, USER, temperature=1.0, seed=s) for s in (3, 3)]
        assert sampled[0] == sampled[1]  # same seed, same sample
        results = stream_many(port, 4, lambda i: USER)  # queued on one engine, all complete
        assert all(r[-1] == {"done": True} for r in results)


@pytest.mark.slow
def test_chat_cli_answers_with_a_tiny_random_model(tiny_export):
    pytest.importorskip("nanochat_jax.infer.engine")
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "-m", "scripts.chat", "--checkpoint", str(tiny_export), "-p", "hello",
                        "-m", "6", "-t", "0"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr


@pytest.mark.slow
def test_continuous_batching_server_with_a_tiny_random_model(tiny_export):
    """chat_web's engines (BatchScheduler, 4 rows): 8 concurrent clients complete; a disconnect frees its row."""
    pytest.importorskip("nanochat_jax.infer.engine")
    from nanochat_jax.train.load import load_model_from_path
    from nanochat_jax.cli.chat_web import build_workers
    params, config, tokenizer, meta = load_model_from_path(tiny_export)
    workers = build_workers(params, config, tokenizer, 1, 4)
    app = create_app(workers, tokenizer, max_context=config.sequence_len, temperature=0.0, max_tokens=16)
    scheduler = workers[0].engine.scheduler
    try:
        with running_server(app) as port:
            alone = chat(port, USER, seed=1)
            assert len(alone) > 2, alone  # some tokens came before done
            results = stream_many(port, 8, lambda i: USER)
            assert all(r == alone for r in results)  # greedy: batching does not change the reply
            assert scheduler.stats()["requests"] == 9
            # a client that leaves mid-stream frees its batch row
            sock = socket.create_connection(("127.0.0.1", port), timeout=30)
            body = json.dumps({"messages": USER, "max_tokens": 4000, "temperature": 1.0, "seed": 0}).encode()
            sock.sendall(b"POST /chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
            got = b""
            while b"data: " not in got:
                chunk = sock.recv(4096)
                assert chunk
                got += chunk
            sock.close()
            assert wait_until(lambda: scheduler.stats()["active_rows"] == 0, timeout=30)
            stats = json.loads(request(port, "GET", "/stats")[2])
            assert stats["available_slots"] == 4 and stats["workers"][0]["engine"]["active_rows"] == 0
    finally:
        scheduler.close()


def test_prompt_counts_the_system_text_when_dropping_turns():
    tok = FakeTokenizer()
    system = {"role": "system", "content": "S" * 40}
    turns = [{"role": "user", "content": "u" * 20}, {"role": "assistant", "content": "a" * 20},
             {"role": "user", "content": "v" * 20}, {"role": "assistant", "content": "b" * 20},
             {"role": "user", "content": "last"}]
    ids = prompt(tok, [system] + turns, max_context=180, max_tokens=90)
    text = tok.decode(ids)
    assert len(ids) < 90 and text.startswith("S" * 40 + "\n\n")  # the system text kept whole
    assert text.endswith("last") and "u" * 20 not in text
    # the chat format starts with the user: an assistant turn before the first user turn is dropped
    ids = prompt(tok, [{"role": "assistant", "content": "Hi!"}, {"role": "user", "content": "yo"}], 200, 100)
    assert ids[1] == tok.encode_special("<|user_start|>") and tok.decode(ids) == "yo"
