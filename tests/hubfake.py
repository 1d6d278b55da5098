"""A Hugging Face Hub on 127.0.0.1 for the download tests (point HF_ENDPOINT at `hub.url`).

It answers HEAD and GET on the Hub's file addresses, `/datasets/<repo>/resolve/<revision>/<path>` (and `/<repo>/resolve/
<revision>/<path>` for models), with the headers huggingface_hub reads: X-Repo-Commit, ETag (the sha256 of the
file), Content-Length, and `X-Error-Code: EntryNotFound` on a 404; Range requests get a 206. The same files are also
served at their bare path (`/<path>`), as a plain mirror. `plans[path]` lists misbehaviours, one per request, used up
in order: "500" and "404" answer the next request (HEAD or GET), "cut" (half the bytes, then the connection drops)
and "corrupt" (the right size, unreadable content) the next GET. Every request is recorded in `requests` as
(method, path, Range header, Authorization header).
"""

from __future__ import annotations

import hashlib
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

COMMIT = "0123456789abcdef0123456789abcdef01234567"
_HUB_PATH = re.compile(r"/(?:datasets/)?([^/]+/[^/]+)/resolve/[^/]+/(.+)")


class FakeHub:
    """`files` maps a file's path in its repo (e.g. "shard_00000.parquet": served for any repo) or "<repo>/<path>"
    (e.g. "openai/gsm8k/main/train-00000-of-00001.parquet": that repo only) to its bytes; `generate(path)` may make
    up the bytes of paths not in `files` (None: 404). `plans` are keyed the same way."""

    def __init__(self, files: dict[str, bytes] | None = None, generate: Callable[[str], bytes | None] | None = None):
        self.files = dict(files or {})
        self.generate = generate
        self.plans: dict[str, list[str]] = {}
        self.requests: list[tuple] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_HEAD(self):
                hub._answer(self, head=True)

            def do_GET(self):
                hub._answer(self, head=False)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def body(self, path: str) -> bytes | None:
        if path in self.files:
            return self.files[path]
        return self.generate(path) if self.generate else None

    def paths_requested(self, method: str = "GET") -> list[str]:
        return [path for m, path, *_ in self.requests if m == method]

    def _answer(self, h: BaseHTTPRequestHandler, head: bool):
        self.requests.append(("HEAD" if head else "GET", h.path, h.headers.get("Range"),
                              h.headers.get("Authorization")))
        m = _HUB_PATH.fullmatch(h.path)
        path = h.path.lstrip("/")
        if m:  # a file of one repo ("<repo>/<path>" in `files`), else any repo's `path`
            path = f"{m.group(1)}/{m.group(2)}" if f"{m.group(1)}/{m.group(2)}" in self.files else m.group(2)
        plan = self.plans.get(path, [])
        action = "ok"
        if plan and (not head or plan[0] in ("500", "404")):
            action = plan.pop(0)
        body = self.body(path)
        if action == "404" or body is None:
            h.send_response(404)
            h.send_header("X-Error-Code", "EntryNotFound")
            h.send_header("X-Repo-Commit", COMMIT)
            h.send_header("Content-Length", "0")
            h.end_headers()
            return
        if action == "500":
            h.send_response(500)
            h.send_header("Content-Length", "0")
            h.end_headers()
            return
        etag = hashlib.sha256(body).hexdigest()
        if action == "corrupt":
            body = b"PAR1" + bytes(len(body) - 8) + b"PAR1"
        start = 0
        rng = h.headers.get("Range")
        if rng and not head:
            start = int(rng.split("=")[1].split("-")[0])
            h.send_response(206)
            h.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            h.send_response(200)
        h.send_header("Content-Length", str(len(body) - start))
        h.send_header("ETag", f'"{etag}"')
        h.send_header("X-Repo-Commit", COMMIT)
        h.send_header("Accept-Ranges", "bytes")
        h.end_headers()
        if head:
            return
        if action == "cut":
            h.wfile.write(body[start:start + (len(body) - start) // 2])
            h.wfile.flush()
            h.close_connection = True
            return
        h.wfile.write(body[start:])

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()
