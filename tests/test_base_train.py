"""scripts/base_train.py: presets and the batch plan, bad input, and real tiny runs in subprocesses (exact resume
after SIGKILL, SIGTERM saves and resumes, two processes == one, checkpoint + TensorBoard + report)."""

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from nanochat_jax.core import config as cfg
from nanochat_jax.core.common import UserError, parse_args
from nanochat_jax.cli import base_train

REPO = Path(__file__).resolve().parent.parent
# d2, T=64, one device: 2 rows x 64 tokens per micro-batch, 2 accumulation steps per 256-token step
TINY = ["--depth", "2", "--max-seq-len", "64", "--device-batch-size", "2", "--total-batch-size", "256",
        "--eval-every", "-1", "--core-metric-every", "-1", "--sample-every", "-1", "--warmup-steps", "0"]
WORDS = ("the a cat dog runs jumps over under quick brown lazy fox bird sings tree house river stone light dark "
         "day night old new small big red green water fire").split()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A base dir with a tiny tokenizer (vocab 300) and a 400-document corpus file."""
    from nanochat_jax.data.tokenizer import Tokenizer
    root = tmp_path_factory.mktemp("base_train")
    rng = random.Random(0)
    docs = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 80))) + "." for _ in range(400)]
    corpus = root / "corpus.txt"
    corpus.write_text("\n".join(docs) + "\n")
    base = root / "base"
    Tokenizer.train_from_iterator(docs, 300).save(base / "tokenizer")
    return SimpleNamespace(root=root, base=base, corpus=corpus)


def env(world, devices: int = 1) -> dict:
    return {**os.environ, "NANOCHAT_BASE_DIR": str(world.base), "JAX_PLATFORMS": "cpu", "NANOCHAT_DTYPE": "float32",
            "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", "PYTHONPATH": str(REPO)}


def cmd(world, *args) -> list[str]:
    return [sys.executable, "-m", "scripts.base_train", *TINY, "--data-path", str(world.corpus), *args]


def train(world, *args, devices=1, timeout=300) -> subprocess.CompletedProcess:
    p = subprocess.run(cmd(world, *args), env=env(world, devices), cwd=REPO, capture_output=True, text=True,
                       timeout=timeout)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p


def losses(world, run: str) -> dict[int, float]:
    """Per-step raw train losses logged by the run (metrics.jsonl beside the TensorBoard events)."""
    path = world.base / "tensorboard" / "base" / run / "metrics.jsonl"
    recs = [json.loads(line) for line in path.read_text().splitlines()]
    return {r["step"]: r["train/raw_loss"] for r in recs if "train/raw_loss" in r}


def params_at(directory, step):
    from nanochat_jax.train.checkpoint import CheckpointManager
    m = CheckpointManager(directory, max_to_keep=None, async_save=False)
    try:
        params, meta = m.restore_params(step)
    finally:
        m.close()
    import jax
    return jax.tree.map(np.asarray, params), meta


def assert_trees_equal(a, b, rtol=0.0, atol=0.0):
    import jax
    la, lb = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)
    assert [p for p, _ in la] == [p for p, _ in lb]
    for (path, x), (_, y) in zip(la, lb):
        if rtol == atol == 0.0:
            assert np.array_equal(x, y), jax.tree_util.keystr(path)
        else:
            np.testing.assert_allclose(x, y, rtol=rtol, atol=atol, err_msg=jax.tree_util.keystr(path))


def snapshot(directory: Path) -> dict:
    return {str(p.relative_to(directory)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(directory.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------------------------------------------
# Presets and the plan

@pytest.mark.parametrize("name, devices, vocab, accum", [("cpu", 1, 4096, 2), ("d20", 8, 65536, 1),
                                                         ("d26", 8, 65536, 2), ("d32", 8, 65536, 4),
                                                         ("d24", 8, 32768, None)])
def test_presets_load_and_plan(name, devices, vocab, accum):
    args = parse_args(base_train.build_parser(), "base_train", ["--config", str(REPO / "configs" / f"{name}.toml")])
    config = cfg.config_from_args(args, vocab)
    plan = base_train.make_plan(args, config, devices)
    assert plan.accum * plan.rows * plan.seq_len == plan.total_batch
    if accum is not None:
        assert plan.accum == accum
    if name == "d20":   # nanochat's d20: 561M params, 20 tokens/param at 524,288 tokens/step -> ~21,400 steps
        assert 550e6 < cfg.num_params(config)["total"] < 570e6 and config.recipe == "2025"
        assert 21000 < plan.num_steps < 21800
    if name == "d24":
        assert config.recipe == "2026" and plan.total_batch & (plan.total_batch - 1) == 0   # a power of two
    if name == "cpu":
        assert config.n_layer == 4 and args.data_path == "embedded" and plan.num_steps == args.num_iterations
    text = plan.describe()
    assert "accumulation" in text and "horizon" in text and "FLOPs budget" in text


def test_flags_take_dashes_and_underscores_and_the_docs_forms():
    p = base_train.build_parser()
    a = parse_args(p, "base_train", ["--max_seq_len", "64", "--device-batch-size", "3", "--data_path", "x.txt",
                                     "--output_dir", "out", "--d_model", "256", "--n_heads", "4",
                                     "--target_param_data_ratio", "8", "--resume-from-step", "7"])
    assert (a.max_seq_len, a.device_batch_size, a.data_path, a.output_dir, a.d_model, a.n_heads) == \
        (64, 3, "x.txt", "out", 256, 4)
    assert a.target_param_data_ratio == 8 and a.resume_from_step == 7


def test_2026_optimizer_gets_the_batch_lr_scale_and_2025_does_not():
    p = base_train.build_parser()
    for recipe, scaled in (("2026", True), ("2025", False)):
        a = parse_args(p, "base_train", ["--depth", "2", "--recipe", recipe, "--max-seq-len", "64",
                                         "--total-batch-size", "131072", "--matrix-lr", "0.03"])
        plan = base_train.make_plan(a, cfg.config_from_args(a, 512), 1)
        o = base_train.make_opt_config(a, plan)
        assert o.matrix_lr == 0.03
        assert o.lr_scale == (pytest.approx(0.5) if scaled else 1.0)


# ---------------------------------------------------------------------------------------------------------------
# Bad input: one-line errors, the good checkpoint untouched

@pytest.fixture()
def good_ckpt(world, monkeypatch, tmp_path):
    """An Orbax checkpoint of the d2 model (what `check_output_dir` reads), in a fresh output dir."""
    import jax
    from nanochat_jax.train.checkpoint import CheckpointManager
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(world.base))
    a = parse_args(base_train.build_parser(), "base_train", TINY)
    config = cfg.config_from_args(a, 300)
    out = tmp_path / "out"
    m = CheckpointManager(out, async_save=False)
    m.save(5, {"params": {"w": jax.numpy.ones((2, 2))}, "step": jax.numpy.int32(5)}, {"position": 5},
           {"model_config": config.to_dict()})
    m.close()
    return out


IN_PROCESS = ["--total-batch-size", "2048"]   # 8 fake devices here: 2 x 64 x 8 = 1,024 tokens per micro-batch


@pytest.mark.parametrize("case", ["missing data", "different model", "indivisible batch"])
def test_bad_input_is_one_user_error_and_leaves_the_checkpoint_alone(world, good_ckpt, case):
    before = snapshot(good_ckpt)
    argv = TINY + IN_PROCESS + ["--data-path", str(world.corpus), "--output-dir", str(good_ckpt)]
    want = {"missing data": "no such file", "different model": "different model",
            "indivisible batch": "not a multiple"}[case]
    if case == "missing data":
        argv += ["--data-path", str(world.root / "nope.txt"), "--overwrite"]
    elif case == "different model":
        argv += ["--depth", "3"]
    else:
        argv += ["--device-batch-size", "3", "--overwrite"]
    with pytest.raises(UserError, match=want) as e:
        base_train.main(argv)
    assert "\n" not in str(e.value)
    assert snapshot(good_ckpt) == before


def test_resume_without_a_checkpoint_is_a_user_error(world, monkeypatch, tmp_path):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(world.base))
    with pytest.raises(UserError, match="no checkpoint"):
        base_train.main(TINY + IN_PROCESS + ["--data-path", str(world.corpus), "--output-dir",
                                             str(tmp_path / "empty"), "--resume"])


def test_an_existing_checkpoint_needs_resume_or_overwrite(world, good_ckpt):
    before = snapshot(good_ckpt)
    with pytest.raises(UserError, match="--resume"):
        base_train.main(TINY + IN_PROCESS + ["--data-path", str(world.corpus), "--output-dir", str(good_ckpt)])
    assert snapshot(good_ckpt) == before


def test_the_command_line_shows_one_line_and_exits_2(world, good_ckpt):
    before = snapshot(good_ckpt)
    p = subprocess.run(cmd(world, "--data-path", str(world.root / "missing.txt"), "--output-dir", str(good_ckpt),
                           "--overwrite"), env=env(world), cwd=REPO, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "missing.txt" in lines[0], p.stderr
    assert snapshot(good_ckpt) == before


# ---------------------------------------------------------------------------------------------------------------
# Real runs

@pytest.mark.slow
def test_a_run_writes_checkpoint_meta_tensorboard_and_report(world, tmp_path):
    out = tmp_path / "ckpt"
    p = train(world, "--num-iterations", "3", "--eval-every", "2", "--eval-tokens", "128", "--sample-every", "3",
              "--output-dir", str(out), "--run", "smoke")
    for piece in ("batch: 2 rows/device x 64 tokens x 1 data devices", "x 2 accumulation", "horizon: 3 steps",
                  "FLOPs budget", "step 00003/00003", "lrm", "tok/s", "epoch", "elapsed", "eta"):
        assert piece in p.stdout, piece
    params, meta = params_at(out, 3)
    assert meta["step"] == 3 and meta["model_config"]["n_layer"] == 2 and meta["loop"]["ema_steps"] == 3
    assert meta["val_bpb"] is not None and meta["tokenizer_fingerprint"]
    assert (out / "tokenizer").is_dir()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(world.base / "tensorboard" / "base" / "smoke"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/raw_loss", "train/lrm", "train/grad_norm", "train/tok_per_sec", "val/bpb"} <= tags
    assert [e.step for e in acc.Scalars("val/bpb")] == [0, 2, 3]
    assert [e.step for e in acc.Scalars("train/raw_loss")] == [1, 2, 3]
    assert acc.Scalars("val/bpb")[-1].value == pytest.approx(meta["val_bpb"], rel=1e-6)
    report = (world.base / "report" / "base-model-training.md").read_text()
    assert "val bpb" in report and "tokens: 768" in report


@pytest.mark.slow
def test_exact_resume_after_sigkill(world, tmp_path):
    """8 steps straight == 4 steps, SIGKILL once the step-4 checkpoint has committed, resume for 4 more."""
    from nanochat_jax.train.checkpoint import CheckpointManager
    common = ["--num-iterations", "8", "--save-every", "4"]
    train(world, *common, "--output-dir", str(tmp_path / "straight"), "--run", "straight")

    killed = tmp_path / "killed"
    # this run also evaluates val bpb after every step: slower steps leave time to kill it between the step-4 and
    # step-8 checkpoints, and the evaluations must not change the training (own loader, no state touched)
    proc = subprocess.Popen(cmd(world, *common, "--output-dir", str(killed), "--run", "killed", "--eval-every", "1",
                                "--eval-tokens", "128"), env=env(world),
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        while not (killed / "4" / "_CHECKPOINT_METADATA").is_file():
            assert proc.poll() is None, proc.stderr.read()[-3000:]
            assert time.time() < deadline, "no step-4 checkpoint"
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
        proc.stderr.close()
    assert CheckpointManager(killed, max_to_keep=None, async_save=False).latest_step() == 4

    p = train(world, *common, "--output-dir", str(killed), "--run", "resumed", "--resume")
    assert "resumed from" in p.stdout

    straight = losses(world, "straight")
    first, second = losses(world, "killed"), losses(world, "resumed")
    assert sorted(straight) == list(range(1, 9)) and sorted(second) == [5, 6, 7, 8]
    assert [first[s] for s in range(1, 5)] + [second[s] for s in range(5, 9)] == [straight[s] for s in range(1, 9)]
    a, meta_a = params_at(tmp_path / "straight", 8)
    b, meta_b = params_at(killed, 8)
    assert_trees_equal(a, b)
    assert meta_a["loop"]["smooth_loss"] == meta_b["loop"]["smooth_loss"]


@pytest.mark.slow
def test_sigterm_saves_a_complete_checkpoint_that_resumes(world, tmp_path):
    from nanochat_jax.train.checkpoint import CheckpointManager
    out = tmp_path / "term"
    args = ["--num-iterations", "60", "--output-dir", str(out), "--run", "term"]
    proc = subprocess.Popen(cmd(world, *args), env=env(world), cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("step 00003/00060"):
            proc.send_signal(signal.SIGTERM)
            break
    rest, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, "".join(lines) + rest
    assert "SIGTERM received" in rest
    step = CheckpointManager(out, max_to_keep=None, async_save=False).latest_step()
    assert step is not None and 3 <= step < 60
    p = train(world, *args, "--resume")
    assert f"resumed from {out}/{step}" in p.stdout
    assert "step 00060/00060" in p.stdout
    assert CheckpointManager(out, max_to_keep=None, async_save=False).latest_step() == 60


@pytest.mark.slow
def test_two_processes_match_one_process_with_the_same_global_batch(world, tmp_path):
    common = ["--num-iterations", "3"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [subprocess.Popen(cmd(world, *common, "--output-dir", str(tmp_path / "two"), "--run", "two",
                                  "--coordinator-address", f"127.0.0.1:{port}", "--num-processes", "2",
                                  "--process-id", str(i)),
                              env=env(world, devices=1), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for i in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs[0][-3000:] + outs[1][-3000:]
    assert "2 process(es)" in outs[0] and "step 00003/00003" in outs[0]
    assert "step 0000" not in outs[1]                                    # process 1 is quiet
    train(world, *common, "--output-dir", str(tmp_path / "one"), "--run", "one", devices=2)
    two, one = losses(world, "two"), losses(world, "one")
    assert sorted(two) == sorted(one) == [1, 2, 3]
    np.testing.assert_allclose([two[s] for s in (1, 2, 3)], [one[s] for s in (1, 2, 3)], rtol=1e-6)
    a, _ = params_at(tmp_path / "two", 3)
    b, _ = params_at(tmp_path / "one", 3)
    assert_trees_equal(a, b, rtol=1e-5, atol=1e-6)


def test_hooks_compute_val_bpb_samples_and_core(world, monkeypatch):
    """The three periodic evaluations on a tiny untrained model: val bpb near log2(vocab)/bytes per token, one
    sample line per prompt, CORE and per-task CORE under core/ (evaluate_core itself is stubbed here)."""
    import jax
    from nanochat_jax import model
    from nanochat_jax.core import sharding as shd
    from nanochat_jax.data.shards import ensure_pretokenized
    from nanochat_jax.evaluation import SAMPLE_PROMPTS
    from nanochat_jax.evaluation import core as core_mod
    from nanochat_jax.data.tokenizer import Tokenizer
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(world.base))
    tok = Tokenizer.from_directory(world.base / "tokenizer")
    args = parse_args(base_train.build_parser(), "base_train", TINY + ["--eval-tokens", "256"])
    config = cfg.config_from_args(args, tok.get_vocab_size())
    plan = base_train.make_plan(args, config, 1)
    _, val = ensure_pretokenized(world.corpus, tok)
    mesh = shd.make_mesh(None, devices=jax.devices()[:1])
    seen = {}

    def fake_core(params, config, tokenizer, max_per_task=-1, bundle_dir=None, **kw):
        seen.update(max_per_task=max_per_task, bundle_dir=bundle_dir)
        return {"core_metric": 0.25, "centered_results": {"hellaswag": 0.5, "arc_easy": 0.0}, "results": {}}

    monkeypatch.setattr(core_mod, "evaluate_core", fake_core)
    hooks = {h.name: h for h in base_train.make_hooks(args, plan, tok, val, mesh, bundle="BUNDLE")}
    state = SimpleNamespace(params=model.init_params(config, jax.random.PRNGKey(0)))
    bpb = hooks["val bpb"].fn(state, 0)["val/bpb"]
    assert 0.5 < bpb < 20 and bpb == hooks["val bpb"].fn(state, 0)["val/bpb"]     # deterministic: same val batches
    text = hooks["samples"].fn(state, 0)["samples"]
    assert len(text.splitlines()) >= len(SAMPLE_PROMPTS) and text.startswith(SAMPLE_PROMPTS[0])
    core = hooks["CORE"].fn(state, 0)
    assert core == {"core/metric": 0.25, "core/hellaswag": 0.5, "core/arc_easy": 0.0}
    assert seen == {"max_per_task": args.core_metric_max_per_task, "bundle_dir": "BUNDLE"}


def test_val_bpb_reads_at_most_one_pass_of_a_small_split(world, monkeypatch, capsys):
    """--eval-tokens far beyond the validation split's size evaluates one pass over it, and says so at start-up (it
    used to cycle a small split for minutes at every evaluation)."""
    import jax
    from nanochat_jax.core import sharding as shd
    from nanochat_jax.data.shards import ensure_pretokenized
    from nanochat_jax.data.tokenizer import Tokenizer
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(world.base))
    tok = Tokenizer.from_directory(world.base / "tokenizer")
    args = parse_args(base_train.build_parser(), "base_train", TINY + ["--eval-tokens", "10485760",
                                                                        "--eval-every", "25"])
    config = cfg.config_from_args(args, tok.get_vocab_size())
    plan = base_train.make_plan(args, config, 1)
    _, val = ensure_pretokenized(world.corpus, tok)
    seen = []

    def counting_bpb(params, loader, token_bytes, steps=None, **kw):
        seen.append((steps, loader.pass_batches))
        return 1.0

    monkeypatch.setattr(base_train, "evaluate_bpb", counting_bpb)
    mesh = shd.make_mesh(None, devices=jax.devices()[:1])
    hooks = {h.name: h for h in base_train.make_hooks(args, plan, tok, val, mesh)}
    hooks["val bpb"].fn(SimpleNamespace(params=None), 25)
    [(steps, one_pass)] = seen
    assert steps == one_pass < 10485760 // 128
    assert (f"val bpb: --eval-tokens 10,485,760 asks for 81,920 batches of 2x64, but the split fills only "
            f"{one_pass}: evaluating one pass") in capsys.readouterr().out


@pytest.mark.slow
def test_sigterm_to_one_of_two_processes_stops_both_at_a_common_step(world, tmp_path):
    from nanochat_jax.train.checkpoint import CheckpointManager
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "two"
    procs = [subprocess.Popen(cmd(world, "--num-iterations", "200", "--output-dir", str(out), "--run", "two-term",
                                  "--coordinator-address", f"127.0.0.1:{port}", "--num-processes", "2",
                                  "--process-id", str(i)),
                              env=env(world, devices=1), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for i in range(2)]
    lines = []
    for line in procs[0].stdout:
        lines.append(line)
        if line.startswith("step 00003/00200"):
            procs[0].send_signal(signal.SIGTERM)       # process 1 never sees a signal
            break
    outs = [procs[0].communicate(timeout=240)[0], procs[1].communicate(timeout=240)[0]]
    assert [p.returncode for p in procs] == [0, 0], "".join(lines) + outs[0][-2000:] + outs[1][-2000:]
    step = CheckpointManager(out, max_to_keep=None, async_save=False).latest_step()
    assert step is not None and step % 10 == 0 and 10 <= step < 200
