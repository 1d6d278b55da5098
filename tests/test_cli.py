"""Facts about the command line (nanochat_jax/cli/): one `nanochat-jax STAGE` console script over the stage
modules, `python -m scripts.<stage>` still running them from a checkout, --help listing each flag once with its
default and the docstring's examples, and a wheel without a top-level `scripts` package."""

import importlib
import subprocess
import sys
import tomllib

import pytest

from nanochat_jax import cli
from nanochat_jax.core.common import ArgumentParser, examples

from conftest import REPO


def test_dispatcher_lists_the_stages_and_refuses_an_unknown_one(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in cli.STAGES) and "chat = chat-cli" in out
    assert cli.main([]) == 2
    assert cli.main(["base-tran"]) == 2
    assert "unknown stage 'base-tran'" in capsys.readouterr().err


def test_every_stage_is_a_module_whose_help_shows_its_examples(capsys):
    for name, (module, _) in cli.STAGES.items():
        mod = importlib.import_module(f"nanochat_jax.cli.{module}")
        with pytest.raises(SystemExit) as e:
            mod.main(["--help"])
        assert e.value.code == 0, name
        assert "examples:\n    python -m scripts." in capsys.readouterr().out, name
        runner = (REPO / "scripts" / f"{module}.py").read_text(encoding="utf-8")
        assert f"from nanochat_jax.cli.{module} import main" in runner, name


def test_stage_help_through_the_dispatcher(capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["nanochat-jax"])   # the dispatcher renames the program in sys.argv[0]
    with pytest.raises(SystemExit) as e:
        cli.main(["base_train", "--help"])   # underscores work for stage names too
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: nanochat-jax base-train")
    assert "python -m scripts.base_train --depth 20 --recipe 2025" in out


def test_help_shows_each_flag_once_with_its_default():
    p = ArgumentParser(prog="x", description="d", doc="Doc.\n\n    python -m scripts.x --max-seq-len 64   # short\n"
                                           "    python -m scripts.x --a \\\n        --b\n\nTiny CPU example (after x):  python -m scripts.x --tiny\n"
                                           "More text.\n")
    p.add_argument("--max-seq-len", type=int, default=2048, help="context length")
    p.add_argument("--data_path", "--data-path", default="shards", help="corpus")
    p.add_argument("--model-tag", "-g", default=None, help="tag (default: the newest)")
    p.add_argument("--resume", action="store_true", help="continue")
    p.add_argument("--warmup", type=int, default=0, help="steps")
    text = p.format_help()
    assert text.count("--max-seq-len MAX_SEQ_LEN") == 2 and "--max_seq_len" not in text   # usage + options
    assert text.count("--data_path DATA_PATH") == 2 and "--data-path" not in text
    assert "--model-tag MODEL_TAG, -g MODEL_TAG" in text and "(default: the newest)" in text
    assert "(default: 2048)" in text and "(default: shards)" in text and "(default: 0)" in text
    assert "(default: None)" not in text and "(default: False)" not in text
    assert text.rstrip().endswith("examples:\n    python -m scripts.x --max-seq-len 64   # short\n"
                                  "    python -m scripts.x --a \\\n        --b\n"
                                  "    Tiny CPU example (after x):  python -m scripts.x --tiny")
    # both spellings are still accepted
    assert p.parse_args(["--max_seq_len", "64", "--data-path", "x"]).max_seq_len == 64
    assert examples("no commands here") is None


def test_python_m_scripts_and_the_console_module_still_run():
    r = subprocess.run([sys.executable, "-m", "scripts.speedrun_plan", "--help"], cwd=REPO, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0 and "--preset" in r.stdout and "examples:" in r.stdout
    code = "import sys; from nanochat_jax.cli import main; main(['--help']); assert 'jax' not in sys.modules"
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "base-train" in r.stdout, r.stderr


def test_packaging_installs_no_scripts_package_and_names_the_console_script():
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    assert project["tool"]["maturin"]["python-packages"] == ["nanochat_jax"]
    assert project["project"]["scripts"] == {"nanochat-jax": "nanochat_jax.cli:main"}
    extras = project["project"]["optional-dependencies"]
    assert any(d.startswith("flask") for d in extras["serve"])
    assert not any(d.startswith("flask") for d in project["project"]["dependencies"])
    assert "nanochat-jax[serve]" in extras["dev"] and "interop" in extras
