"""Midtraining set-up: the offline mixture (skips with notes), the LR and momentum schedules, the epoch length."""

import pytest

from nanochat_jax.stages import finetune as ft
from tests.chat_fixtures import FixtureHub, tiny_config, tiny_tokenizer


@pytest.fixture()
def empty_hub(tmp_path, monkeypatch, base_dir):
    h = FixtureHub()                        # every file 404s: nothing downloadable
    monkeypatch.setenv("HF_ENDPOINT", h.url)
    yield h
    h.close()


def test_offline_mixture_keeps_identity_and_spelling_and_notes_the_rest(empty_hub):
    from nanochat_jax.cli import mid_train
    args = mid_train.build_parser().parse_args(["--spelling-size", "50"])
    notes_seen = []
    tasks, notes = ft.build_tasks(mid_train.train_specs(args), log=notes_seen.append)
    names = [t.name for t in tasks]
    assert names == ["identity", "identity", "SimpleSpelling", "SpellingBee"]
    assert [len(t) for t in tasks][2:] == [50, 20]          # nanochat's 200K : 80K ratio
    assert notes == notes_seen and len(notes) == 3
    assert all("skipped" in n for n in notes)
    assert [n.split("/")[0] for n in notes] == ["SmolTalk", "MMLU", "GSM8K"]


def test_the_cpu_miniature_weighs_identity_enough_to_be_learned(empty_hub):
    """configs/cpu.toml: 12 copies of the identity conversations in mid (19% of the offline mixture) and SFT (half);
    nanochat's 2 were drowned by spelling and the model answered "Who are you?" with spelling-bee noise."""
    from pathlib import Path
    from nanochat_jax.cli import chat_sft, mid_train
    from nanochat_jax.core.common import parse_args
    preset = str(Path(__file__).resolve().parent.parent / "configs" / "cpu.toml")
    for script, name in ((mid_train, "mid_train"), (chat_sft, "chat_sft")):
        args = parse_args(script.build_parser(), name, ["--config", preset])
        tasks, _ = ft.build_tasks(script.train_specs(args), log=lambda *a: None)
        identity = sum(len(t) for t in tasks if t.name == "identity")
        assert [t.name for t in tasks].count("identity") == 12
        assert identity / sum(len(t) for t in tasks) > (0.15 if name == "mid_train" else 0.45), name


def test_mid_lr_constant_then_linear_decay_and_momentum_warmup():
    from nanochat_jax import optim
    from nanochat_jax.cli import mid_train
    args = mid_train.build_parser().parse_args([])
    cfg = tiny_config(tiny_tokenizer(), recipe="2025")
    opt_cfg = ft.stage_opt_config(args, cfg, "mid")
    lrm = optim.lr_multiplier(opt_cfg, 100)
    assert [float(lrm(s)) for s in (0, 40, 80)] == [1.0, 1.0, 1.0]
    assert float(lrm(90)) == pytest.approx(0.5) and float(lrm(100)) == pytest.approx(0.0)
    mom = optim.muon_momentum(opt_cfg, 100)
    assert float(mom(0)) == pytest.approx(0.85) and float(mom(300)) == pytest.approx(0.95)
    assert opt_cfg.weight_decay == 0.0 and opt_cfg.lr_scale == 1.0


def test_sft_and_rl_lr_fractions():
    from nanochat_jax.cli import chat_rl, chat_sft
    cfg = tiny_config(tiny_tokenizer(), recipe="2025")
    sft = ft.stage_opt_config(chat_sft.build_parser().parse_args([]), cfg, "sft")
    rl = ft.stage_opt_config(chat_rl.build_parser().parse_args([]), cfg, "rl")
    assert (sft.lr_scale, sft.warmdown_ratio, rl.lr_scale, rl.warmdown_ratio) == (0.02, 1.0, 0.05, 1.0)
    sft26 = ft.stage_opt_config(chat_sft.build_parser().parse_args([]), tiny_config(recipe="2026"), "sft")
    assert (sft26.lr_scale, sft26.warmdown_ratio) == (0.8, 0.5)
    # 2026: scaled by the batch like base_train (sqrt(B / 524,288)); 2025 trains at a fixed batch: unscaled
    small = ft.stage_opt_config(chat_sft.build_parser().parse_args([]), tiny_config(recipe="2026"), "sft", 8192)
    assert small.lr_scale == pytest.approx(0.8 * (8192 / 524288) ** 0.5)
    assert ft.stage_opt_config(chat_sft.build_parser().parse_args([]), cfg, "sft", 8192).lr_scale == 0.02
    mine = ft.stage_opt_config(chat_sft.build_parser().parse_args(["--init-lr-frac", "0.1"]), cfg, "sft")
    assert mine.lr_scale == 0.1


def test_epoch_tokens_exact_for_small_sets():
    from nanochat_jax.tasks import Identity
    tok = tiny_tokenizer()
    task = Identity()
    want = sum(len(tok.render_conversation(task[i], max_tokens=65)[0]) for i in range(len(task)))
    assert ft.epoch_tokens(task, tok, 65) == want
    est = ft.epoch_tokens(task, tok, 65, sample=20)
    assert abs(est - want) / want < 0.5
    assert ft.num_steps_for_epochs(want, 1000, 1.0) == -(-want // 1000)
