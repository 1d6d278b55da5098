"""The chat page in headless Chromium, driven over the Chrome DevTools Protocol (a stdlib websocket client below).

Loads the page from a real server (fake engine, slow enough to see streaming), types with real key events, and checks:
streamed text appears piece by piece, Enter sends and Shift+Enter adds a newline, slash commands, regenerate (click
a reply), edit (click a user message), model text is shown as text (no HTML), /clear, and the server-down banner.
Screenshots go to $NANOCHAT_SCREENSHOTS or a temp dir (printed). Skipped when `chromium` is not installed.
"""

import base64
import json
import os
import shutil
import socket
import struct
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from nanochat_jax.serve.app import create_app
from webfakes import FakeEngine, FakeTokenizer, running_server

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
pytestmark = [pytest.mark.timeout(180),
              pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (apt-get install chromium)")]


# ---------------------------------------------------------------------------------------------------------------
# A minimal websocket client (RFC 6455: client frames masked, text opcode) and CDP on top of it

class WebSocket:
    def __init__(self, url, timeout=30):
        assert url.startswith("ws://")
        hostport, _, path = url[len("ws://"):].partition("/")
        host, _, port = hostport.partition(":")
        self.sock = socket.create_connection((host, int(port)), timeout=timeout)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall((f"GET /{path} HTTP/1.1\r\nHost: {hostport}\r\nUpgrade: websocket\r\n"
                           f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n")
                          .encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = self.sock.recv(1)
            assert chunk, "websocket handshake: connection closed"
            head += chunk
        assert head.startswith(b"HTTP/1.1 101"), head

    def _recv_exact(self, n):
        buf = b""
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            assert chunk, "websocket closed"
            buf += chunk
        return buf

    def send(self, text):
        data = text.encode()
        header = bytes([0x81])  # FIN + text
        n = len(data)
        if n < 126:
            header += bytes([0x80 | n])
        elif n < 1 << 16:
            header += bytes([0x80 | 126]) + struct.pack(">H", n)
        else:
            header += bytes([0x80 | 127]) + struct.pack(">Q", n)
        mask = os.urandom(4)
        self.sock.sendall(header + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(data)))

    def recv(self):
        message = b""
        while True:
            b0, b1 = self._recv_exact(2)
            n = b1 & 0x7F
            if n == 126:
                n = struct.unpack(">H", self._recv_exact(2))[0]
            elif n == 127:
                n = struct.unpack(">Q", self._recv_exact(8))[0]
            payload = self._recv_exact(n)
            opcode = b0 & 0x0F
            if opcode == 0x9:  # ping -> pong
                self.sock.sendall(bytes([0x8A, 0x80 | len(payload)]) + b"\0\0\0\0" + payload)
                continue
            if opcode == 0x8:
                raise ConnectionError("websocket closed by peer")
            message += payload
            if b0 & 0x80:
                return message.decode()

    def close(self):
        self.sock.close()


class Browser:
    """Headless Chromium with one page, driven by CDP commands."""

    def __init__(self, workdir: Path):
        profile = workdir / "profile"
        self.proc = subprocess.Popen(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
             "--no-default-browser-check", "--disable-extensions", "--window-size=1100,800",
             "--remote-debugging-port=0", f"--user-data-dir={profile}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        port_file = profile / "DevToolsActivePort"
        deadline = time.time() + 30
        while not (port_file.exists() and port_file.read_text().strip()) and time.time() < deadline:
            assert self.proc.poll() is None, "chromium exited at start-up"
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        targets = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10).read())
        page = next(t for t in targets if t["type"] == "page")
        self.ws = WebSocket(page["webSocketDebuggerUrl"])
        self.next_id = 0

    def cmd(self, method, **params):
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        for _ in range(10_000):  # skip events until our answer
            msg = json.loads(self.ws.recv())
            if msg.get("id") == self.next_id:
                assert "error" not in msg, msg
                return msg["result"]
        raise AssertionError(f"no answer to {method}")

    def js(self, expr):
        r = self.cmd("Runtime.evaluate", expression=expr, returnByValue=True, awaitPromise=True)
        assert "exceptionDetails" not in r, r
        return r["result"].get("value")

    def wait(self, expr, timeout=15.0):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.js(expr):
                return
            time.sleep(0.05)
        raise AssertionError(f"timed out waiting for: {expr}")

    def type(self, text):
        self.js("document.getElementById('input').focus()")
        self.cmd("Input.insertText", text=text)

    def key_enter(self, shift=False):
        for kind in ("keyDown", "keyUp"):
            self.cmd("Input.dispatchKeyEvent", type=kind, key="Enter", code="Enter", windowsVirtualKeyCode=13,
                     modifiers=8 if shift else 0, **({"text": "\r"} if kind == "keyDown" else {}))

    def click(self, selector):
        box = self.js(f"(() => {{ const r = document.querySelector({json.dumps(selector)}).getBoundingClientRect();"
                      " return [r.x + r.width / 2, r.y + r.height / 2]; })()")
        for kind in ("mousePressed", "mouseReleased"):
            self.cmd("Input.dispatchMouseEvent", type=kind, x=box[0], y=box[1], button="left", clickCount=1)

    def screenshot(self, path: Path):
        path.write_bytes(base64.b64decode(self.cmd("Page.captureScreenshot", format="png")["data"]))
        return path

    def close(self):
        self.ws.close()
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def texts(browser, cls):
    return browser.js(f"[...document.querySelectorAll('#messages .message.{cls}')].map(e => e.textContent)")


# ---------------------------------------------------------------------------------------------------------------

def test_page_in_headless_chromium(tmp_path):
    shots = Path(os.environ.get("NANOCHAT_SCREENSHOTS") or tempfile.mkdtemp(prefix="nanochat_screens_"))
    shots.mkdir(parents=True, exist_ok=True)
    print(f"screenshots in {shots}")
    engine = FakeEngine(delay=0.025)  # ~0.4 s per reply: slow enough to watch it stream
    app = create_app([engine], FakeTokenizer(), max_context=512, temperature=0.0)
    browser = Browser(tmp_path)
    try:
        with running_server(app) as port:
            browser.cmd("Page.enable")
            browser.cmd("Page.navigate", url=f"http://127.0.0.1:{port}/")
            browser.wait("document.readyState === 'complete' && !!document.getElementById('input')")

            # Enter sends; the reply streams in piece by piece
            browser.type("hello there")
            browser.key_enter()
            browser.wait("document.querySelectorAll('#messages .message.assistant').length === 1")
            seen = set()
            deadline = time.time() + 15
            while time.time() < deadline:
                state = browser.js("(() => { const a = document.querySelector('#messages .message.assistant');"
                                   " return [a.textContent, a.classList.contains('streaming')]; })()")
                seen.add(state[0])
                if not state[1] and state[0] == "echo: hello there":
                    break
                time.sleep(0.02)
            assert texts(browser, "user") == ["hello there"]
            assert texts(browser, "assistant") == ["echo: hello there"]
            partial = {s for s in seen if s and s != "echo: hello there"}
            assert len(partial) >= 2 and all("echo: hello there".startswith(s) for s in partial), seen
            assert browser.js("document.getElementById('input').value") == ""
            browser.screenshot(shots / "1_streamed.png")

            # Shift+Enter adds a newline and sends nothing
            browser.type("line one")
            browser.key_enter(shift=True)
            browser.cmd("Input.insertText", text="line two")
            assert browser.js("document.getElementById('input').value") == "line one\nline two"
            assert len(texts(browser, "user")) == 1
            browser.key_enter()
            browser.wait("[...document.querySelectorAll('#messages .message.assistant')]"
                         ".map(e => e.textContent).includes('echo: line one\\nline two')")

            # /temperature reaches the server; clicking a reply regenerates it with the new setting
            browser.type("/temperature 0.5")
            browser.key_enter()
            assert "temperature set to 0.5" in texts(browser, "note")[-1]
            browser.click("#messages .message.assistant[data-index='3']")
            browser.wait("!document.querySelector('.streaming') && document.querySelectorAll("
                         "'#messages .message.assistant').length === 2 && document.querySelector("
                         "'#messages .message.assistant[data-index=\"3\"]').textContent.includes('(t=0.5)')")
            assert texts(browser, "assistant")[-1] == "echo: line one\nline two (t=0.5)"
            assert engine.calls[-1]["temperature"] == 0.5 and len(engine.calls) == 3

            # clicking a user message puts it back in the composer, dropping it and what follows
            browser.click("#messages .message.user[data-index='2']")
            assert browser.js("document.getElementById('input').value") == "line one\nline two"
            assert texts(browser, "user") == ["hello there"] and len(texts(browser, "assistant")) == 1
            browser.js("document.getElementById('input').value = ''")
            browser.type("edited question")
            browser.key_enter()
            browser.wait("!document.querySelector('.streaming') && document.querySelectorAll("
                         "'#messages .message.assistant').length === 2")
            assert texts(browser, "assistant")[-1] == "echo: edited question (t=0.5)"
            prompt = FakeTokenizer().decode(engine.calls[-1]["tokens"])
            assert "edited question" in prompt and "line one" not in prompt

            # model text is text: markup in a reply is not turned into elements
            evil = "<img src=x onerror=\"document.title='pwned'\"><b>bold</b>"
            browser.type(evil)
            browser.key_enter()
            browser.wait("!document.querySelector('.streaming') && document.querySelectorAll("
                         "'#messages .message.assistant').length === 3")
            assert texts(browser, "assistant")[-1] == "echo: " + evil + " (t=0.5)"
            assert browser.js("document.querySelectorAll('#messages img, #messages b').length") == 0
            assert browser.js("document.title") != "pwned"

            browser.type("/help")
            browser.key_enter()
            assert "/temperature" in texts(browser, "note")[-1] and "/topk" in texts(browser, "note")[-1]
            browser.type("/topk 500")
            browser.key_enter()
            assert "usage" in browser.js("document.querySelector('#messages .message.error:last-child').textContent")
            browser.screenshot(shots / "2_conversation.png")

            # Stop mid-reply: the fetch is aborted, the server sees the client leave and frees the engine
            before = engine.closed_early
            browser.type("a long question " * 6)
            browser.key_enter()
            browser.wait("(document.querySelector('.streaming') || {textContent: ''}).textContent.length > 12")
            browser.click("#stop")
            browser.wait("!document.querySelector('.streaming')")
            deadline = time.time() + 10
            while engine.closed_early == before and time.time() < deadline:
                time.sleep(0.05)
            assert engine.closed_early == before + 1 and engine.running == 0
            partial = texts(browser, "assistant")[-1]
            assert partial.startswith("echo: a long") and len(partial) < len("echo: " + "a long question " * 6)

            # /clear empties the conversation
            browser.type("/clear")
            browser.key_enter()
            assert browser.js("document.querySelectorAll('#messages .message').length") == 0
            browser.type("fresh start")
            browser.key_enter()
            browser.wait("!document.querySelector('.streaming') && document.querySelectorAll("
                         "'#messages .message.assistant').length === 1")
            assert len(engine.calls[-1]["tokens"]) < 40  # the old turns were not sent again
            assert not browser.js("document.getElementById('banner').classList.contains('show')")
        # the server is gone: the banner appears (the page polls /health every 3 s)
        browser.wait("document.getElementById('banner').classList.contains('show')", timeout=10)
        browser.screenshot(shots / "3_server_down.png")
    finally:
        browser.close()
    assert engine.running == 0
