"""Facts about the OpenAI-compatible API (serve/openai_request.py, serve/openai_response.py, serve/generate.py),
judged by the official `openai` client against a real server on 127.0.0.1 with a scripted fake engine: every answer
parses, errors are its own exception classes carrying our message, and each supported field does what OpenAI's does
(stop, n, seed, stream_options.include_usage, usage, logprobs + top_logprobs, model, /v1/completions); everything
else is refused with a 400 naming the field."""

import json

import pytest

from nanochat_jax.serve.app import create_app
from nanochat_jax.serve.generate import StopText
from nanochat_jax.serve.pool import Worker
from webfakes import OFFSET, FakeEngine, FakeTokenizer, fake_logprob, request, running_server, sse_events

openai = pytest.importorskip("openai", reason="the official client is in the dev extra (pip install -e '.[dev]')")

pytestmark = pytest.mark.timeout(120)

MODEL = "fake-d2"
USER = [{"role": "user", "content": "hello"}]


@pytest.fixture(scope="module")
def server():
    engine = FakeEngine()
    app = create_app([Worker(engine, id=0, slots=2)], FakeTokenizer(), max_context=256, temperature=0.0,
                     top_k=7, max_tokens=100, model_name=MODEL)
    with running_server(app) as port:
        yield port, engine


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"http://127.0.0.1:{server[0]}/v1", api_key="unused", max_retries=0, timeout=30)


def post(port, path, body):
    status, headers, raw = request(port, "POST", path, body)
    return status, (json.loads(raw) if headers["content-type"].startswith("application/json") else raw)


# ---------------------------------------------------------------------------------------------------------------
# The official client

def test_client_parses_a_chat_completion(client, server):
    r = client.chat.completions.create(model=MODEL, messages=USER, max_tokens=50)
    assert r.object == "chat.completion" and r.model == MODEL and r.id.startswith("chatcmpl-")
    (choice,) = r.choices
    assert choice.message.role == "assistant" and choice.message.content == "echo: hello"
    assert choice.finish_reason == "stop" and choice.logprobs is None
    assert r.usage.prompt_tokens == len(server[1].calls[-1]["tokens"])
    assert r.usage.completion_tokens == len("echo: hello")
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_client_parses_a_stream_with_a_usage_chunk(client):
    chunks = list(client.chat.completions.create(model=MODEL, messages=USER, stream=True,
                                                 stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" and c.model == MODEL for c in chunks)
    assert len({c.id for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "echo: hello"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len("echo: hello")
    assert all(c.usage is None for c in chunks[:-1])
    # without include_usage: no usage chunk
    chunks = list(client.chat.completions.create(model=MODEL, messages=USER, stream=True))
    assert all(c.choices for c in chunks)


def test_client_lists_the_model(client):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL] and models.data[0].object == "model"


def test_client_raises_its_own_errors_with_our_message(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=USER, temperature=5)
    assert e.value.status_code == 400
    assert e.value.body == {"message": "temperature must be between 0.0 and 2.0", "type": "invalid_request_error",
                            "param": "temperature", "code": None}
    assert "temperature must be between 0.0 and 2.0" in str(e.value)
    assert e.value.param == "temperature" and e.value.type == "invalid_request_error"
    with pytest.raises(openai.BadRequestError) as e:  # refused, not ignored
        client.chat.completions.create(model=MODEL, messages=USER, tools=[{"type": "function", "function": {
            "name": "f", "parameters": {}}}])
    assert e.value.code == "unsupported_parameter" and "'tools' is not supported" in e.value.body["message"]
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4o", messages=USER)
    assert e.value.code == "model_not_found" and MODEL in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="x", logprobs=9)
    assert e.value.param == "logprobs"


def test_client_parses_text_completions(client, server):
    r = client.completions.create(model=MODEL, prompt="abc", max_tokens=5)
    assert r.object == "text_completion" and r.choices[0].text == "echo:" and r.choices[0].finish_reason == "length"
    assert server[1].calls[-1]["tokens"] == [0] + FakeTokenizer().encode("abc")  # <|bos|> and the text
    assert r.usage.prompt_tokens == 4 and r.usage.completion_tokens == 5
    chunks = list(client.completions.create(model=MODEL, prompt="abc", max_tokens=5, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == "echo:"
    assert chunks[-1].usage.total_tokens == 9


# ---------------------------------------------------------------------------------------------------------------
# stop, n, seed, usage

def test_stop_strings_end_the_text_and_are_not_returned(client):
    def reply(stop, **kw):
        r = client.chat.completions.create(model=MODEL, messages=USER, stop=stop, **kw)
        return r.choices[0].message.content, r.choices[0].finish_reason

    assert reply("llo") == ("echo: he", "stop")
    assert reply(["zzz", "l", "o: "]) == ("ech", "stop")     # the earliest in the text wins
    assert reply(["hello!"]) == ("echo: hello", "stop")     # a partial match at the end is returned after all
    assert reply("xyz", max_tokens=4) == ("echo", "length")
    streamed = client.chat.completions.create(model=MODEL, messages=USER, stop=["ell"], stream=True)
    pieces = [c.choices[0].delta.content for c in streamed if c.choices and c.choices[0].delta.content]
    assert "".join(pieces) == "echo: h"  # nothing of the stop text leaked into the stream
    r = client.completions.create(model=MODEL, prompt="abc", stop="o:", max_tokens=20)
    assert r.choices[0].text == "ech" and r.choices[0].finish_reason == "stop"


def test_stop_text_holds_back_what_may_start_a_stop_string():
    s = StopText(["END", "xy"])
    assert s.push("abcE") == ("abc", False)       # "E" may start "END"
    assert s.push("N") == ("", False)
    assert s.push("Dmore") == ("", True)           # found across three pieces
    s = StopText(["END"])
    assert s.push("aEN") == ("a", False) and s.push("x") == ("ENx", False) and s.flush() == ""
    s = StopText(["END"])
    assert s.push("EN") == ("", False) and s.flush() == "EN"


def test_n_choices_with_consecutive_seeds(client, server):
    engine = server[1]
    r = client.chat.completions.create(model=MODEL, messages=USER, n=3, seed=11, temperature=0.5)
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert [c["seed"] for c in engine.calls[-3:]] == [11, 12, 13]
    assert all(c["temperature"] == 0.5 for c in engine.calls[-3:])
    assert r.usage.completion_tokens == 3 * len("echo: hello (t=0.5)")
    assert r.usage.prompt_tokens == len(engine.calls[-1]["tokens"])  # the prompt counts once
    chunks = list(client.chat.completions.create(model=MODEL, messages=USER, n=2, stream=True))
    for i in (0, 1):
        mine = [c.choices[0] for c in chunks if c.choices[0].index == i]
        assert mine[0].delta.role == "assistant" and mine[-1].finish_reason == "stop"
        assert "".join(c.delta.content or "" for c in mine) == "echo: hello"
    r = client.completions.create(model=MODEL, prompt=["ab", "cd"], n=2, max_tokens=7)
    assert [(c.index, c.text) for c in r.choices] == [(0, "echo: a"), (1, "echo: a"), (2, "echo: c"),
                                                      (3, "echo: c")]
    assert r.usage.prompt_tokens == 6 and r.usage.completion_tokens == 4 * 7


def test_seed_reaches_the_engine(client, server):
    client.chat.completions.create(model=MODEL, messages=USER, seed=12345)
    assert server[1].calls[-1]["seed"] == 12345


# ---------------------------------------------------------------------------------------------------------------
# logprobs

def test_chat_logprobs_and_top_logprobs(client, server):
    r = client.chat.completions.create(model=MODEL, messages=USER, logprobs=True, top_logprobs=3, stop="llo")
    choice = r.choices[0]
    assert choice.message.content == "echo: he"
    content = choice.logprobs.content
    assert "".join(t.token for t in content) == "echo: he"  # only the tokens of the returned text
    tok = FakeTokenizer()
    assert [t.logprob for t in content] == [fake_logprob(i) for i in tok.encode("echo: he")]
    assert all(t.bytes == list(t.token.encode()) for t in content)
    assert [[a.logprob for a in t.top_logprobs] for t in content] == [[-1.0, -2.0, -3.0]] * len(content)
    assert content[0].top_logprobs[1].token == tok.decode([OFFSET + 1])
    score = server[1].scores[-1]  # scored after the reply, in one pass over prompt + reply
    assert score["start"] == len(score["tokens"]) - len("echo: he") and score["top"] == 3
    r = client.chat.completions.create(model=MODEL, messages=USER, logprobs=True)
    assert all(t.top_logprobs == [] for t in r.choices[0].logprobs.content)


def test_completion_logprobs_with_echo_score_a_text(client, server):
    r = client.completions.create(model=MODEL, prompt="abc", max_tokens=0, echo=True, logprobs=2)
    (choice,) = r.choices
    assert choice.text == "abc" and r.usage.completion_tokens == 0
    lp = choice.logprobs
    assert lp.tokens == ["a", "b", "c"] and lp.text_offset == [0, 1, 2]
    assert lp.token_logprobs == [fake_logprob(t) for t in FakeTokenizer().encode("abc")]
    assert lp.top_logprobs[0] == {FakeTokenizer().decode([OFFSET]): -1.0, FakeTokenizer().decode([OFFSET + 1]): -2.0}
    assert server[1].scores[-1]["start"] == 1  # after the <|bos|> the server put in front
    # token ids as the prompt: echoed as given, the first has nothing to be predicted from
    ids = FakeTokenizer().encode("xyz")
    r = client.completions.create(model=MODEL, prompt=ids, max_tokens=2, echo=True, logprobs=0)
    lp = r.choices[0].logprobs
    assert r.choices[0].text == "xyzec" and lp.tokens == ["x", "y", "z", "e", "c"]
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None and lp.text_offset == [0, 1, 2, 3, 4]


# ---------------------------------------------------------------------------------------------------------------
# Refused, never ignored

CHAT_REFUSED = {
    "tools": ({"tools": []}, "tools"),
    "tool_choice": ({"tool_choice": "auto"}, "tool_choice"),
    "functions": ({"functions": [{"name": "f"}]}, "functions"),
    "json response_format": ({"response_format": {"type": "json_object"}}, "response_format"),
    "unknown field": ({"temprature": 0.3}, "temprature"),
    "n too big": ({"n": 5}, "n"),
    "n zero": ({"n": 0}, "n"),
    "five stops": ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    "empty stop": ({"stop": ""}, "stop"),
    "stop not text": ({"stop": [1]}, "stop"),
    "top_logprobs without logprobs": ({"top_logprobs": 2}, "top_logprobs"),
    "top_logprobs too many": ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    "logprobs not a bool": ({"logprobs": 1}, "logprobs"),
    "logprobs while streaming": ({"logprobs": True, "stream": True}, "logprobs"),
    "stream_options without stream": ({"stream_options": {"include_usage": True}}, "stream_options"),
    "stream_options unknown key": ({"stream": True, "stream_options": {"x": 1}}, "stream_options"),
    "frequency_penalty": ({"frequency_penalty": 0.5}, "frequency_penalty"),
    "presence_penalty": ({"presence_penalty": -1}, "presence_penalty"),
    "logit_bias": ({"logit_bias": {"5": 10}}, "logit_bias"),
    "model not a string": ({"model": 3}, "model"),
    "both token limits": ({"max_tokens": 5, "max_completion_tokens": 5}, "max_tokens"),
    "user not a string": ({"user": 5}, "user"),
    "tool message": ({"messages": [{"role": "tool", "content": "x"}]}, "messages"),
}


@pytest.mark.parametrize("name", list(CHAT_REFUSED))
def test_chat_refuses_what_it_does_not_support(server, name):
    extra, param = CHAT_REFUSED[name]
    status, body = post(server[0], "/v1/chat/completions", {"messages": USER, **extra})
    assert status == 400, body
    assert body["error"]["param"] == param and body["error"]["type"] == "invalid_request_error"
    assert body["error"]["message"]


def test_neutral_values_and_nulls_are_accepted(server):
    body = {"messages": USER, "model": MODEL, "frequency_penalty": 0, "presence_penalty": 0.0, "logit_bias": {},
            "response_format": {"type": "text"}, "user": "u1", "n": 1, "stop": [], "tools": None, "seed": None,
            "max_completion_tokens": 4, "messages_extra": None}
    status, out = post(server[0], "/v1/chat/completions", body)
    assert status == 200 and out["choices"][0]["message"]["content"] == "echo"
    status, out = post(server[0], "/v1/chat/completions", {"messages": [{"role": "developer", "content": "sys"},
                                                                        *USER]})
    assert status == 200  # OpenAI's new name for the system message


def test_model_is_checked_against_v1_models(server):
    port = server[0]
    served = json.loads(request(port, "GET", "/v1/models")[2])["data"][0]["id"]
    for path, body in (("/v1/chat/completions", {"messages": USER}), ("/v1/completions", {"prompt": "hi"})):
        assert post(port, path, {**body, "model": served})[0] == 200
        assert post(port, path, body)[0] == 200  # no model: the served one
        status, out = post(port, path, {**body, "model": served + "x"})
        assert status == 404 and out["error"]["code"] == "model_not_found"


COMPLETION_REFUSED = {
    "no prompt": ({}, "prompt"),
    "empty list": ({"prompt": []}, "prompt"),
    "prompt a number": ({"prompt": 5}, "prompt"),
    "mixed list": ({"prompt": ["a", 5]}, "prompt"),
    "nested too deep": ({"prompt": [[[1]]]}, "prompt"),
    "too many prompts": ({"prompt": ["a"] * 17}, "prompt"),
    "token id out of range": ({"prompt": [1, 10**6]}, "prompt"),
    "negative token id": ({"prompt": [-1]}, "prompt"),
    "too long for the context": ({"prompt": [5] * 300}, "prompt"),
    "max_tokens 0 without echo": ({"prompt": "a", "max_tokens": 0}, "max_tokens"),
    "echo not a bool": ({"prompt": "a", "echo": "yes"}, "echo"),
    "suffix": ({"prompt": "a", "suffix": "b"}, "suffix"),
    "best_of": ({"prompt": "a", "best_of": 2}, "best_of"),
    "messages": ({"prompt": "a", "messages": USER}, "messages"),
    "logprobs too many": ({"prompt": "a", "logprobs": 6}, "logprobs"),
}


@pytest.mark.parametrize("name", list(COMPLETION_REFUSED))
def test_completions_validate_the_same_way(server, name):
    body, param = COMPLETION_REFUSED[name]
    status, out = post(server[0], "/v1/completions", body)
    assert status == 400, out
    assert out["error"]["param"] == param and out["error"]["message"]


def test_completion_prompt_fills_the_context_then_stops(server):
    status, out = post(server[0], "/v1/completions", {"prompt": [OFFSET + 97] * 250, "max_tokens": 100})
    assert status == 200 and out["choices"][0]["finish_reason"] == "length"
    assert out["usage"]["completion_tokens"] == 6  # 256 - 250: the reply gets what the context has left
    status, out = post(server[0], "/v1/completions", {"prompt": [OFFSET + 97] * 256, "max_tokens": 1})
    assert status == 400 and out["error"]["code"] == "context_length_exceeded"


def test_streamed_completion_events(server):
    status, raw = post(server[0], "/v1/completions", {"prompt": "ab", "stream": True, "max_tokens": 3, "n": 2})
    events = sse_events(raw)
    assert status == 200 and events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "text_completion" and "usage" not in c for c in chunks)
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"][0]["finish_reason"]] == ["length"] * 2


# ---------------------------------------------------------------------------------------------------------------
# With the real engine on a tiny random model

@pytest.mark.slow
def test_real_engine_logprobs_agree_with_greedy_decoding():
    """Greedy decoding picks each step's most likely token, so every returned token is its own top_logprobs[0]
    (scored in one pass by Engine.score, decoded step by step by the KV-cached engine)."""
    import jax

    from nanochat_jax.core.config import ModelConfig
    from nanochat_jax.data.tokenizer import Tokenizer
    from nanochat_jax.infer.engine import Engine
    from nanochat_jax.model import init_params
    tok = Tokenizer({bytes([i]): i for i in range(256)})
    config = ModelConfig.from_depth(2, vocab_size=tok.get_vocab_size(), max_seq_len=64)
    engine = Engine(init_params(config, jax.random.PRNGKey(0)), config, tok)
    engine.stop_tokens = frozenset()  # random weights: let the reply run its full length
    app = create_app([engine], tok, max_context=64, temperature=0.0, max_tokens=8, model_name=MODEL)
    with running_server(app) as port:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0, timeout=120)
        chat = client.chat.completions.create(model=MODEL, messages=USER, max_tokens=8, logprobs=True,
                                              top_logprobs=3, temperature=0)
        content = chat.choices[0].logprobs.content
        assert len(content) == 8 and chat.usage.completion_tokens == 8
        for t in content:
            assert len(t.top_logprobs) == 3 and t.logprob <= 0
            assert abs(t.logprob - t.top_logprobs[0].logprob) < 1e-4  # the argmax, up to a near-tie
        # a completion's logprobs, and the same completion with its prompt echoed and scored too, agree
        r = client.completions.create(model=MODEL, prompt="Hello", max_tokens=8, logprobs=3, temperature=0)
        lp = r.choices[0].logprobs
        assert len(lp.tokens) == 8 and all(len(top) <= 3 for top in lp.top_logprobs)
        again = client.completions.create(model=MODEL, prompt="Hello", max_tokens=8, echo=True, logprobs=1,
                                          temperature=0)
        echoed = again.choices[0].logprobs
        assert again.choices[0].text == "Hello" + r.choices[0].text and len(echoed.tokens) == 5 + 8
        assert echoed.token_logprobs[-8:] == pytest.approx(lp.token_logprobs, abs=1e-4)
