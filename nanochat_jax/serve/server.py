"""The HTTP server: waitress (a production WSGI server, pure Python) with connection limits and timeouts.

waitress reads each request completely on its event loop before a worker thread sees it, so slow or half-sent
requests hold a connection (at most `connection_limit`, each closed after `timeout` idle seconds), never a thread;
the `threads` run the app. Errors waitress answers itself (a malformed request line, a header block or body past
its limit) are JSON in OpenAI's shape too.

    server = serve(app, "127.0.0.1", 8000, threads=20)
    server.serve_forever()            # until server.shutdown() from another thread (or Ctrl+C)
"""

from __future__ import annotations

import json
import threading

from waitress import wasyncore
from waitress.channel import HTTPChannel
from waitress.server import create_server
from waitress.task import ErrorTask

from nanochat_jax.serve.protocol import MAX_BODY_BYTES, error_body

MAX_HEADER_BYTES = 64 * 1024      # the request line and headers; no client of this API sends more
# waitress's own body limit (it buffers a body before the app sees it): above the app's MAX_BODY_BYTES, so that a
# body somewhat too large gets the app's 413 message; a far larger one is cut off by waitress
WAITRESS_BODY_BYTES = 2 * MAX_BODY_BYTES
PROXY_HEADERS = {"x-forwarded-for", "x-forwarded-host", "x-forwarded-proto", "x-forwarded-port"}
QUEUE_PER_SLOT = 4  # requests that may wait for each generation slot; more are answered "busy" (503) at once
SPARE_THREADS = 4   # threads beyond those generating or waiting for a slot: /health and the page never queue


def threads_for(slots: int, queue: int) -> int:
    """Server threads for `slots` generating requests and `queue` waiting ones (each holds a thread), and spares."""
    return slots + queue + SPARE_THREADS


class _JSONErrorTask(ErrorTask):
    """waitress's answer to a request it could not parse, as an OpenAI-shaped JSON error instead of plain text."""

    def execute(self):
        e = self.request.error
        body = json.dumps(error_body(f"{e.reason}: {e.body}", e.code)).encode("utf-8")
        self.status = f"{e.code} {e.reason}"
        self.response_headers.append(("Content-Type", "application/json"))
        self.set_close_on_finish()
        self.content_length = len(body)
        self.write(body)


class _Channel(HTTPChannel):
    error_task_class = _JSONErrorTask


class Server:
    """A waitress server for `app`; `port` is the one bound (pass 0 for a free one)."""

    def __init__(self, app, host: str, port: int, *, threads: int = 16, connection_limit: int = 500,
                 timeout: int = 60, trusted_proxy: str | None = None):
        self._map: dict = {}
        proxy = dict(trusted_proxy=trusted_proxy, trusted_proxy_headers=PROXY_HEADERS) if trusted_proxy else {}
        self.server = create_server(
            app, map=self._map, host=host, port=port, threads=threads, connection_limit=connection_limit,
            channel_timeout=timeout, cleanup_interval=max(1, min(30, timeout // 2)),
            max_request_header_size=MAX_HEADER_BYTES, max_request_body_size=WAITRESS_BODY_BYTES,
            asyncore_use_poll=True,  # select() cannot watch more than 1024 sockets
            expose_tracebacks=False, ident="waitress", **proxy)
        self.server.channel_class = _Channel  # waitress makes each connection's channel from this attribute
        self.port = self.server.effective_port
        self._stop = threading.Event()
        self._stopped = threading.Event()
        self._lock = threading.Lock()  # orders shutdown()'s wake-up call against the trigger being closed
        self._closing = False

    def serve_forever(self):
        """Run the event loop in this thread until `shutdown()`; then close every connection."""
        try:
            while not self._stop.is_set() and self._map:
                wasyncore.loop(timeout=1.0, map=self._map, use_poll=True, count=1)
        finally:
            self._close()
            self._stopped.set()

    def shutdown(self, timeout: float = 10.0):
        """Stop `serve_forever` (from another thread) and wait for it to finish."""
        with self._lock:
            self._stop.set()
            if not self._closing:
                self.server.pull_trigger()  # wake the event loop
        self._stopped.wait(timeout)

    def _close(self):
        """Stop listening and drop every connection (a thread still streaming to one stops at its next write), let
        the threads finish, and only then close the trigger they wake the event loop with (its descriptors would
        otherwise be reused while a thread may still write to them)."""
        with self._lock:
            self._closing = True
        trigger = self.server.trigger
        wasyncore.dispatcher.close(self.server)  # the listening socket (the server's own close() shuts the trigger)
        for channel in list(self._map.values()):
            if channel is not trigger and channel is not self.server:
                channel.handle_close()
        self.server.task_dispatcher.shutdown(timeout=5)
        trigger.close()


def serve(app, host: str, port: int, **kw) -> Server:
    """A `Server` for `app` on host:port (keyword arguments: threads, connection_limit, timeout, trusted_proxy);
    call .serve_forever() on it."""
    return Server(app, host, port, **kw)
