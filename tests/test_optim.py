"""Facts about nanochat_jax/optim: parameter groups, Muon's orthogonalisation, schedules, and parity of one and
two optimizer steps with nanochat's (fixtures/nanochat_ref, tolerances from its README)."""

import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nanochat_jax import optim

REF_DIRS = [Path(__file__).parent / "fixtures" / "nanochat_ref",
            Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "nanochat_ref"]


def ref_file(name):
    for d in REF_DIRS:
        if (d / name).is_file():
            return d / name
    pytest.skip(f"fixture {name} not found")


def load_fixture(name):
    """(state_dict params, grads, model_config, opt npz) of a nanochat reference fixture."""
    import json
    z = dict(np.load(ref_file(f"{name}.npz")))
    zo = dict(np.load(ref_file(f"{name}_opt.npz")))
    meta = json.loads(ref_file(f"{name}.json").read_text()) if any(
        (d / f"{name}.json").is_file() for d in REF_DIRS) else None
    names = [k[5:] for k in z if k.startswith("grad/")]
    sd = {k: z[k] for k in names}
    grads = {k: z["grad/" + k] for k in names}
    return z, sd, grads, zo, meta


def to_params(sd, model_config):
    from nanochat_jax.interop import convert
    params, config = convert.from_nanochat(sd, model_config)
    return jax.tree.map(jnp.asarray, params), config


def update_errors(ours, ref):
    """Per tensor: (max|a-b|/max|b|, rel_fro, #elements with |a-b| > 1e-4 max|b|)."""
    out = {}
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(ours)[0], jax.tree.leaves(ref)):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        err = np.abs(a - b)
        m = np.abs(b).max()
        out[jax.tree_util.keystr(path)] = (err.max() / m, np.linalg.norm(a - b) / np.linalg.norm(b),
                                           int((err > 1e-4 * m).sum()))
    return out


MODEL_CONFIGS = {
    "head_d4": {"sequence_len": 256, "vocab_size": 512, "n_layer": 4, "n_head": 2, "n_kv_head": 2, "n_embd": 128,
                "window_pattern": "SSSL"},
    "orig_d2": {"sequence_len": 128, "vocab_size": 512, "n_layer": 2, "n_head": 2, "n_kv_head": 2, "n_embd": 128},
}


def one_step(name, recipe):
    z, sd, grads, zo, _ = load_fixture(name)
    params, config = to_params(sd, MODEL_CONFIGS[name])
    g, _ = to_params(grads, MODEL_CONFIGS[name])
    after1, _ = to_params({k: zo["after1/" + k] for k in sd}, MODEL_CONFIGS[name])
    opt_cfg = optim.OptConfig.for_recipe(recipe, schedules=False)
    tx = optim.build_optimizer(params, config, opt_cfg, num_steps=1)
    state = tx.init(params)
    upd, state = jax.jit(tx.update)(g, state, params)
    ref = jax.tree.map(lambda a, b: a - b, after1, params)
    return z, zo, params, config, tx, state, upd, ref


# ---------------------------------------------------------------------------------------------------------------
# Groups

def _toy_params_2026():
    C, V = 32, 64
    blk = {"attn": {"c_q": jnp.zeros((C, C)), "c_k": jnp.zeros((C, C)), "c_v": jnp.zeros((C, C)),
                    "c_proj": jnp.zeros((C, C)), "ve_gate": jnp.zeros((12, 1))},
           "mlp": {"c_fc": jnp.zeros((C, 4 * C)), "c_proj": jnp.zeros((4 * C, C))}}
    return {"wte": jnp.zeros((V, C)), "lm_head": jnp.zeros((C, V)), "blocks": {"0": blk},
            "value_embeds": {"0": jnp.zeros((V, C))}, "resid_lambdas": jnp.ones((1,)), "x0_lambdas": jnp.ones((1,)),
            "smear_lambda": jnp.zeros((1,)), "backout_lambda": jnp.zeros((1,)), "smear_gate": jnp.zeros((24, 1))}


def test_param_labels_route_only_block_matrices_to_muon():
    labels = optim.param_labels(_toy_params_2026())
    assert labels["wte"] == "embedding" and labels["lm_head"] == "unembedding"
    assert labels["value_embeds"]["0"] == "value_embeds"
    assert labels["resid_lambdas"] == "resid" and labels["x0_lambdas"] == "x0"
    assert labels["smear_gate"] == labels["smear_lambda"] == labels["backout_lambda"] == "smear"
    assert set(jax.tree.leaves(labels["blocks"])) == {"muon"}
    with pytest.raises(ValueError):  # a non-matrix inside the blocks must never reach Muon
        optim.param_labels({"blocks": {"0": {"norm": {"scale": jnp.ones((8,))}}}})
    with pytest.raises(ValueError):
        optim.muon(0.02).init({"w": jnp.ones((3,))})


def test_adamw_groups_match_fixture_hyperparameters():
    import json
    meta = json.loads(ref_file("head_d4.json").read_text())
    from types import SimpleNamespace
    groups = optim.adamw_groups(SimpleNamespace(n_embd=128), optim.OptConfig.for_recipe("2026"))
    ours = {"lm_head.weight": "unembedding", "transformer.wte.weight": "embedding", "value_embeds.1.weight":
            "value_embeds", "resid_lambdas": "resid", "x0_lambdas": "x0", "smear_gate.weight": "smear"}
    seen = 0
    for g in meta["optimizer"]["param_groups"]:
        for p in g["params"]:
            if p in ours:
                h = groups[ours[p]]
                assert h["lr"] == pytest.approx(g["lr"], rel=1e-12) and (h["b1"], h["b2"]) == tuple(g["betas"])
                assert h["wd"] == g["weight_decay"]
                seen += 1
    assert seen == len(ours)


# ---------------------------------------------------------------------------------------------------------------
# Muon facts

@pytest.mark.parametrize("shape", [(64, 192), (192, 64), (96, 96)])
def test_orthogonalisation_singular_values_in_band(shape):
    """Both iterations map every singular value of a well-conditioned matrix into the band their coefficients aim
    at: Polar Express (fp32) to ~1, the 2025 quintic (slope-maximising, bf16) to roughly (0.5, 1.5)."""
    key = jax.random.PRNGKey(0)
    G = jax.random.normal(key, shape, jnp.float32)
    pe = optim.polar_express(G)
    ns = optim.newton_schulz_2025(G).astype(jnp.float32)
    assert pe.shape == shape and ns.shape == shape
    s_pe = np.linalg.svd(np.asarray(pe), compute_uv=False)
    s_ns = np.linalg.svd(np.asarray(ns), compute_uv=False)
    s_in = np.linalg.svd(np.asarray(G), compute_uv=False)
    if shape[0] == shape[1]:  # a square Gaussian has singular values near 0: only the large ones converge
        keep = s_in > 0.05 * s_in.max()
        s_pe, s_ns = s_pe[keep], s_ns[keep]
    assert s_pe.min() > 0.8 and s_pe.max() < 1.2, (s_pe.min(), s_pe.max())
    assert s_ns.min() > 0.5 and s_ns.max() < 1.5, (s_ns.min(), s_ns.max())
    # same singular vectors as G (orthogonalisation, not some other matrix): U^T pe V is ~diagonal
    U, _, Vt = np.linalg.svd(np.asarray(G), full_matrices=False)
    core = U.T @ np.asarray(pe) @ Vt.T
    assert np.abs(core - np.diag(np.diag(core))).max() < 1e-3


def test_muon_state_shapes_and_tall_wide_scaling():
    """NorMuon's second moment is factored along nanochat's reduction dim; the update of a matrix with more outputs
    than inputs is scaled by sqrt(out/in)."""
    params = {"tall": jnp.ones((64, 16)), "wide": jnp.ones((16, 64))}   # (in, out)
    tx = optim.muon(0.02, 0.0, 0.0, recipe="2025", dtype=jnp.float32)
    state = tx.init(params)
    g = jax.tree.map(lambda p: jax.random.normal(jax.random.PRNGKey(p.shape[0]), p.shape), params)
    u, _ = tx.update(g, state, params)
    # 2025 with momentum 0 (no Nesterov mix): u = -lr * sqrt(max(1, out/in)) * NS(g); NS(g) has |.|_F ~ sqrt(16)
    ratio = float(jnp.linalg.norm(u["wide"]) / jnp.linalg.norm(u["tall"]))
    assert 1.7 < ratio < 2.3   # sqrt(64/16) = 2, up to the NS band
    # the state is stacked per wide shape (tall and wide share one), a row per matrix raveled; the factored moment
    # of a non-square matrix spans its long dim, of a square one nanochat's rows (our columns)
    s26 = optim.muon(0.02, recipe="2026", dtype=jnp.float32).init(dict(params, sq=jnp.ones((32, 32))))
    assert s26.momentum["muon_16x64"].shape == (2, 16 * 64) and s26.momentum["muon_32x32"].shape == (1, 32 * 32)
    assert s26.second_moment["muon_16x64"].shape == (2, 64) and s26.second_moment["muon_32x32"].shape == (1, 32)


# ---------------------------------------------------------------------------------------------------------------
# Schedules

def test_lr_schedule_warmup_constant_warmdown():
    cfg = optim.OptConfig.for_recipe("2026", warmup_steps=10, warmdown_ratio=0.5, final_lr_frac=0.05)
    f = optim.lr_multiplier(cfg, 100)
    assert float(f(0)) == pytest.approx(0.1) and float(f(9)) == pytest.approx(1.0)
    assert float(f(30)) == 1.0 and float(f(50)) == 1.0
    assert float(f(75)) == pytest.approx(0.5 + 0.5 * 0.05)
    assert float(f(100)) == pytest.approx(0.05)
    f25 = optim.lr_multiplier(optim.OptConfig.for_recipe("2025"), 100)   # no warmup, last 20% down to 0
    assert float(f25(0)) == 1.0 and float(f25(80)) == 1.0 and float(f25(90)) == pytest.approx(0.5)
    m25 = optim.muon_momentum(optim.OptConfig.for_recipe("2025"), 1000)
    assert float(m25(0)) == pytest.approx(0.85) and float(m25(150)) == pytest.approx(0.90)
    assert float(m25(300)) == pytest.approx(0.95) and float(m25(999)) == pytest.approx(0.95)
    m26 = optim.muon_momentum(optim.OptConfig.for_recipe("2026"), 2000)   # warmdown starts at step 700
    assert float(m26(0)) == pytest.approx(0.85) and float(m26(200)) == pytest.approx(0.91)
    assert float(m26(500)) == pytest.approx(0.97)
    assert float(m26(1999)) == pytest.approx(0.97 - 0.07 * 1299 / 1300, rel=1e-5)
    w26 = optim.muon_weight_decay(optim.OptConfig.for_recipe("2026", weight_decay=0.2), 100)
    assert float(w26(0)) == pytest.approx(0.2) and float(w26(50)) == pytest.approx(0.1)


# ---------------------------------------------------------------------------------------------------------------
# Parity with nanochat (fixture README: HEAD step 1 within 1e-4 of max|update| except a handful of elements;
# ORIG step 1 AdamW within 1e-4, Muon rel_fro 0.1; HEAD step 2 with our own grads rel_fro 1e-2)

def test_head_step1_matches_nanochat():
    _, _, params, _, tx, _, upd, ref = one_step("head_d4", "2026")
    errs = update_errors(upd, ref)
    outliers = sum(e[2] for e in errs.values())
    assert outliers <= 5, {k: e for k, e in errs.items() if e[2]}
    labels = optim.param_labels(params)
    for (path, lab) in jax.tree_util.tree_flatten_with_path(labels)[0]:
        e = errs[jax.tree_util.keystr(path)]
        if e[2] == 0:
            assert e[0] < 1e-4, (path, e)
        assert e[1] < 1e-3, (path, e)


def test_orig_step1_matches_nanochat():
    _, _, params, _, tx, _, upd, ref = one_step("orig_d2", "2025")
    errs = update_errors(upd, ref)
    for (path, lab) in jax.tree_util.tree_flatten_with_path(optim.param_labels(params))[0]:
        e = errs[jax.tree_util.keystr(path)]
        if lab == "muon":   # bf16 Newton-Schulz: defined to bf16 rounding only
            assert e[1] < 0.1, (path, e)
        else:
            assert e[0] < 1e-4, (path, e)


def test_head_step2_with_own_grads_matches_nanochat():
    model = pytest.importorskip("nanochat_jax.model")
    z, zo, params, config, tx, state, upd, _ = one_step("head_d4", "2026")
    after1 = jax.tree.map(lambda p, u: p + u, params, upd)
    inputs, targets = jnp.asarray(z["idx"]), jnp.asarray(z["targets"])

    def loss_fn(p):
        s, n = model.loss_and_count(p, inputs, targets, config)
        return s / n
    loss2, g2 = jax.jit(jax.value_and_grad(loss_fn))(after1)
    assert float(loss2) == pytest.approx(float(zo["loss2"]), abs=1e-4)
    upd2, _ = jax.jit(tx.update)(g2, state, after1)
    sd_keys = [k[7:] for k in zo if k.startswith("after2/")]
    after2, _ = to_params({k: zo["after2/" + k] for k in sd_keys}, MODEL_CONFIGS["head_d4"])
    ref2 = jax.tree.map(lambda a, b: a - b, after2, after1)
    for name, e in update_errors(upd2, ref2).items():
        assert e[1] < 1e-2, (name, e)
