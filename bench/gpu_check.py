"""The GPU path end to end in one call: GPU-only tests, the real base_train CLI at the d24 and d20 preset shapes
(bf16, a checkpoint save and a resume), and the trained model served by chat_web; one summary table at the end.

    bash bench/gpu_wheels.sh                          # here (online): the wheels an offline GPU node lacks
    python3 bench/gpu_check.py --out $OUT             # on the GPU node (the device tool, .gpu_wheels carried)
    python bench/gpu_check.py --cpu --out /tmp/gc     # the same flow at tiny shapes on CPU (~2 min, the test suite)

Each step runs as its own process with its own timeout (and all of them within --budget seconds), so one failure
or hang does not eat the call; its log is kept under --out as <step>.log, the table as summary.md and summary.json.
Steps:
  setup      install nothing when grain, tensorboardX, flask, waitress, bpe_rs and nanochat_jax import; else
             `pip install --no-index --find-links .gpu_wheels` of what is missing
  gpu-tests  `pytest -m gpu` with JAX_PLATFORMS=cuda (cuDNN attention with windows and GQA against XLA; on CPU the
             marked tests skip)
  tokenizer  scripts.tok_train at vocab 32,768 on the embedded corpus plus the standard library's source (the
             embedded corpus alone supports ~28.6k merges on CPython 3.11); --cpu: vocab 512 on the corpus alone
  d24, d20   scripts.base_train with the preset (configs/d24.toml, d20.toml) at one micro-batch per step (no
             accumulation) for --steps steps on the embedded corpus, a checkpoint at the half; step time (median
             after the first two steps), tokens/s and MFU (the run's report), peak device memory, compile time
             (the first step's time less the median)
  *-resume   the same command resumed from the half-way checkpoint: the losses of the steps it retrains must
             match the first run's
  serve      scripts.chat_web on the last trained model: one streamed request, then 32 concurrent ones
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import sysconfig
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))   # the checkout's nanochat_jax (the tokenizer corpus), as scripts/ use it
WHEELS = ROOT / ".gpu_wheels"
NEEDED = {"grain": "grain", "array_record": "array-record", "tensorboardX": "tensorboardX", "flask": "flask",
          "waitress": "waitress", "bpe_rs": "nanochat-jax", "nanochat_jax": "nanochat-jax"}
GPU_VOCAB, CPU_VOCAB = 32768, 512   # the 2026 recipe's vocabulary; a tiny one for the CPU flow
TOKENIZER_CHARS = 8_000_000         # the embedded corpus (~2M) plus standard-library source up to this size
CONCURRENT = 32                     # requests sent at once to the server
STEP_LINE = re.compile(r"^step (\d+)/\d+ .*?\| loss ([\d.]+) .*?\| dt ([\d.]+)ms .*?\| tok/s ([\d,]+)")


# ---------------------------------------------------------------------------------------------------------------
# Running the steps

class Runner:
    """Runs commands with a per-step timeout inside an overall budget, logging each to <out>/<name>.log."""

    def __init__(self, out: Path, budget: float, env: dict):
        self.out, self.deadline, self.env = out, time.time() + budget, env
        self.rows = []   # (step, status, seconds, figures)

    def timeout(self, limit: float) -> float:
        return max(1.0, min(limit, self.deadline - time.time()))

    def run(self, name: str, cmd: list, limit: float, env: dict | None = None) -> tuple[int | None, str]:
        """(exit status or None on timeout, output) of `cmd`; the output goes to <name>.log as well."""
        t = self.timeout(limit)
        print(f"== {name}: {' '.join(cmd)} (timeout {t:.0f} s)", flush=True)
        try:
            p = subprocess.run(cmd, cwd=ROOT, env={**self.env, **(env or {})}, capture_output=True, text=True,
                               timeout=t)
            rc, text = p.returncode, p.stdout + p.stderr
        except subprocess.TimeoutExpired as e:
            rc = None
            text = _text(e.stdout) + _text(e.stderr) + f"\n[timed out after {t:.0f} s]\n"
        (self.out / f"{name}.log").write_text(text)
        return rc, text

    def record(self, name: str, ok: bool, seconds: float, figures: dict):
        status = "ok" if ok else "FAILED"
        self.rows.append((name, status, seconds, figures))
        print(f"-- {name}: {status} in {seconds:.1f} s  {fmt(figures)}", flush=True)


def _text(b) -> str:
    return b.decode(errors="replace") if isinstance(b, bytes) else (b or "")


def fmt(figures: dict) -> str:
    return ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in figures.items())


def tail(text: str, n: int = 1) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return " / ".join(lines[-n:])[-200:] if lines else ""


# ---------------------------------------------------------------------------------------------------------------
# Steps

def pip_command() -> list:
    """`python -m pip`, or pip run from its carried wheel where this Python has no pip module."""
    if importlib.util.find_spec("pip") is not None:
        return [sys.executable, "-m", "pip"]
    wheel = next(iter(sorted(WHEELS.glob("pip-*.whl"))), None)
    return [sys.executable, f"{wheel}/pip"] if wheel else [sys.executable, "-m", "pip"]


def step_setup(r: Runner):
    """Install what does not import from the carried wheels; where pip cannot resolve that against the node's
    packages, install every carried wheel whose distribution is absent without dependency resolution."""
    t0 = time.time()
    missing = sorted({pkg for mod, pkg in NEEDED.items() if importlib.util.find_spec(mod) is None})
    if not missing:
        return r.record("setup", True, time.time() - t0, {"installed": "nothing"})
    pip = pip_command() + ["install", "-q", "--no-index", "--find-links", str(WHEELS)]
    rc, text = r.run("setup", pip + missing, 180)
    how = "resolved"
    if rc != 0:
        absent = [str(w) for w in sorted(WHEELS.glob("*.whl")) if not _installed(w.name.split("-")[0])]
        rc, more = r.run("setup-no-deps", pip + ["--no-deps", *absent], 120)
        text, how = text + more, "no-deps"
    r.record("setup", rc == 0, time.time() - t0, {"installed": " ".join(missing), "how": how}
             | ({} if rc == 0 else {"error": tail(text)}))


def _installed(dist: str) -> bool:
    try:
        importlib.metadata.version(dist)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


def step_gpu_tests(r: Runner, platform: str):
    t0 = time.time()
    rc, text = r.run("gpu-tests", [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu",
                                   "-rs", "tests/test_model.py"], 150, env={"JAX_PLATFORMS": platform})
    counts = dict((k, int(v)) for v, k in re.findall(r"(\d+) (passed|failed|skipped|error|deselected)", text))
    r.record("gpu-tests", rc == 0, time.time() - t0, {**counts} if counts else {"error": tail(text)})


def tokenizer_corpus(path: Path, cpu: bool):
    """A .jsonl of the embedded corpus's documents, plus (GPU: the 32,768 vocab needs more text) the standard
    library's .py files up to TOKENIZER_CHARS characters."""
    from nanochat_jax.data.documents import embedded_corpus  # on call: setup installs the package first
    docs = list(embedded_corpus())
    total = sum(map(len, docs))
    if not cpu:
        for f in sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py")):
            if total >= TOKENIZER_CHARS:
                break
            if "test" in f.parts or "site-packages" in f.parts:
                continue
            text = f.read_text(errors="replace")
            docs.append(text)
            total += len(text)
    with open(path, "w") as fh:
        for d in docs:
            fh.write(json.dumps({"text": d}) + "\n")


def step_tokenizer(r: Runner, base: Path, cpu: bool) -> bool:
    t0 = time.time()
    corpus = base / "tokenizer_corpus.jsonl"
    try:
        tokenizer_corpus(corpus, cpu)
    except Exception as e:
        r.record("tokenizer", False, time.time() - t0, {"error": repr(e)[:200]})
        return False
    vocab = CPU_VOCAB if cpu else GPU_VOCAB
    rc, text = r.run("tokenizer", [sys.executable, "-m", "scripts.tok_train", "--data-path", str(corpus),
                                   "--vocab-size", str(vocab)], 180)
    r.record("tokenizer", rc == 0, time.time() - t0, {"vocab": vocab} if rc == 0 else {"error": tail(text)})
    return rc == 0


def train_command(preset: str, cpu: bool, steps: int) -> list:
    """scripts.base_train with the preset's shapes (--cpu: d2 at T=64), one micro-batch per optimizer step."""
    cmd = [sys.executable, "-m", "scripts.base_train", "--config", f"configs/{preset}.toml",
           "--data-path", "embedded", "--num-iterations", str(steps), "--save-every", str(steps // 2),
           "--eval-every", "-1", "--core-metric-every", "-1", "--sample-every", "-1", "--model-tag", f"check-{preset}"]
    if cpu:
        return cmd + ["--depth", "2", "--max-seq-len", "64", "--device-batch-size", "4", "--total-batch-size", "256"]
    device_batch = {"d24": 16, "d20": 32}[preset]   # the presets' device batch sizes, at their 2048-token context
    return cmd + ["--total-batch-size", str(device_batch * 2048)]


def parse_train(text: str, report: Path) -> tuple[dict, dict]:
    """(figures, {step: loss}) from a base_train run's step lines and its report section."""
    losses, dts, toks = {}, {}, {}
    for line in text.splitlines():
        m = STEP_LINE.match(line)
        if m:
            s = int(m.group(1))
            losses[s], dts[s], toks[s] = float(m.group(2)), float(m.group(3)), int(m.group(4).replace(",", ""))
    fig = {}
    steady = [dts[s] for s in sorted(dts)[2:]]
    if steady:
        fig["step ms"] = statistics.median(steady)
        fig["compile s"] = (dts[min(dts)] - fig["step ms"]) / 1000
    rep = report.read_text() if report.is_file() else ""
    for key, name in (("throughput (tok/s)", "tok/s"), ("MFU (%)", "MFU %"), ("peak device memory (GiB)", "peak GiB")):
        m = re.search(re.escape(key) + r": ([\d.]+)", rep)
        if m:
            fig[name] = float(m.group(1))
    return fig, losses


def step_train(r: Runner, base: Path, preset: str, cpu: bool, steps: int) -> bool:
    """A fresh run, then a resume from its half-way checkpoint whose retrained steps' losses must match."""
    report = base / "report" / "base-model-training.md"
    cmd = train_command(preset, cpu, steps)
    t0 = time.time()
    report.unlink(missing_ok=True)
    rc, text = r.run(preset, cmd + ["--overwrite"], 150 if cpu else 200)
    fig, losses = parse_train(text, report)
    ok = rc == 0 and len(losses) == steps
    r.record(preset, ok, time.time() - t0, {"steps": len(losses), **fig} | ({} if ok else {"error": tail(text)}))
    if not ok:
        return False
    t0 = time.time()
    report.unlink(missing_ok=True)
    rc, text = r.run(f"{preset}-resume", cmd + ["--resume-from-step", str(steps // 2)], 120)
    fig, again = parse_train(text, report)
    diff = max((abs(again[s] - losses[s]) for s in again), default=float("nan"))
    ok = rc == 0 and "resumed from" in text and sorted(again) == list(range(steps // 2 + 1, steps + 1))
    r.record(f"{preset}-resume", ok, time.time() - t0,
             {"from step": steps // 2, "steps": len(again), "max loss diff": diff}
             | ({} if ok else {"error": tail(text)}))
    return True


# ---------------------------------------------------------------------------------------------------------------
# Serving

def stream_chat(port: int, prompt: str, max_tokens: int) -> dict:
    """One streamed /chat/completions request: its status, tokens, time to the first token and in all."""
    body = json.dumps({"messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}/chat/completions", data=body,
                                 headers={"Content-Type": "application/json"})
    t0, first, tokens, done = time.time(), None, 0, False
    with urllib.request.urlopen(req, timeout=120) as resp:
        status = resp.status
        for raw in resp:
            line = raw.decode().strip()
            if not line.startswith("data: "):
                continue
            event = json.loads(line[6:])
            if "token" in event:
                tokens += 1
                first = first or time.time() - t0
            done = done or bool(event.get("done"))
    return {"status": status, "tokens": tokens, "ttft": first, "seconds": time.time() - t0, "done": done}


def start_server(r: Runner, preset: str, cpu: bool):
    """chat_web on the trained model, port chosen by the OS; (process, port or None, log file)."""
    log = open(r.out / "serve.log", "w")
    cmd = [sys.executable, "-u", "-m", "scripts.chat_web", "--source", "base", "--model-tag", f"check-{preset}",
           "--host", "127.0.0.1", "--port", "0", "--slots", str(8 if cpu else CONCURRENT)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=r.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    found = []

    def read():   # copy the server's output to serve.log, and catch the port it says it serves on
        for line in proc.stdout:
            log.write(line)
            log.flush()
            m = re.search(r"serving .* at http://[^:]+:(\d+)/", line)
            if m and not found:
                found.append(int(m.group(1)))
    threading.Thread(target=read, daemon=True).start()
    end = time.time() + r.timeout(150)
    while not found and proc.poll() is None and time.time() < end:
        time.sleep(0.2)
    return proc, (found[0] if found else None), log


def step_serve(r: Runner, preset: str, cpu: bool):
    t0 = time.time()
    proc, port, log = start_server(r, preset, cpu)
    try:
        if port is None:
            return r.record("serve", False, time.time() - t0, {"error": "server did not start (serve.log)"})
        fig = {"start s": time.time() - t0}
        one = stream_chat(port, "Why is the sky blue?", 32)
        fig.update({"1: tokens": one["tokens"], "1: ttft s": one["ttft"] or float("nan"), "1: s": one["seconds"]})
        t1 = time.time()
        with ThreadPoolExecutor(CONCURRENT) as pool:
            many = list(pool.map(lambda i: _try_stream(port, i), range(CONCURRENT)))
        wall = time.time() - t1
        good = [m for m in many if m.get("status") == 200 and m.get("done")]
        fig.update({f"{CONCURRENT}: ok": len(good), f"{CONCURRENT}: s": wall,
                    f"{CONCURRENT}: tok/s": sum(m["tokens"] for m in good) / wall,
                    f"{CONCURRENT}: max ttft s": max((m["ttft"] or 0 for m in good), default=float("nan"))})
        ok = one["status"] == 200 and one["done"] and len(good) == CONCURRENT
        errors = [m["error"] for m in many if "error" in m][:1]
        r.record("serve", ok, time.time() - t0, fig | ({"error": errors[0]} if errors else {}))
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def _try_stream(port: int, i: int) -> dict:
    try:
        return stream_chat(port, f"Tell me about the number {i}.", 32)
    except Exception as e:   # one failed request is a figure of the table, not the end of the check
        return {"error": repr(e)[:200]}


# ---------------------------------------------------------------------------------------------------------------
# The table and main

def summary(rows) -> str:
    lines = ["| step | status | seconds | figures |", "|---|---|---|---|"]
    lines += [f"| {name} | {status} | {sec:.1f} | {fmt(fig)} |" for name, status, sec, fig in rows]
    return "\n".join(lines)


def device_line(env: dict) -> str:
    """The backend and its devices, asked of a child process (importing JAX here would hold GPU memory)."""
    code = ("import jax; d = jax.devices()[0]; print(f'{jax.default_backend()}: {len(jax.devices())} x "
            "{getattr(d, \"device_kind\", d.platform)}, jax {jax.__version__}')")
    try:
        p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
        return p.stdout.strip() or f"no jax device: {tail(p.stderr)}"
    except subprocess.TimeoutExpired:
        return "no jax device: timed out"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="folder for the logs and the summary table")
    p.add_argument("--cpu", action="store_true", help="tiny shapes on CPU (d2, 6 steps, vocab 512)")
    p.add_argument("--steps", type=int, default=None, help="training steps per run (default 20; --cpu: 6)")
    p.add_argument("--budget", type=float, default=None, help="seconds for everything (default 460; --cpu: 600)")
    p.add_argument("--base-dir", default=None, help="NANOCHAT_BASE_DIR of the runs (default: a fresh temp dir)")
    args = p.parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    base = Path(args.base_dir or f"/tmp/gpu_check_base_{os.getpid()}").resolve()
    shutil.rmtree(base, ignore_errors=True)
    base.mkdir(parents=True)
    platform = "cpu" if args.cpu else "cuda"
    env = {**os.environ, "NANOCHAT_BASE_DIR": str(base), "JAX_PLATFORMS": platform, "PYTHONUNBUFFERED": "1"}
    steps = args.steps or (6 if args.cpu else 20)
    r = Runner(out, args.budget or (600 if args.cpu else 460), env)

    step_setup(r)
    device = device_line(env)
    print(f"device: {device}", flush=True)
    step_gpu_tests(r, platform)
    trained = None
    if step_tokenizer(r, base, args.cpu):
        for preset in ("d24", "d20"):
            if step_train(r, base, preset, args.cpu, steps):
                trained = preset
    if trained:
        step_serve(r, trained, args.cpu)
    else:
        r.record("serve", False, 0.0, {"error": "no trained model to serve"})

    table = f"device: {device}\n\n{summary(r.rows)}\n"
    print("\n" + table, flush=True)
    (out / "summary.md").write_text(table)
    (out / "summary.json").write_text(json.dumps(
        {"device": device, "rows": [{"step": n, "status": s, "seconds": sec, "figures": f}
                                    for n, s, sec, f in r.rows]}, indent=1))
    shutil.rmtree(base, ignore_errors=True)
    return 0 if all(s == "ok" for _, s, _, _ in r.rows) else 1


if __name__ == "__main__":
    sys.exit(main())
