"""run_speedrun.sh: the GPU plan in a dry run, the presets' tables, and the whole miniature end to end (slow): killed
during base training and run again it resumes without redoing finished stages, writes every stage's checkpoints,
TensorBoard files and report.md, and serves the final model over HTTP, which answers "Who are you?" with its name."""

import importlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from nanochat_jax.core.common import parse_args

REPO = Path(__file__).resolve().parent.parent
PRESETS = sorted(p.stem for p in (REPO / "configs").glob("*.toml"))
SECTIONS = ("tok_train", "tok_eval", "pretokenize", "base_train", "base_loss", "base_eval", "mid_train", "chat_sft",
            "chat_rl", "chat_eval", "download_data")

# the smallest miniature: every stage, a few steps each (vocab 512, d2, T 128); mid and SFT weigh the identity
# conversations as configs/cpu.toml does, enough for the model to say who it is
TINY = """
[speedrun]
gpus = 0
shards = 0
rl = true
offline = true

[tok_train]
data_path = "embedded"
vocab_size = 512
max_chars = 300000

[tok_eval]
max_chars = 100000

[pretokenize]
data_path = "embedded"

[base_train]
depth = 2
max_seq_len = 128
window_pattern = "L"
device_batch_size = 4
total_batch_size = 1024
num_iterations = 300
warmup_steps = 2
eval_every = 150
eval_tokens = 512
core_metric_every = -1
sample_every = -1
save_every = 4
data_path = "embedded"
model_tag = "tiny"

[base_loss]
data_path = "embedded"
device_batch_size = 4
split_tokens = 512
max_new_tokens = 4

[base_eval]
bundle_dir = "mini"
max_per_task = 8
batch_tokens = 2048

[mid_train]
device_batch_size = 4
max_seq_len = 128
num_iterations = 60
identity_copies = 12
spelling_size = 40
eval_every = 60
eval_steps = 1

[chat_sft]
device_batch_size = 4
max_seq_len = 128
num_iterations = 40
identity_copies = 12
spelling_size = 40
eval_every = 40
eval_steps = 1
eval_metrics_every = -1

[chat_rl]
num_iterations = 2
examples_per_step = 2
num_samples = 2
device_batch_size = 2
max_new_tokens = 8
eval_every = 2
eval_examples = 2
eval_samples = 2

[chat_eval]
max_problems = 4
max_new_tokens = 8
batch_size = 4
"""


def _env(base_dir) -> dict:
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)   # one CPU device, as a user's machine (conftest fakes 8 for the sharding tests)
    env.update(NANOCHAT_BASE_DIR=str(base_dir), NANOCHAT_SKIP_INSTALL="1", PYTHONPATH=str(REPO),
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}")
    return env


def _speedrun(args, base_dir, **kw):
    return subprocess.run(["bash", str(REPO / "run_speedrun.sh"), *args], cwd=REPO, env=_env(base_dir),
                          capture_output=True, text=True, **kw)


def _commands(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith("python -m scripts.")]


# ---------------------------------------------------------------------------------------------------------------
# The plan (fast)

def test_dry_run_d24_prints_every_command_and_runs_nothing(base_dir):
    r = _speedrun(["--dry-run", "--preset", "d24"], base_dir, timeout=120)
    assert r.returncode == 0, r.stderr
    cmds = _commands(r.stdout)
    stages = [c.split()[2] for c in cmds]
    assert stages == ["scripts.report", "scripts.download_data", "scripts.download_data", "scripts.tok_train",
                      "scripts.tok_eval", "scripts.pretokenize", "scripts.base_train", "scripts.base_loss",
                      "scripts.base_eval", "scripts.mid_train", "scripts.chat_eval", "scripts.chat_sft",
                      "scripts.chat_eval", "scripts.report"]
    assert all("--config configs/d24.toml" in c for c in cmds if c.split()[2] not in
               ("scripts.report", "scripts.download_data"))
    assert "on 8 GPU(s)" in r.stdout and "16 rows/device x 2048 x 8 device(s)" in r.stdout
    assert "x 4 accumulation = 1,048,576 tokens/step" in r.stdout and " steps = " in r.stdout
    assert "export NANOCHAT_DATASET=climbmix-400b" in r.stdout
    assert "python -m scripts.download_data -n 170 &" in r.stdout
    assert not (base_dir / "speedrun").exists() and not (base_dir / "report").exists()   # ran nothing


def test_dry_run_one_gpu_same_recipe_8x_accumulation(base_dir):
    eight = _speedrun(["--dry-run", "--preset", "d24"], base_dir, timeout=120)
    one = _speedrun(["--dry-run", "--preset", "d24", "--gpus", "1"], base_dir, timeout=120)
    assert one.returncode == 0, one.stderr
    strip = lambda cmds: [c.split(" --grad-accum")[0] for c in cmds]   # noqa: E731
    assert strip(_commands(one.stdout)) == _commands(eight.stdout)   # the same commands, the same preset
    mid = [c for c in _commands(one.stdout) if "scripts.mid_train" in c][0]
    assert mid.endswith("--grad-accum 16")                            # the preset's 2, x 8
    assert "16 rows/device x 2048 x 1 device(s)" in one.stdout
    assert "x 32 accumulation = 1,048,576 tokens/step" in one.stdout   # 8 x 4
    steps8 = [line for line in eight.stdout.splitlines() if line.startswith("# base_train")][0].split(";")[1]
    steps1 = [line for line in one.stdout.splitlines() if line.startswith("# base_train")][0].split(";")[1]
    assert steps8 == steps1                                             # same steps and tokens
    assert "export CUDA_VISIBLE_DEVICES=0" in one.stdout
    assert "x 16 accumulation = 256 rows/step" in one.stdout            # mid_train: 2 -> 16


def test_dry_run_cpu_runs_every_stage_offline(base_dir):
    import shutil
    if shutil.which("nvidia-smi"):
        pytest.skip("an NVIDIA GPU machine picks the d24 preset")
    r = _speedrun(["--dry-run"], base_dir, timeout=120)   # no GPU here: the CPU miniature
    assert r.returncode == 0, r.stderr
    assert "preset cpu" in r.stdout and "export NANOCHAT_OFFLINE=1" in r.stdout
    stages = [c.split()[2] for c in _commands(r.stdout)]
    assert "scripts.download_data" not in stages and "scripts.chat_rl" in stages and stages.count("scripts.chat_eval") == 3


def test_bad_arguments(base_dir):
    r = _speedrun(["--from", "nonsense", "--dry-run"], base_dir, timeout=60)
    assert r.returncode == 2 and "not a stage" in r.stderr
    r = _speedrun(["--preset", "d99", "--dry-run"], base_dir, timeout=60)
    assert r.returncode == 2 and "preset 'd99' not found" in r.stderr


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_tables_are_valid_flags(preset):
    """Every table of every preset is accepted by its script's parser (a typo would stop a run hours in)."""
    for section in SECTIONS:
        mod = importlib.import_module(f"nanochat_jax.cli.{section}")
        parser = mod.build_parser() if hasattr(mod, "build_parser") else None
        if parser is None:
            continue
        parse_args(parser, section, ["--config", str(REPO / "configs" / f"{preset}.toml")])


# ---------------------------------------------------------------------------------------------------------------
# The miniature end to end (slow)

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _numbered(d: Path) -> list[int]:
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.is_dir() else []


@pytest.mark.slow
def test_miniature_end_to_end_kill_resume_serve(base_dir, tmp_path):
    preset = tmp_path / "tiny.toml"
    preset.write_text(TINY)
    stamps = base_dir / "speedrun"
    base_ckpt = base_dir / "checkpoints" / "base" / "tiny"

    # -- first run: killed (SIGKILL, the whole process group) once base training saved a checkpoint ----------------
    log1 = open(tmp_path / "run1.log", "w")
    p = subprocess.Popen(["bash", str(REPO / "run_speedrun.sh"), "--preset", str(preset)], cwd=REPO,
                         env=_env(base_dir), stdout=log1, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 600
    while not _numbered(base_ckpt) and p.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    log1.close()
    out1 = (tmp_path / "run1.log").read_text()
    assert _numbered(base_ckpt), out1[-3000:]
    assert (stamps / "tok_train.done").is_file() and (stamps / "pretokenize.done").is_file()
    assert (stamps / "base_train.started").is_file() and not (stamps / "base_train.done").exists(), out1[-3000:]

    # -- second run: resumes base training, skips what finished, runs every later stage, then serves -------------
    port = _free_port()
    log2 = open(tmp_path / "run2.log", "w")
    p = subprocess.Popen(["bash", str(REPO / "run_speedrun.sh"), "--preset", str(preset), "--serve", "--port",
                          str(port)], cwd=REPO, env=_env(base_dir), stdout=log2, stderr=subprocess.STDOUT,
                         start_new_session=True)
    try:
        answer = None
        deadline = time.time() + 780
        while time.time() < deadline and p.poll() is None:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
            except OSError:
                time.sleep(0.5)
                continue
            req = urllib.request.Request(
                f"http://127.0.0.1:{port}/v1/chat/completions",
                data=json.dumps({"messages": [{"role": "user", "content": "Hello! Who are you?"}],
                                 "max_tokens": 16, "temperature": 0.0}).encode(),
                headers={"Content-Type": "application/json"})
            answer = json.loads(urllib.request.urlopen(req, timeout=120).read())
            break
    finally:
        os.killpg(p.pid, signal.SIGTERM)
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
        log2.close()
    out2 = (tmp_path / "run2.log").read_text()
    assert answer is not None, out2[-4000:]
    assert answer["choices"][0]["message"]["role"] == "assistant"
    assert answer["usage"]["completion_tokens"] >= 1
    assert "nanochat" in answer["choices"][0]["message"]["content"].lower(), answer   # it knows who it is

    # stages that finished were skipped; base training resumed from its checkpoint
    for s in ("tok_train", "tok_eval", "pretokenize"):
        assert f"# {s}: done in an earlier run, skipped" in out2
    assert "scripts.tok_train" not in "\n".join(_commands(out2))
    assert any(c.startswith("python -m scripts.base_train") and c.endswith("--resume") for c in _commands(out2))
    assert "resumed from" in out2
    assert f"http://" in out2 and f":{port}/" in out2

    # -- artifacts: checkpoints and TensorBoard files of every stage, the report -----------------------------------
    assert _numbered(base_ckpt)[-1] == 300
    for stage in ("base", "mid", "sft", "rl"):
        assert _numbered(base_dir / "checkpoints" / stage / "tiny"), stage
        tb = base_dir / "tensorboard" / stage / "tiny"
        assert any(f.name.startswith("events.out.tfevents") for f in tb.iterdir()), stage
        assert (tb / "metrics.jsonl").is_file()
    report_md = base_dir / "report" / "report.md"
    assert f"The report: {report_md}" in out2
    text = report_md.read_text()
    for title in ("## Environment", "## Summary", "## Plots", "## Tokenizer training", "## Tokenizer evaluation",
                  "## Base model training", "## Base model loss", "## Base model evaluation", "## Midtraining",
                  "## Chat evaluation mid", "## Chat SFT", "## Chat evaluation sft", "## Chat RL",
                  "## Chat evaluation rl"):
        assert title in text, title
    assert "| Metric | BASE | MID | SFT | RL |" in text
    assert re.search(r"\| CORE \| -?\d\.\d{4} \|", text)   # centered accuracy: below 0 when worse than chance
    for stage in ("base", "mid", "sft", "rl"):
        png = base_dir / "report" / f"{stage}_curves.png"
        assert f"]({png.name})" in text and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # -- --from: redo one stage (and those after it) only ---------------------------------------------------------
    r = _speedrun(["--preset", str(preset), "--from", "chat_eval_rl"], base_dir, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "# chat_rl: done in an earlier run, skipped" in r.stdout
    assert [c.split()[2] for c in _commands(r.stdout)] == ["scripts.chat_eval", "scripts.report"]
