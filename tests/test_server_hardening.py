"""Facts about the chat server under hostile input and load (serve/protocol.py, serve/server.py), and the one-line
errors of its flags and presets: deep or huge JSON is a 400 with a message, never a 500; user text is escaped in
the log; waitress holds half-sent requests without threads, closes them when idle, and keeps /health answering;
the probe (bench/probe_server.py) finds no 5xx."""

import importlib.util
import json
import logging
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from nanochat_jax.core.common import PRESET_TABLES, UserError, load_preset, parse_args, ArgumentParser
from nanochat_jax.serve.app import create_app
from nanochat_jax.serve.pool import Worker
from nanochat_jax.serve.protocol import log_text
from webfakes import FakeEngine, FakeTokenizer, request, running_server

pytestmark = pytest.mark.timeout(180)

REPO = Path(__file__).resolve().parents[1]
USER = [{"role": "user", "content": "hello"}]
ROUTES = ("/chat/completions", "/v1/chat/completions", "/v1/completions")


@pytest.fixture(scope="module")
def server():
    engine = FakeEngine()
    app = create_app([Worker(engine, slots=2)], FakeTokenizer(), max_context=256, model_name="fake")
    with running_server(app) as port:
        yield port


def error_message(raw: bytes) -> str:
    err = json.loads(raw)["error"]
    assert set(err) == {"message", "type", "param", "code"}
    return err["message"]


# ---------------------------------------------------------------------------------------------------------------
# Hostile bodies: a 400 with a message, never a 500

HOSTILE = {
    "100k-deep JSON": (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    "50k-deep content": (b'{"messages": [{"role": "user", "content": ' + b"[" * 50_000 + b"]" * 50_000 + b"}]}",
                         "nested too deeply"),
    "5,000-digit integer": (b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": ' + b"7" * 5000 + b"}",
                            "too many digits"),
    "5,000-digit body": (b"1" * 5000, "too many digits"),
    "NaN": (b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', "temperature"),
    "1e999": (b'{"messages": [{"role": "user", "content": "hi"}], "temperature": 1e999}', "temperature"),
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_json_is_a_400_with_a_message(server, name):
    body, words = HOSTILE[name]
    for path in ROUTES:
        status, _, raw = request(server, "POST", path, body)
        if path == "/v1/completions" and words == "temperature":
            assert status == 400  # no prompt: refused for that first
            continue
        assert status == 400, (path, raw[:200])
        assert words in error_message(raw)
    assert request(server, "GET", "/health")[0] == 200


def test_lone_surrogates_are_refused_not_crashed_on(server):
    for path, body in (("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "a\\udc80"}]}'),
                       ("/v1/completions", b'{"prompt": "\\ud800"}'),
                       ("/v1/chat/completions",
                        b'{"messages": [{"role": "user", "content": "hi"}], "stop": "\\ud800"}')):
        status, _, raw = request(server, "POST", path, body)
        assert status == 400 and "surrogate" in error_message(raw)


def test_errors_waitress_answers_itself_are_openai_shaped(server):
    def raw(data):
        with socket.create_connection(("127.0.0.1", server), timeout=10) as s:
            try:
                s.sendall(data)
            except OSError:
                pass
            out = b""
            try:
                while chunk := s.recv(65536):
                    out += chunk
            except OSError:
                pass
        head, _, body = out.partition(b"\r\n\r\n")
        return int(head.split(b" ")[1]), body

    for data, status in ((b"GARBAGE\r\n\r\n", 400),
                         (b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n", 431),
                         (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 10000000\r\n\r\n", 413),
                         (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n\r\n",
                          400)):
        got, body = raw(data)
        assert got == status and error_message(body)


# ---------------------------------------------------------------------------------------------------------------
# The log: user text escaped, one record per line

def test_log_text_escapes_what_could_forge_a_line():
    assert log_text("a\r\nb") == "a\\r\\nb"
    assert log_text("\x1b[31mred\x00") == "\\x1b[31mred\\x00"
    assert log_text("back\\slash") == "back\\\\slash"  # so an escape typed by the user stays distinguishable
    assert log_text("x\u2028y\u202ez") == "x\\u2028y\\u202ez"
    assert log_text("héllo 中文 😀") == "héllo 中文 😀"  # ordinary text as is


def test_user_text_is_escaped_in_the_log(server, caplog):
    forged = "hi\r\n2026-01-01 00:00:00 [deadbeef] [USER]: forged\x1b[2J\u2028"
    caplog.set_level(logging.INFO, logger="nanochat_jax.serve")
    for path, body in (("/chat/completions", {"messages": [{"role": "user", "content": forged}]}),
                       ("/v1/chat/completions", {"messages": [{"role": "user", "content": forged}], "user": forged}),
                       ("/v1/completions", {"prompt": forged, "max_tokens": 3})):
        assert request(server, "POST", path, body)[0] == 200
    request(server, "GET", "/%0d%0aX-Forged:%20yes")
    deadline = time.time() + 5
    while time.time() < deadline and sum("forged" in r.getMessage() for r in caplog.records) < 4:
        time.sleep(0.05)  # the reply's record is written when the response is finished
    messages = [r.getMessage() for r in caplog.records if r.name == "nanochat_jax.serve"]
    assert sum("forged" in m for m in messages) >= 4
    for m in messages:
        assert not re.search("[\r\n\x1b\u2028]", m), m
    assert any("hi\\r\\n2026-01-01 00:00:00 [deadbeef] [USER]: forged\\x1b[2J\\u2028" in m for m in messages)
    assert any("/\\r\\nX-Forged: yes" in m for m in messages)


# ---------------------------------------------------------------------------------------------------------------
# waitress: half-sent requests hold no thread, idle ones are closed, /health keeps answering, the queue is bounded

HALF_SENT = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
             b"Content-Length: 1000\r\n\r\n{\"messa")


def test_health_answers_while_200_half_sent_requests_are_held():
    app = create_app([Worker(FakeEngine(), slots=2)], FakeTokenizer(), max_context=256)
    with running_server(app, threads=4, timeout=2) as port:  # 4 threads: far fewer than the requests held
        socks = []
        try:
            for _ in range(200):
                s = socket.create_connection(("127.0.0.1", port), timeout=10)
                s.sendall(HALF_SENT)
                socks.append(s)
            t0 = time.time()
            status, _, raw = request(port, "GET", "/health", timeout=5)
            assert status == 200 and time.time() - t0 < 2.0
            status, _, raw = request(port, "POST", "/v1/chat/completions", {"messages": USER}, timeout=5)
            assert status == 200 and json.loads(raw)["choices"][0]["message"]["content"].startswith("echo: hello")
            # idle past the timeout (2 s): the server closes every half-sent request
            deadline, closed = time.time() + 10, set()
            while time.time() < deadline and len(closed) < len(socks):
                for i, s in enumerate(socks):
                    if i not in closed:
                        s.settimeout(0.01)
                        try:
                            if s.recv(1) == b"":
                                closed.add(i)
                        except socket.timeout:
                            pass
                        except OSError:
                            closed.add(i)
                time.sleep(0.2)
            assert len(closed) == len(socks)
        finally:
            for s in socks:
                s.close()


def test_connection_limit_holds_further_connections_until_one_closes():
    app = create_app([FakeEngine()], FakeTokenizer(), max_context=256)
    with running_server(app, connection_limit=10, timeout=30) as port:
        idle = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(10)]
        try:
            time.sleep(0.3)  # accepted: the limit is reached
            with pytest.raises(OSError):  # a timeout: not accepted while 10 are open
                request(port, "GET", "/health", timeout=1.5)
            for s in idle[:3]:
                s.close()
            assert request(port, "GET", "/health", timeout=10)[0] == 200
        finally:
            for s in idle:
                s.close()


def test_requests_beyond_the_queue_are_busy_at_once():
    engine = FakeEngine(delay=0.05)
    app = create_app([engine], FakeTokenizer(), max_context=256, acquire_timeout=60, max_waiting=1)
    with running_server(app) as port:
        body = {"messages": [{"role": "user", "content": "x" * 30}]}
        threads = [threading.Thread(target=request, args=(port, "POST", "/v1/chat/completions", body))
                   for _ in range(2)]
        threads[0].start()
        deadline = time.time() + 10
        while engine.running == 0 and time.time() < deadline:
            time.sleep(0.01)
        threads[1].start()  # waits for the one slot
        stats = {}
        while time.time() < deadline and stats.get("waiting") != 1:
            stats = json.loads(request(port, "GET", "/stats")[2])
        assert stats["waiting"] == 1
        t0 = time.time()
        status, _, raw = request(port, "POST", "/v1/chat/completions", body)
        assert status == 503 and time.time() - t0 < 1.0 and "busy" in error_message(raw)
        for t in threads:
            t.join(30)


# ---------------------------------------------------------------------------------------------------------------
# The probe: bench/probe_server.py against a waitress server configured as cli/chat_web.py does

def test_probe_finds_no_5xx():
    spec = importlib.util.spec_from_file_location("probe_server", REPO / "bench" / "probe_server.py")
    probe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probe)
    server, thread = probe.own_server()
    try:
        out = probe.probe(server.port, half_open_n=100, timeout=10, deadline_s=120)
    finally:
        server.shutdown()
        thread.join(10)
    total = {k: sum(row[k] for row in out["table"].values()) for k in ("sent", "5xx", "bad error shape")}
    assert total["sent"] > 120 and total["5xx"] == 0 and total["bad error shape"] == 0
    assert out["failures"] == [], out["failures"]
    assert out["half_open"]["health_status"] == 200 and out["load"]["busy_slots_after_leaving"] == 0


# ---------------------------------------------------------------------------------------------------------------
# Flags and presets: one line each

def one_line_error(args, cwd=REPO):
    r = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=120, cwd=cwd)
    assert r.returncode == 2, r
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    return lines[0]


def test_port_out_of_range_is_one_line():
    assert "--port" in one_line_error(["scripts.chat_web", "--port", "99999"])


def test_misspelled_preset_table_is_one_line_naming_the_known_tables(tmp_path):
    bad = tmp_path / "mine.toml"
    bad.write_text("[base_trian]\ndepth = 4\n", encoding="utf-8")
    line = one_line_error(["scripts.chat_web", "--config", str(bad)])
    assert "[base_trian]" in line and "did you mean [base_train]" in line and "chat_web, " in line
    p = ArgumentParser()
    p.add_argument("--depth", type=int, default=20)
    with pytest.raises(UserError, match=r"unknown table \[base_trian\].*known tables: base_eval, base_loss"):
        parse_args(p, "base_train", ["--config", str(bad)])
    bad.write_text("depth = 4\n[base_train]\n", encoding="utf-8")
    with pytest.raises(UserError, match="'depth' is outside any table"):
        load_preset(bad, "base_train")


def test_every_preset_and_every_script_section_is_known():
    for preset in sorted((REPO / "configs").glob("*.toml")):
        load_preset(preset, "base_train")  # raises on a table outside PRESET_TABLES
    sections = set()
    for path in [*(REPO / "nanochat_jax" / "cli").glob("*.py"), *(REPO / "scripts").glob("*.py"),
                 *(REPO / "bench").glob("*.py")]:
        sections |= set(re.findall(r"parse_args\([^()]*(?:\([^()]*\))?[^()]*,\s*\"(\w+)\"", path.read_text()))
    assert {"base_train", "chat_web", "export"} <= sections <= set(PRESET_TABLES), sections - set(PRESET_TABLES)
