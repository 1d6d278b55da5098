"""Hostile programs against nanochat_jax/infer/execution.py's sandbox: each is blocked or contained by the kernel.

The programs use ctypes to call libc directly, so the Python-level guards (disabled os functions, the socket block)
do not stop them; what stops them is the isolation: bubblewrap's namespaces, the read-only mounts, the private
size-limited /tmp and the rlimits.
"""

import errno
import os
import signal
import socket
import tempfile
import time
import uuid

import pytest

from nanochat_jax.infer.execution import execute_code, sandbox_problem

pytestmark = pytest.mark.skipif(sandbox_problem() is not None, reason=str(sandbox_problem()))

LIBC = "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"


def _processes_with(marker: str) -> list[int]:
    """Host pids whose command line holds `marker`."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if marker.encode() in f.read():
                    found.append(int(pid))
        except OSError:
            pass
    return found


def _gone_soon(marker: str, within: float = 5.0) -> bool:
    """Whether every process holding `marker` has exited within `within` s (killing leftovers, so none stays)."""
    deadline = time.monotonic() + within
    while _processes_with(marker) and time.monotonic() < deadline:
        time.sleep(0.05)
    left = _processes_with(marker)
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    return not left


@pytest.mark.parametrize("path", ["/etc/passwd", "/etc/shadow", "/root/.bashrc", "/proc/1/environ"])
def test_host_files_cannot_be_read(path):
    r = execute_code(f"print(open({path!r}).read())")
    assert not r.success and r.stdout == ""
    assert r.error.startswith(("FileNotFoundError", "PermissionError")), r.error


def test_a_file_the_host_wrote_cannot_be_read(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("hunter2")
    r = execute_code(f"import os\nprint(os.listdir({str(tmp_path)!r}))\nprint(open({str(secret)!r}).read())")
    assert not r.success and "hunter2" not in r.stdout and "secret.txt" not in r.stdout


def test_runs_as_an_unprivileged_user():
    r = execute_code("import os\nprint(os.getuid(), os.geteuid(), os.getgid())")
    assert r.success and r.stdout.split() == ["65534", "65534", "65534"]


def test_host_unix_socket_cannot_be_reached_by_path():
    d = tempfile.mkdtemp(prefix="sbx_", dir="/tmp")  # short: a socket path holds at most 107 bytes
    path = os.path.join(d, "host.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        server.bind(path)
        server.listen(1)
        server.setblocking(False)
        code = LIBC + ("import struct\n"
                       "fd = libc.socket(1, 1, 0)  # AF_UNIX, SOCK_STREAM\n"
                       f"addr = struct.pack('H108s', 1, {path.encode()!r})\n"
                       "rc = libc.connect(fd, addr, len(addr))\n"
                       "print(fd, rc, ctypes.get_errno())")
        r = execute_code(code)
        with pytest.raises(BlockingIOError):
            server.accept()  # nobody connected
        fd, rc, _ = r.stdout.split()
        assert rc == "-1", r.stdout
    finally:
        server.close()
        os.unlink(path)
        os.rmdir(d)


def test_tcp_to_the_host_is_unreachable():
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.setblocking(False)
    port = server.getsockname()[1]
    code = LIBC + ("import struct\n"
                   "fd = libc.socket(2, 1, 0)  # AF_INET, SOCK_STREAM\n"
                   f"addr = struct.pack('!HH4s8x', 0, {port}, bytes([127, 0, 0, 1]))\n"
                   "addr = struct.pack('H', 2) + addr[2:]  # sa_family in host order\n"
                   "print(libc.connect(fd, addr, len(addr)))")
    try:
        r = execute_code(code)
        assert r.stdout.strip() == "-1", r.stdout + r.stderr
        with pytest.raises(BlockingIOError):
            server.accept()
    finally:
        server.close()


def test_only_a_loopback_interface_that_is_down():
    r = execute_code("import socket\nprint(sorted(n for _, n in socket.if_nameindex()))")
    assert r.success and r.stdout.strip() == "['lo']"


@pytest.mark.parametrize("parent", ["print('started', flush=True)\nimport time\ntime.sleep(30)",  # killed at timeout
                                    "print('started', flush=True)"])                              # exits at once
def test_a_forked_setsid_child_dies_with_the_sandbox(parent):
    marker = f"nanochat-sandbox-probe-{uuid.uuid4().hex}"
    sleeper = "import os, time\nos.write(int(os.environ['W']), b'1')\ntime.sleep(30)"
    code = LIBC + ("import os, sys\n"
                   "r, w = os.pipe()\n"
                   "os.set_inheritable(w, True)\n"
                   "os.environ['W'] = str(w)\n"
                   "if libc.fork() == 0:\n"
                   "    libc.setsid()\n"
                   f"    argv = [sys.executable.encode(), b'-c', {sleeper.encode()!r}, {marker.encode()!r}, None]\n"
                   "    libc.execv(argv[0], (ctypes.c_char_p * 5)(*argv))\n"
                   "    libc._exit(1)\n"
                   "assert os.read(r, 1) == b'1'  # the sleeper runs\n"
                   + parent)
    r = execute_code(code, timeout=3.0)
    assert r.stdout.startswith("started"), r.stderr  # the escape was attempted
    assert _gone_soon(marker)


def test_a_fork_bomb_hits_the_process_limit():
    code = LIBC + ("n = 0\n"
                   "for _ in range(200):\n"
                   "    pid = libc.fork()\n"
                   "    if pid == 0:\n"
                   "        libc.pause()\n"
                   "    if pid < 0:\n"
                   "        break\n"
                   "    n += 1\n"
                   "print(n, ctypes.get_errno())")
    r = execute_code(code, timeout=5.0)
    n, err = r.stdout.split()
    assert int(n) < 64 and int(err) == errno.EAGAIN, r.stdout


def test_many_files_hit_the_size_cap_of_tmp():
    code = ("import errno\nn = 0\n"
            "try:\n"
            "    for i in range(200):\n"
            "        with open(f'f{i}', 'wb') as f:\n"
            "            f.write(b'x' * 1_000_000)\n"
            "        n += 1\n"
            "except OSError as e:\n"
            "    print(n, errno.errorcode[e.errno])")
    r = execute_code(code)
    n, err = r.stdout.split()
    assert int(n) < 100 and err == "ENOSPC", r.stdout


@pytest.mark.parametrize("path", ["/", "/usr/lib", "/dev", "/etc"])
def test_only_tmp_is_writable(path):
    r = execute_code(f"import os\nopen(os.path.join({path!r}, 'x'), 'w')")
    assert not r.success and r.error.startswith(("OSError", "PermissionError", "FileNotFoundError")), r.error


@pytest.mark.parametrize("name", ["fork", "kill", "system", "execv", "setsid"])
def test_posix_originals_are_disabled_too(name):
    r = execute_code(f"import posix\nposix.{name}()")
    assert not r.success and r.error == f"PermissionError: sandbox: posix.{name} is disabled"


def test_anonymous_files_are_bounded_too():
    code = ("import os\nn = 0\n"
            "try:\n"
            "    for i in range(300):\n"
            "        os.write(os.memfd_create('x'), b'x' * 1_000_000)\n"
            "        n += 1\n"
            "except OSError as e:\n"
            "    print(n, e.strerror)")
    r = execute_code(code)
    n, err = r.stdout.split(maxsplit=1)
    assert int(n) < 100 and err.strip() == "Too many open files", r.stdout
