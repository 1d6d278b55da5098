"""Facts about nanochat_jax/interop/convert.py: nanochat state_dicts in and out."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import load_ref, ref_state_dict
from nanochat_jax.core import common
from nanochat_jax.interop import convert
from nanochat_jax import model
from nanochat_jax.core.config import ModelConfig


@pytest.mark.parametrize("name,recipe", [("orig_d2", "2025"), ("head_d4", "2026"), ("head_d4_gqa", "2026")])
def test_roundtrip_and_recipe_detection(name, recipe):
    arrays, meta = load_ref(name)
    sd = ref_state_dict(arrays)
    params, config = convert.from_nanochat(sd, meta["config"])
    assert config.recipe == recipe and config.nanochat_config() == meta["config"]
    back = convert.to_nanochat(params, config)
    assert set(back) == set(sd)
    for k in sd:
        np.testing.assert_array_equal(back[k], sd[k])
    # layout: PyTorch (out, in) becomes (in, out)
    np.testing.assert_array_equal(params["blocks"]["0"]["mlp"]["c_fc"], sd["transformer.h.0.mlp.c_fc.weight"].T)


def test_orig_mod_prefix_and_bf16_arrays_are_accepted():
    arrays, meta = load_ref("orig_d2")
    sd = {f"_orig_mod.{k}": v.astype(jnp.bfloat16) for k, v in ref_state_dict(arrays).items()}
    params, _ = convert.from_nanochat(sd, meta["config"])
    assert params["wte"].dtype == np.float32


def test_unpadded_2025_vocab_is_padded_without_changing_logits():
    config = ModelConfig.from_depth(2, d_model=128, n_heads=2, vocab_size=500, max_seq_len=32, recipe="2025")
    params = model.init_params(config, jax.random.PRNGKey(0))
    params["lm_head"] = 0.02 * jax.random.normal(jax.random.PRNGKey(1), params["lm_head"].shape)
    sd = convert.to_nanochat(params, config)
    sd = {k: (v[:500] if k in ("transformer.wte.weight", "lm_head.weight") else v) for k, v in sd.items()}
    params2, config2 = convert.from_nanochat(sd, config.nanochat_config())
    assert config2 == config and params2["wte"].shape == (512, 128)
    tokens = jax.random.randint(jax.random.PRNGKey(2), (1, 32), 0, 500)
    np.testing.assert_allclose(model.forward(params2, tokens, config), model.forward(params, tokens, config),
                               rtol=0, atol=1e-6)


def test_bad_checkpoints_fail_with_one_line():
    arrays, meta = load_ref("head_d4")
    sd = ref_state_dict(arrays)
    cases = [
        ({k: v for k, v in sd.items() if k != "transformer.h.1.attn.ve_gate.weight"}, meta["config"], "lacks"),
        ({**sd, "transformer.h.0.attn.c_proj_scalar": np.zeros(128)}, meta["config"], "unexpected keys"),
        (sd, {**meta["config"], "n_layer": 2}, "does not use"),
        (sd, {**meta["config"], "n_layer": 5}, "lacks"),
        (sd, {**meta["config"], "n_kv_head": 1}, "shape"),
        (sd, {k: v for k, v in meta["config"].items() if k != "n_embd"}, "lacks 'n_embd'"),
    ]
    for state_dict, model_config, needle in cases:
        with pytest.raises(common.UserError) as e:
            convert.from_nanochat(state_dict, model_config)
        assert needle in str(e.value) and "\n" not in str(e.value), str(e.value)
