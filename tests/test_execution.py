"""Facts about nanochat_jax/infer/execution.py: the sandbox for model-written code, and the calculator tool.
Hostile programs against the sandbox are in tests/test_sandbox_probes.py."""

import time

import pytest

from nanochat_jax.infer import execution
from nanochat_jax.infer.execution import SandboxUnavailable, calculator, execute_code, sandbox_problem

needs_sandbox = pytest.mark.skipif(sandbox_problem() is not None, reason=str(sandbox_problem()))


@needs_sandbox
def test_normal_code_returns_stdout():
    r = execute_code("import math\nprint(sum(range(10)), math.sqrt(16))")
    assert r.success and not r.timed_out and not r.memory_exceeded and r.error is None
    assert r.stdout == "45 4.0\n"


@needs_sandbox
def test_exception_is_reported_not_raised():
    r = execute_code("print('before')\n1/0")
    assert not r.success and not r.timed_out
    assert r.stdout == "before\n"
    assert r.error == "ZeroDivisionError: division by zero"
    assert "Traceback" in r.stderr


@needs_sandbox
def test_infinite_loop_is_killed_at_the_limit():
    t0 = time.monotonic()
    r = execute_code("while True:\n    pass", timeout=1.0)
    elapsed = time.monotonic() - t0
    assert r.timed_out and not r.success
    assert 0.9 < elapsed < 3.0


@needs_sandbox
def test_sleeping_code_is_killed_at_the_wall_limit():
    t0 = time.monotonic()
    r = execute_code("import time\ntime.sleep(30)", timeout=1.0)  # uses no CPU: only the wall clock catches it
    assert r.timed_out and time.monotonic() - t0 < 3.0


@needs_sandbox
@pytest.mark.parametrize("code", ["x = bytearray(2 * 1024**3)",
                                  "l = []\nwhile True:\n    l.append('x' * 100_000)"])
def test_memory_bomb_is_stopped(code):
    r = execute_code(code, timeout=10.0, max_memory_bytes=256 * 1024**2)
    assert not r.success and r.memory_exceeded and not r.timed_out


@needs_sandbox
def test_writes_never_reach_the_host(tmp_path):
    target = tmp_path / "escaped.txt"
    for code in [f"open({str(target)!r}, 'w').write('x')",
                 f"import pathlib\npathlib.Path({str(target)!r}).write_text('x')",
                 f"import os\nos.close(os.open({str(target)!r}, os.O_CREAT | os.O_WRONLY))",
                 f"import _io\n_io.FileIO({str(target)!r}, 'w')",
                 f"open('../{'../' * 10}{str(target)[1:]}', 'a')",
                 f"import os\nos.mkdir({str(tmp_path / 'newdir')!r})"]:
        r = execute_code(code)
        assert not r.success and r.error.startswith(("FileNotFoundError", "PermissionError", "OSError")), code
    assert not target.exists() and not (tmp_path / "newdir").exists()


@needs_sandbox
def test_host_files_cannot_be_changed(tmp_path):
    victim = tmp_path / "keep.txt"
    victim.write_text("precious")
    for code in [f"import os\nos.remove({str(victim)!r})", f"import os\nos.unlink({str(victim)!r})",
                 f"import os\nos.rename({str(victim)!r}, 'stolen.txt')", f"import os\nos.truncate({str(victim)!r}, 0)",
                 f"import os\nos.chmod({str(victim)!r}, 0)", "import os\nos.remove(os.__file__)"]:
        r = execute_code(code)
        assert not r.success and r.error.startswith(("FileNotFoundError", "PermissionError", "OSError")), code
    assert victim.read_text() == "precious"


@needs_sandbox
def test_tmp_is_the_working_directory_and_works():
    r = execute_code("import os, tempfile\nprint(os.getcwd(), tempfile.gettempdir(), os.path.expanduser('~'))\n"
                     "open('a.txt', 'w').write('hi')\nprint(open('a.txt').read())\nos.makedirs('d/e')\n"
                     "os.rename('a.txt', 'b.txt')\nos.remove('b.txt')\nos.rmdir('d/e')\nos.rmdir('d')\n"
                     "with tempfile.NamedTemporaryFile() as f:\n    f.write(b'ok')\nprint(os.listdir('.'))")
    assert r.success, r.stderr
    assert r.stdout == "/tmp /tmp /tmp\nhi\n[]\n"


@needs_sandbox
def test_each_run_gets_a_fresh_tmp():
    first = execute_code("open('mark', 'w').write('1')")
    second = execute_code("import os\nprint(os.path.exists('mark'))")
    assert first.success and second.success and second.stdout == "False\n"


@needs_sandbox
def test_the_standard_library_is_there_and_third_party_packages_are_not():
    r = execute_code("import hashlib, json, re, math, ctypes, decimal, sqlite3\nprint(hashlib.md5(b'x').hexdigest())\n"
                     "import importlib.util\nprint(importlib.util.find_spec('numpy'))")
    assert r.success, r.stderr
    assert r.stdout == "9dd4e461268c8034f5c8564e155c67a6\nNone\n"


@needs_sandbox
@pytest.mark.parametrize("code", ["import socket\nsocket.socket()",
                                  "import socket\nsocket.create_connection(('127.0.0.1', 80), timeout=1)",
                                  "import _socket\n_socket.socket()",
                                  "import urllib.request\nurllib.request.urlopen('http://127.0.0.1:1/', timeout=1)"])
def test_opening_a_socket_fails(code):
    r = execute_code(code)
    assert not r.success and not r.timed_out
    assert "network" in r.stderr or "Error" in r.error


@needs_sandbox
def test_environment_holds_no_secrets_from_the_parent(monkeypatch):
    monkeypatch.setenv("NANOCHAT_TEST_SECRET", "hunter2-very-secret")
    r = execute_code("import os\nprint(sorted(os.environ))\nprint(list(os.environ.values()))")
    assert r.success
    assert "hunter2" not in r.stdout and "NANOCHAT_TEST_SECRET" not in r.stdout
    assert set(eval(r.stdout.splitlines()[0])) <= {"PATH", "HOME", "TMPDIR", "LANG", "LC_ALL", "LC_CTYPE", "PWD"}


@needs_sandbox
@pytest.mark.parametrize("code", ["import shutil\nshutil.rmtree('/tmp')", "import os\nos.kill(1, 9)",
                                  "import os\nos.system('true')", "import subprocess\nsubprocess.run(['true'])",
                                  "import os\nos.fork()", "import posix\nposix.fork()"])
def test_destructive_functions_are_disabled(code):
    r = execute_code(code)
    assert not r.success and "sandbox:" in r.error and "disabled" in r.error


@needs_sandbox
def test_output_is_capped():
    r = execute_code("print('x' * 5_000_000)", max_output_bytes=10_000)
    assert len(r.stdout) <= 10_000


# --- where there is no sandbox -----------------------------------------------------------------------------------

@pytest.fixture
def fresh_sandbox_check():
    """The sandbox check and bwrap's command line are cached per process: recomputed around the test."""
    execution.sandbox_problem.cache_clear()
    execution._bwrap_args.cache_clear()
    yield
    execution.sandbox_problem.cache_clear()
    execution._bwrap_args.cache_clear()


def test_without_bwrap_the_sandbox_refuses_and_says_what_to_install(tmp_path, monkeypatch, fresh_sandbox_check):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(SandboxUnavailable, match="needs bubblewrap.*apt-get install bubblewrap"):
        execute_code("print(1)")
    assert calculator("1 + 1").startswith("Error: the code sandbox needs bubblewrap")


def test_without_namespaces_the_sandbox_refuses_with_bwraps_reason(tmp_path, monkeypatch, fresh_sandbox_check):
    fake = tmp_path / "bwrap"
    fake.write_text("#!/bin/sh\necho 'bwrap: No permissions to create new namespace' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:/usr/bin:/bin")
    with pytest.raises(SandboxUnavailable) as e:
        execute_code("print(1)")
    assert "No permissions to create new namespace" in str(e.value) and "user namespaces" in str(e.value)
    assert "\n" not in str(e.value)


# --- the calculator ----------------------------------------------------------------------------------------------

@needs_sandbox
@pytest.mark.parametrize("expr, expected", [("1 + 2 * 3", "7"), ("12 / 4", "3.0"), ("1,234 * 2", "2468"),
                                            ("1,234,567 + 1", "1234568"), ("(7 - 10) % 4", "1"),
                                            ("'strawberry'.count('r')", "3"), ('"a,b,c".count(",")', "2")])
def test_calculator(expr, expected):
    assert calculator(expr) == expected


@pytest.mark.parametrize("expr", ["2 ** 100000000", "__import__('os').system('true')", "open('x')", "x + 1",
                                  "'a' * 10", "1 / 0", "(", "", "1" * 300])
def test_calculator_errors_are_strings(expr):
    out = calculator(expr)
    assert isinstance(out, str) and out.startswith("Error:")


@pytest.mark.parametrize("expr", ["1,2", "1,2345", "0.5,000", "12,345,6", "1, 234"])
def test_calculator_keeps_commas_that_are_not_thousands_separators(expr):
    assert calculator(expr).startswith("Error: unsupported expression")  # a tuple, not 12 or 12345


HOSTILE = ["__import__('os').system('true')", "open('/etc/passwd').read()", "().__class__.__base__.__subclasses__()",
           "'a'.__class__", "'abc'.count.__self__", "(lambda: 1)()", "[x for x in (1, 2)]", "eval('1+1')",
           "exec('import os')", "globals()", "__builtins__", "2 ** 100000000", "9 ** 9 ** 9", "'a' * 10**9",
           "'a' * 10", "[1] * 10", "x + 1", "(x := 5)", "f'{1}'", "1 if 1 else 2", "'abc'.upper()",
           "'abc'.count('a', 0)", "'abc'.count(sub='a')", "'abc'.count(str(1))", "getattr(1, 'real')", "(1).real",
           "b'abc'.count(b'a')", "1 < 2", "1 and 2", "~1", "1 << 10000000", "import os", "1; 2", "True + 1",
           "1j * 2", "breakpoint()", "1,2", "'x'.count('x').__class__", "1 +" * 100 + " 1"]


@pytest.mark.parametrize("expr", HOSTILE)
def test_hostile_calculator_expressions_never_reach_the_sandbox(expr, monkeypatch):
    def run(*args, **kwargs):
        raise AssertionError(f"reached the sandbox: {expr!r}")
    monkeypatch.setattr(execution, "execute_code", run)
    assert calculator(expr).startswith("Error:")
