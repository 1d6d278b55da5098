"""Facts about nanochat_jax/core/config.py: sizing from depth, validation, flags, scaling rules."""

import math

import jax
import pytest

from nanochat_jax.core import common
from nanochat_jax.core import config as cfgmod
from nanochat_jax.core.config import ModelConfig, add_model_args, config_from_args


def test_from_depth_follows_nanochat_sizing():
    c = ModelConfig.from_depth(20)
    assert (c.n_layer, c.n_embd, c.n_head, c.n_kv_head, c.head_dim) == (20, 1280, 10, 10, 128)
    assert c.recipe == "2026" and c.vocab_size == 32768 and c.sequence_len == 2048 and c.rope_base == 100000
    assert c.mlp_hidden == 4 * 1280
    assert ModelConfig.from_depth(1).n_embd == 128            # 64 rounded up to a multiple of 128
    assert ModelConfig.from_depth(26).n_embd == 1664          # 26*64 = 1664 = 13*128
    assert ModelConfig.from_depth(5).n_embd == 384            # 320 -> 384
    old = ModelConfig.from_depth(20, recipe="2025")
    assert old.vocab_size == 65536 and old.rope_base == 10000 and old.window_sizes == (cfgmod.FULL_CONTEXT,) * 20
    assert old.ve_layers == () and old.qk_scale == 1.0


def test_overrides():
    c = ModelConfig.from_depth(4, d_model=256, n_heads=4, n_kv_heads=2, vocab_size=500, max_seq_len=512,
                               mlp="swiglu")
    assert (c.n_embd, c.n_head, c.head_dim, c.n_kv_head, c.sequence_len) == (256, 4, 64, 2, 512)
    assert c.vocab_size == 500 and c.padded_vocab_size == 512 and c.mlp == "swiglu"
    c = ModelConfig.from_depth(4, head_dim=64)
    assert (c.n_embd, c.n_head, c.head_dim) == (256, 4, 64)


def test_2026_derived_layout():
    c = ModelConfig.from_depth(8, max_seq_len=2048)
    assert c.window_sizes == (512, 512, 512, 2048, 512, 512, 512, 2048)
    assert c.ve_layers == (1, 3, 5, 7) and c.backout_layer == 4 and c.qk_scale == 1.2
    c = ModelConfig.from_depth(5, max_seq_len=256, window_pattern="sl")
    assert c.window_pattern == "SL" and c.window_sizes == (128, 256, 128, 256, 256)
    assert c.ve_layers == (0, 2, 4)


@pytest.mark.parametrize("make,needle", [
    (lambda: ModelConfig.from_depth(0), "depth"),
    (lambda: ModelConfig.from_depth(4, d_model=200), "not divisible by head dim"),
    (lambda: ModelConfig.from_depth(4, d_model=384, n_kv_heads=2), "not divisible by kv heads"),
    (lambda: ModelConfig.from_depth(4, n_heads=3), "not divisible by 3 heads"),
    (lambda: ModelConfig.from_depth(4, recipe="2024"), "recipe"),
    (lambda: ModelConfig.from_depth(4, mlp="gelu"), "mlp"),
    (lambda: ModelConfig.from_depth(4, window_pattern="SXL"), "window pattern"),
    (lambda: ModelConfig.from_depth(4, max_seq_len=0), "seq len"),
    (lambda: ModelConfig(n_layer=2, n_embd=128, n_head=2, n_kv_head=2, head_dim=32), "x head_dim"),
])
def test_bad_configs_fail_with_one_line(make, needle):
    with pytest.raises(common.UserError) as e:
        make()
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_flags_with_dashes_or_underscores_and_run_main_prints_one_line(capsys):
    parser = add_model_args(common.ArgumentParser())
    args = parser.parse_args(["--depth", "4", "--d_model", "256", "--n-heads", "4", "--n_kv_heads", "2",
                              "--max-seq-len", "128", "--recipe", "2025"])
    c = config_from_args(args, vocab_size=300)
    assert (c.n_layer, c.n_embd, c.n_head, c.n_kv_head, c.sequence_len, c.vocab_size, c.recipe) == \
        (4, 256, 4, 2, 128, 300, "2025")
    assert config_from_args(parser.parse_args(["--vocab-size", "1000"]), vocab_size=300).vocab_size == 1000

    def main(argv):
        config_from_args(parser.parse_args(argv))
    with pytest.raises(SystemExit) as e:
        common.run_main(main, ["--depth", "0"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1


def test_hashable_and_dict_roundtrip():
    c = ModelConfig.from_depth(6, n_kv_heads=1, vocab_size=1000)
    d = c.to_dict()
    assert ModelConfig.from_dict(d) == c and hash(ModelConfig.from_dict(d)) == hash(c)
    assert ModelConfig.from_dict({**d, "unknown_future_field": 1}) == c
    jax.jit(lambda x, cfg: x * cfg.n_layer, static_argnums=1)(1.0, c)  # usable as a static jit argument


def test_scaling_rules():
    d12 = ModelConfig.from_depth(12)
    assert cfgmod.total_batch_size(d12) == cfgmod.B_REF                  # the reference point itself
    assert cfgmod.weight_decay_scale(d12, cfgmod.B_REF) == pytest.approx(1.0)
    d24 = ModelConfig.from_depth(24)
    b24 = cfgmod.total_batch_size(d24)
    ratio = cfgmod.target_tokens(d24) / cfgmod.target_tokens(d12)
    assert b24 == 2 ** round(math.log2(cfgmod.B_REF * ratio ** 0.383)) and b24 > cfgmod.B_REF
    assert cfgmod.weight_decay_scale(d24, b24) == pytest.approx(math.sqrt(b24 / cfgmod.B_REF) / ratio)
    assert cfgmod.batch_lr_scale(4 * cfgmod.B_REF) == pytest.approx(2.0)
    assert cfgmod.dmodel_lr_scale(ModelConfig.from_depth(12, d_model=768, n_heads=6)) == pytest.approx(1.0)
    assert cfgmod.dmodel_lr_scale(d12) == pytest.approx((768 / 768) ** -0.5)
    d20 = ModelConfig.from_depth(20, recipe="2025", vocab_size=65536)
    assert cfgmod.total_batch_size(d20) == 524288
    # 2025 speedrun: 20 tokens per param, 560,988,160 params -> 21,400 steps of 524,288 tokens
    assert cfgmod.num_iterations(d20, 524288) == 20 * 560_988_160 // 524288 == 21400
    assert cfgmod.num_iterations(d20, 524288, num_steps=7) == 7
    fpt = cfgmod.flops_per_token(d20)
    assert cfgmod.num_iterations(d20, 524288, target_flops=1000 * fpt * 524288) == 1000


def test_describe_prints_everything_derived():
    text = cfgmod.describe(ModelConfig.from_depth(4, max_seq_len=256, vocab_size=500))
    for needle in ("recipe 2026", "width 256", "padded 512", "windows [128, 128, 128, 256]", "params total",
                   "FLOPs per token", "total batch size", "LR scales", "weight-decay scale"):
        assert needle in text, needle


def test_a_preset_by_short_name_is_found_from_any_directory(tmp_path, monkeypatch):
    """`--config d24` means configs/d24.toml: the checkout's, whatever the current directory; a configs/ folder in
    the current directory comes first; an unknown name is one UserError line."""
    monkeypatch.chdir(tmp_path)
    assert common.load_preset("d24", "base_train")["depth"] == 24
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "d24.toml").write_text("[base_train]\ndepth = 7\n", encoding="utf-8")
    assert common.load_preset("d24", "base_train")["depth"] == 7
    with pytest.raises(common.UserError, match="preset nosuch not found"):
        common.load_preset("nosuch", "base_train")


def test_an_output_directory_is_replaced_only_with_overwrite(tmp_path):
    """Exports write into an empty directory: one that holds files is refused in one line unless overwrite empties
    it; a file where the directory should be is refused too."""
    out = tmp_path / "out"
    assert common.clear_output_dir(out, overwrite=False) == out.resolve()     # missing: fine, the caller creates it
    out.mkdir()
    (out / "old.bin").write_bytes(b"x")
    with pytest.raises(common.UserError, match="is not empty; pass --overwrite"):
        common.clear_output_dir(out, overwrite=False)
    assert (out / "old.bin").exists()
    common.clear_output_dir(out, overwrite=True)
    assert not out.exists()
    (tmp_path / "f").write_text("x")
    with pytest.raises(common.UserError, match="is a file"):
        common.clear_output_dir(tmp_path / "f", overwrite=True)
