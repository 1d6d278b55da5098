"""Hostile-request probe of the chat server: malformed, mistyped, oversized, deeply nested, forged and slow requests
against a server on 127.0.0.1 (never anything else), and a table of the status codes they got, by category.
Goal: 0 5xx, every error body in OpenAI's shape, an answer to everything that was sent whole, and /health answering
while hundreds of half-sent requests are held.

    python bench/probe_server.py                    # its own server (waitress, an echo engine: no model, no JAX)
    python bench/probe_server.py --port 8000        # a running one: python -m scripts.chat_web --host 127.0.0.1
    python bench/probe_server.py --half-open 300    # half-sent requests held while /health is timed (default 300)

Bounded: each request waits at most --request-timeout s (2 s for the "slow" ones, which the server rightly waits
on: they never finish sending), and the probe stops starting new ones after --deadline s.
"""

from __future__ import annotations

import argparse
import collections
import json
import socket
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

HOST = "127.0.0.1"
USER = [{"role": "user", "content": "hello"}]


# ---------------------------------------------------------------------------------------------------------------
# Raw HTTP: every request is bytes on a fresh connection, so malformed ones can be sent too

def http(port: int, data: bytes, timeout: float) -> tuple[int | None, bytes]:
    """Send `data`, read until the server closes; (status, body), status None when no answer came."""
    out = b""
    try:
        with socket.create_connection((HOST, port), timeout=timeout) as s:
            try:
                s.sendall(data)
            except OSError:
                pass  # the server may answer (413, 431) and close before reading everything
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                out += chunk
    except OSError:
        pass  # timeout or reset: keep what arrived
    head, _, body = out.partition(b"\r\n\r\n")
    while head.split(b" ", 2)[1:2] == [b"100"]:  # an interim "100 Continue": the answer follows
        head, _, body = body.partition(b"\r\n\r\n")
    parts = head.split(b" ", 2)
    status = int(parts[1]) if len(parts) >= 2 and parts[1].isdigit() else None
    if b"transfer-encoding: chunked" in head.lower():
        body = _dechunk(body)
    return status, body


def _dechunk(body: bytes) -> bytes:
    out = b""
    while body:
        size, _, rest = body.partition(b"\r\n")
        try:
            n = int(size.split(b";")[0], 16)
        except ValueError:
            break
        if n == 0:
            break
        out, body = out + rest[:n], rest[n + 2:]
    return out


def request_bytes(method: str, path: str, body: bytes | None = None, ctype: str | None = "application/json",
                  extra: str = "") -> bytes:
    head = f"{method} {path} HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n{extra}"
    if body is not None:
        head += (f"Content-Type: {ctype}\r\n" if ctype else "") + f"Content-Length: {len(body)}\r\n"
    return head.encode("latin-1") + b"\r\n" + (body or b"")


def post(path: str, body, **kw) -> bytes:
    data = body if isinstance(body, bytes) else json.dumps(body, ensure_ascii=False).encode("utf-8", "surrogatepass")
    return request_bytes("POST", path, data, **kw)


# ---------------------------------------------------------------------------------------------------------------
# The cases: (category, name, request bytes)

CHAT, V1CHAT, V1COMP = "/chat/completions", "/v1/chat/completions", "/v1/completions"


def json_cases():
    deep_array = b"[" * 100_000 + b"]" * 100_000
    deep_content = b'{"messages": [{"role": "user", "content": ' + b"[" * 50_000 + b"]" * 50_000 + b"}]}"
    digits = b"9" * 5000
    bodies = {
        "100k-deep JSON": deep_array, "100k-deep objects": b'{"a":' * 100_000 + b"1" + b"}" * 100_000,
        "50k-deep content": deep_content,
        "5000-digit max_tokens": b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": ' + digits + b"}",
        "5000-digit seed": b'{"messages": [{"role": "user", "content": "hi"}], "seed": -' + digits + b"}",
        "5000-digit body": digits, "1e999 temperature": b'{"messages": [], "temperature": 1e999}',
        "NaN temperature": b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}',
        "Infinity top_p": b'{"messages": [{"role": "user", "content": "hi"}], "top_p": Infinity}',
        "truncated": b'{"messages": [{"role": "user"', "empty": b"", "trailing garbage": b'{"messages": []} xx',
        "BOM": b'\xef\xbb\xbf{"messages": [{"role": "user", "content": "hi"}]}',
        "UTF-16": '{"messages": []}'.encode("utf-16"),
        "bad UTF-8": b'{"messages": [{"role": "user", "content": "\xff"}]}',
        "null": b"null", "array": b"[]", "string": b'"x"', "number": b"1",
        "comment": b'{"messages": [] /* c */}', "100k-char key": b'{"' + b"k" * 100_000 + b'": 1}',
        "10k keys": json.dumps({f"k{i}": i for i in range(10_000)}).encode(),
        "lone surrogate": b'{"messages": [{"role": "user", "content": "a\\ud800b"}]}',
    }
    out = [("json", name, post(V1CHAT, body)) for name, body in bodies.items()]
    for path in (CHAT, V1COMP):  # the nesting and the long numbers on the other routes too
        out += [("json", f"{name} on {path}", post(path, bodies[name])) for name in
                ("100k-deep JSON", "50k-deep content", "5000-digit max_tokens", "5000-digit body")]
    return out


def field_cases(model: str):
    bad = {
        "temperature": ["hot", [], {}, True, -1, 3], "top_k": [1.5, -1, 1000, "5"], "top_p": [0, 2, "x"],
        "max_tokens": [0, -1, 10**9, 1.5], "seed": [-1, 2**63, "x"], "n": [0, 5, 1.5, "2"],
        "stop": [["a"] * 5, [1], "", ["x" * 1000], {}], "stream": ["yes", 1],
        "stream_options": [{"include_usage": True}], "logprobs": ["yes"], "top_logprobs": [21],
        "model": ["gpt-4o", 123], "tools": [[{"type": "function"}]], "tool_choice": ["auto"],
        "functions": [[{"name": "f"}]], "response_format": [{"type": "json_object"}], "temprature": [0.5],
        "frequency_penalty": [1], "logit_bias": [{"1": 5}], "user": [5], "max_completion_tokens": [0],
    }
    out = [("fields", f"{k}={json.dumps(v)[:30]}", post(V1CHAT, {"model": model, "messages": USER, k: v}))
           for k, vs in bad.items() for v in vs]
    out.append(("fields", "nanochat route: unknown field", post(CHAT, {"messages": USER, "n": 2})))
    return out


def message_cases():
    msgs = [
        "x", [], [1], [{"content": "hi"}], [{"role": "tool", "content": "hi"}], [{"role": "user", "content": None}],
        [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
        [{"role": "user", "content": "hi", "name": "n"}], [{"role": "user", "content": ""}],
        [{"role": "user", "content": "x" * 8001}], [{"role": "user", "content": "x" * 8000}] * 5,
        [{"role": "user", "content": "hi"}] * 501, [{"role": "assistant", "content": "hi"}],
    ]
    out = [("messages", f"messages={json.dumps(m)[:30]}", post(V1CHAT, {"messages": m})) for m in msgs]
    out.append(("messages", "system on nanochat route", post(CHAT, {"messages": [{"role": "system", "content": "s"},
                                                                                  *USER]})))
    return out


def completion_cases():
    prompts = [None, [], 5, ["a", 5], [[[1]]], ["a"] * 17, [1, 10**6], [-1], [10**30], [True], [5] * 100_000,
               "x" * 40_000]
    out = [("completions", f"prompt={json.dumps(p)[:30]}", post(V1COMP, {"prompt": p})) for p in prompts]
    out += [("completions", name, post(V1COMP, {"prompt": "a", **extra})) for name, extra in (
        ("max_tokens 0 without echo", {"max_tokens": 0}), ("suffix", {"suffix": "b"}), ("best_of 2", {"best_of": 2}),
        ("logprobs 6", {"logprobs": 6}), ("echo string", {"echo": "yes"}))]
    return out


def content_cases(model: str):
    """Odd but valid text: answered 200, and written to the log escaped."""
    texts = {"CR/LF forged log line": "hi\r\n2026-01-01 00:00:00 [deadbeef] [USER]: forged", "ANSI escapes":
             "\x1b[2J\x1b[31mred", "bidi override": "abc\u202edcba", "special-token text": "<|assistant_end|><|bos|>",
             "NUL": "a\x00b", "emoji and combining": "e\u0301 \U0001F600", "line separator": "a\u2028b",
             "8000 chars": "\u00e9" * 8000}
    out = [("content", name, post(V1CHAT, {"model": model, "messages": [{"role": "user", "content": t}],
                                           "max_tokens": 4})) for name, t in texts.items()]
    out.append(("content", "forged log line on nanochat route", post(CHAT, {"messages": [
        {"role": "user", "content": texts["CR/LF forged log line"]}], "max_tokens": 4})))
    return out


def http_cases():
    body = json.dumps({"messages": USER, "max_tokens": 2}).encode()
    raw = {
        "GET on a POST route": request_bytes("GET", V1CHAT), "PUT": request_bytes("PUT", V1CHAT, body),
        "DELETE": request_bytes("DELETE", "/"), "OPTIONS": request_bytes("OPTIONS", V1CHAT),
        "HEAD /": request_bytes("HEAD", "/"), "unknown path": request_bytes("GET", "/admin"),
        "path traversal": request_bytes("GET", "/../../etc/passwd"), "encoded CR/LF in path":
        request_bytes("GET", "/%0d%0aX-Forged:%20yes"), "NUL in path": request_bytes("GET", "/%00"),
        "100 KB URL": request_bytes("GET", "/" + "a" * 100_000), "1000 headers": request_bytes(
            "GET", "/health", extra="".join(f"X-H{i}: v\r\n" for i in range(1000))),
        "70 KB header": request_bytes("GET", "/health", extra="X-Big: " + "a" * 70_000 + "\r\n"),
        "text/plain": request_bytes("POST", V1CHAT, body, "text/plain"), "no Content-Type":
        request_bytes("POST", V1CHAT, body, None), "form": request_bytes("POST", CHAT, body,
                                                                          "application/x-www-form-urlencoded"),
        "latin-1 charset": request_bytes("POST", V1CHAT, body, "application/json; charset=latin-1"),
        "2 MB body": post(V1CHAT, {"messages": [{"role": "user", "content": "z" * 2_000_000}]}),
        "10 MB Content-Length": b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 10000000\r\n\r\n",
        "negative Content-Length": b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n",
        "Content-Length not a number": b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: ab\r\n\r\n",
        "Content-Length and chunked": b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n"
                                      b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        "bad chunk size": b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n\r\n",
        "garbage request line": b"GARBAGE\r\n\r\n", "HTTP/0.9": b"GET /\r\n\r\n",
        "HTTP/9.9": b"GET / HTTP/9.9\r\nHost: x\r\n\r\n",
        "no Host": b"GET /health HTTP/1.1\r\nConnection: close\r\n\r\n",
        "Expect: 100-continue": request_bytes("POST", V1CHAT, body, extra="Expect: 100-continue\r\n"),
    }
    return [("http", name, data) for name, data in raw.items()]


def slow_cases():
    """Requests that never finish sending: the server waits for the rest (until its idle timeout), answering none."""
    return [("slow", "Content-Length longer than the body", b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n"
             b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"prompt\""),
            ("slow", "headers never end", b"GET /health HTTP/1.1\r\nHost: x\r\n"),
            ("slow", "chunked body never ends", b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n"
             b"Transfer-Encoding: chunked\r\n\r\n5\r\nabcde\r\n")]


# ---------------------------------------------------------------------------------------------------------------
# Running them

def openai_shaped(body: bytes) -> bool:
    try:
        err = json.loads(body)["error"]
        return set(err) == {"message", "type", "param", "code"} and isinstance(err["message"], str)
    except (ValueError, KeyError, TypeError):
        return False


def run_cases(port: int, cases, timeout: float, deadline: float, verbose: bool = False) -> dict:
    """{"table": {category: Counter of "sent", "2xx", "4xx", "5xx", "no answer", "bad error shape"}, "failures":
    [what went wrong: a 5xx, no answer outside "slow", an error body not in OpenAI's shape]}."""
    table, failures = collections.defaultdict(collections.Counter), []
    for category, name, data in cases:
        if time.time() > deadline:
            break
        status, body = http(port, data, 2.0 if category == "slow" else timeout)
        if verbose:
            print(f"{category:<12} {name[:40]:<40} {status} {body[:100]!r}")
        row = table[category]
        row["sent"] += 1
        if status is None:
            row["no answer"] += 1
            kind = "no answer"
        else:
            kind = f"{status // 100}xx"
            row[kind] += 1
            if status >= 400 and not openai_shaped(body):
                row["bad error shape"] += 1
                failures.append(f"{category}/{name}: {status} not in OpenAI's shape: {body[:80]!r}")
        if kind == "5xx" or (kind == "no answer" and category != "slow"):
            failures.append(f"{category}/{name}: {kind} {body[:120]!r}")
    return {"table": table, "failures": failures}


def load_and_disconnects(port: int, model: str, n_streams: int, n_leave: int, timeout: float) -> dict:
    """n_streams concurrent streamed requests (their status codes), then n_leave clients that leave mid-stream;
    afterwards no slot may stay busy."""
    codes = collections.Counter()
    data = post(V1CHAT, {"model": model, "messages": USER, "stream": True, "max_tokens": 16})

    def one():  # 503: busy (more requests than slots and queue), an answer by design
        status = http(port, data, timeout)[0]
        codes["no answer" if status is None else "503 busy" if status == 503 else f"{status // 100}xx"] += 1
    threads = [threading.Thread(target=one) for _ in range(n_streams)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout + 5)
    for _ in range(n_leave):
        with socket.create_connection((HOST, port), timeout=timeout) as s:
            s.sendall(post(V1CHAT, {"model": model, "messages": USER, "stream": True, "max_tokens": 2000}))
            s.recv(100)  # the stream started; leave
    busy, t0 = None, time.time()
    while time.time() - t0 < timeout:
        busy = json.loads(http(port, request_bytes("GET", "/stats"), timeout)[1])["busy_slots"]
        if busy == 0:
            break
        time.sleep(0.1)
    return {"streams": dict(codes), "busy_slots_after_leaving": busy}


def half_open(port: int, n: int, timeout: float) -> dict:
    """Hold n half-sent requests open, then time GET /health and one chat request; close them."""
    socks = []
    try:
        for _ in range(n):
            s = socket.create_connection((HOST, port), timeout=timeout)
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: 1000\r\n\r\n{\"messa")
            socks.append(s)
        t0 = time.time()
        status, _ = http(port, request_bytes("GET", "/health"), timeout)
        health_s = time.time() - t0
        chat_status, _ = http(port, post(CHAT, {"messages": USER, "max_tokens": 4}), timeout)
    finally:
        for s in socks:
            s.close()
    out = {"held": len(socks), "health_status": status, "health_seconds": round(health_s, 3),
           "chat_status": chat_status}
    return out


def probe(port: int, half_open_n: int = 300, timeout: float = 10.0, deadline_s: float = 180.0,
          verbose: bool = False) -> dict:
    """Every probe against 127.0.0.1:port; a dict of the results (see main for the table)."""
    deadline = time.time() + deadline_s
    model = json.loads(http(port, request_bytes("GET", "/v1/models"), timeout)[1])["data"][0]["id"]
    cases = (json_cases() + field_cases(model) + message_cases() + completion_cases() + content_cases(model)
             + http_cases() + slow_cases())
    out = run_cases(port, cases, timeout, deadline, verbose)
    out["load"] = load_and_disconnects(port, model, 32, 10, timeout)
    if set(out["load"]["streams"]) - {"2xx", "503 busy"} or out["load"]["busy_slots_after_leaving"] != 0:
        out["failures"].append(f"load: {out['load']}")
    out["half_open"] = half_open(port, half_open_n, timeout)
    ho = out["half_open"]
    if ho["health_status"] != 200 or ho["chat_status"] != 200 or ho["health_seconds"] > 2.0:
        out["failures"].append(f"half-open: {ho}")
    out["health_after"] = http(port, request_bytes("GET", "/health"), timeout)[0]
    return out


# ---------------------------------------------------------------------------------------------------------------
# A server of its own: waitress, as nanochat_jax/cli/chat_web.py serves, with an engine that echoes (no model, no JAX)

class EchoEngine:
    """engine.Engine's stream/score interface: replies "echo: <the prompt's text>" one token per byte."""

    def __init__(self, tokenizer, delay: float = 0.002):
        self.tokenizer, self.delay = tokenizer, delay

    def stream(self, tokens, max_tokens=64, **kw):
        text = self.tokenizer.decode([t for t in tokens if t < 256])[-200:]
        for b in ("echo: " + text).encode("utf-8")[:max_tokens]:
            time.sleep(self.delay)
            yield b, bytes([b]).decode("latin-1")

    def score(self, tokens, start=1, top=0):
        import numpy as np
        n = len(tokens) - start
        return np.zeros(n, np.float32), np.zeros((n, top), np.int32), np.zeros((n, top), np.float32)


def own_server(slots: int = 4, connection_limit: int = 1000):
    """(server, thread) of an echo server on a free port of 127.0.0.1, configured as cli/chat_web.py does."""
    from nanochat_jax.data.tokenizer import Tokenizer
    from nanochat_jax.serve.app import create_app
    from nanochat_jax.serve.pool import Worker
    from nanochat_jax.serve.server import QUEUE_PER_SLOT, serve, threads_for
    tok = Tokenizer({bytes([i]): i for i in range(256)})
    queue = QUEUE_PER_SLOT * slots
    app = create_app([Worker(EchoEngine(tok), slots=slots)], tok, max_context=2048, model_name="probe-echo",
                     acquire_timeout=30, max_waiting=queue)
    server = serve(app, HOST, 0, threads=threads_for(slots, queue), connection_limit=connection_limit, timeout=60)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    return server, thread


def print_report(out: dict):
    cols = ["sent", "2xx", "4xx", "5xx", "no answer", "bad error shape"]
    print(f"{'category':<12}" + "".join(f"{c:>17}" for c in cols))
    total = collections.Counter()
    for category, row in out["table"].items():
        total.update(row)
        print(f"{category:<12}" + "".join(f"{row[c]:>17}" for c in cols))
    print(f"{'total':<12}" + "".join(f"{total[c]:>17}" for c in cols))
    print("('no answer' is expected only for 'slow': requests that never finish sending)")
    load, ho = out["load"], out["half_open"]
    print(f"32 concurrent streams: {load['streams']}; busy slots after 10 clients left mid-stream: "
          f"{load['busy_slots_after_leaving']}")
    print(f"{ho['held']} half-sent requests held: /health {ho['health_status']} in {ho['health_seconds']} s, "
          f"a chat request {ho['chat_status']}; /health afterwards: {out['health_after']}")
    for f in out["failures"]:
        print("FAIL", f)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--port", type=int, default=None, help="probe 127.0.0.1:PORT (default: start an echo server)")
    p.add_argument("--half-open", type=int, default=300, help="half-sent requests held while /health is timed")
    p.add_argument("--request-timeout", type=float, default=10.0)
    p.add_argument("--deadline", type=float, default=180.0, help="stop starting new requests after this many s")
    p.add_argument("--verbose", action="store_true", help="print every case's status and the start of its body")
    args = p.parse_args(argv)
    server = None
    if args.port is None:
        server, _ = own_server()
        args.port = server.port
    try:
        out = probe(args.port, args.half_open, args.request_timeout, args.deadline, args.verbose)
    finally:
        if server is not None:
            server.shutdown()
    print_report(out)
    return 1 if out["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
