"""The optimizer as nanochat trains: Muon (`optim/muon.py`) for every matrix inside the transformer blocks, AdamW
groups for the rest, with nanochat's schedules of the learning rate, Muon's momentum and its weight decay.

2025 recipe: AdamW (0.8, 0.95) for wte and lm_head. 2026: six AdamW groups with their own lr / betas / weight decay.

`build_optimizer(params, config, opt_cfg, num_steps, mesh=None)` -> optax.GradientTransformation (multi_transform
over `param_labels(params)`).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import optax

from nanochat_jax.core.common import UserError
from nanochat_jax.optim.muon import muon


# ---------------------------------------------------------------------------------------------------------------
# Hyperparameters

@dataclasses.dataclass(frozen=True)
class OptConfig:
    """Optimizer hyperparameters. Defaults are nanochat's per recipe (see `for_recipe`); `lr_scale` is the
    batch-size LR correction and `weight_decay` the already-scaled Muon weight decay (config.py derives both)."""
    recipe: str = "2026"
    matrix_lr: float = 0.02
    embedding_lr: float = 0.3
    unembedding_lr: float = 0.008
    scalar_lr: float = 0.5
    weight_decay: float = 0.28
    lr_scale: float = 1.0
    warmup_steps: int = 40
    warmdown_ratio: float = 0.65
    final_lr_frac: float = 0.05
    ns_steps: int = 5
    muon_beta2: float = 0.9           # NorMuon second-moment EMA (2026)
    adam_eps: float = 1e-10           # nanochat's; step 1 is then sign-like (m/sqrt(v) = g/|g|)
    muon_dtype: str | None = None     # None: bf16 for 2025 (always), the compute dtype (bf16 or fp32) for 2026
    schedules: bool = True            # False: lr multiplier 1, momentum 0.95, constant wd (the fixtures' setting)

    @classmethod
    def for_recipe(cls, recipe: str = "2026", **overrides) -> "OptConfig":
        if recipe == "2025":
            base = dict(recipe="2025", embedding_lr=0.2, unembedding_lr=0.004, weight_decay=0.0, warmup_steps=0,
                        warmdown_ratio=0.2, final_lr_frac=0.0)
        elif recipe == "2026":
            base = dict(recipe="2026")
        else:
            raise UserError(f"unknown recipe {recipe!r} (expected 2025 or 2026)")
        base.update(overrides)
        return cls(**base)


# ---------------------------------------------------------------------------------------------------------------
# Schedules (functions of the 0-based step, like nanochat's base_train; jnp-traceable)

def lr_multiplier(opt_cfg: OptConfig, num_steps: int) -> Callable:
    """Linear warmup over `warmup_steps`, constant, then linear warmdown over the last `warmdown_ratio` of the
    steps to `final_lr_frac` (nanochat base_train.get_lr_multiplier)."""
    if not opt_cfg.schedules:
        return lambda step: jnp.ones((), jnp.float32)
    warmup = opt_cfg.warmup_steps
    warmdown = round(opt_cfg.warmdown_ratio * num_steps)
    final = opt_cfg.final_lr_frac

    def fn(step):
        it = jnp.asarray(step, jnp.float32)
        up = (it + 1) / max(warmup, 1)
        progress = (num_steps - it) / max(warmdown, 1)
        down = progress + (1 - progress) * final
        return jnp.where(it < warmup, up, jnp.where(it <= num_steps - warmdown, 1.0, down))
    return fn


def muon_momentum(opt_cfg: OptConfig, num_steps: int) -> Callable:
    """2025: 0.85 -> 0.95 over the first 300 steps. 2026: 0.85 -> 0.97 over 400 steps, then 0.97 -> 0.90 during
    the LR warmdown (nanochat base_train.get_muon_momentum)."""
    if not opt_cfg.schedules:
        return lambda step: jnp.asarray(0.95, jnp.float32)
    if opt_cfg.recipe == "2025":
        return lambda step: 0.85 + 0.10 * jnp.minimum(jnp.asarray(step, jnp.float32) / 300, 1.0)
    warmdown = round(opt_cfg.warmdown_ratio * num_steps)
    start = num_steps - warmdown

    def fn(step):
        it = jnp.asarray(step, jnp.float32)
        warm = (1 - it / 400) * 0.85 + (it / 400) * 0.97
        progress = (it - start) / max(warmdown, 1)
        down = 0.97 * (1 - progress) + 0.90 * progress
        return jnp.where(it < 400, warm, jnp.where(it >= start, down, 0.97))
    return fn


def muon_weight_decay(opt_cfg: OptConfig, num_steps: int) -> Callable:
    """2026: cosine decay of the (scaled) weight decay to 0 over the run; 2025: none."""
    wd = opt_cfg.weight_decay
    if not opt_cfg.schedules or opt_cfg.recipe == "2025":
        return lambda step: jnp.asarray(wd, jnp.float32)
    return lambda step: wd * 0.5 * (1 + jnp.cos(jnp.pi * jnp.asarray(step, jnp.float32) / max(num_steps, 1)))


# ---------------------------------------------------------------------------------------------------------------
# Parameter groups

def _path_str(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)


def param_label(path: str, ndim: int) -> str:
    """The optimizer group of the param at `path` ('blocks/0/attn/c_q', 'wte', ...)."""
    top = path.split("/")[0]
    if top == "blocks":
        if ndim != 2:  # non-matrix params never reach Muon
            raise ValueError(f"{path}: a non-matrix param inside the blocks has no optimizer group")
        return "muon"
    return {"wte": "embedding", "lm_head": "unembedding", "value_embeds": "value_embeds",
            "resid_lambdas": "resid", "x0_lambdas": "x0", "smear_gate": "smear", "smear_lambda": "smear",
            "backout_lambda": "smear"}.get(top) or _unknown(path)


def _unknown(path):
    raise ValueError(f"{path}: no optimizer group for this param")


def param_labels(params):
    """A pytree like `params` whose leaves are group names: 'muon' (block matrices), 'embedding', 'unembedding',
    'value_embeds', 'resid', 'x0', 'smear'."""
    return jax.tree_util.tree_map_with_path(lambda path, p: param_label(_path_str(path), p.ndim), params)


def adamw_groups(config, opt_cfg: OptConfig) -> dict[str, dict]:
    """AdamW group -> dict(lr, b1, b2, wd) at lr multiplier 1 (nanochat's GPT.setup_optimizer)."""
    s = (config.n_embd / 768) ** -0.5   # AdamW LRs tuned at width 768, scaled by 1/sqrt(width)
    k = opt_cfg.lr_scale
    if opt_cfg.recipe == "2025":
        wd = opt_cfg.weight_decay
        return {"unembedding": dict(lr=opt_cfg.unembedding_lr * s * k, b1=0.8, b2=0.95, wd=wd),
                "embedding": dict(lr=opt_cfg.embedding_lr * s * k, b1=0.8, b2=0.95, wd=wd)}
    return {
        "unembedding": dict(lr=opt_cfg.unembedding_lr * s * k, b1=0.8, b2=0.96, wd=0.01),
        "embedding": dict(lr=opt_cfg.embedding_lr * s * k, b1=0.8, b2=0.995, wd=0.001),
        "value_embeds": dict(lr=opt_cfg.embedding_lr * s * k * 0.5, b1=0.8, b2=0.995, wd=0.01),
        "resid": dict(lr=opt_cfg.scalar_lr * 0.01 * k, b1=0.8, b2=0.95, wd=0.05),
        "x0": dict(lr=opt_cfg.scalar_lr * k, b1=0.96, b2=0.95, wd=0.0),
        "smear": dict(lr=0.2, b1=0.8, b2=0.95, wd=0.0),   # fixed in nanochat's setup_optimizer
    }


def build_optimizer(params, config, opt_cfg: OptConfig | None = None, num_steps: int = 1, mesh=None
                    ) -> optax.GradientTransformation:
    """Muon for the block matrices + AdamW groups, with nanochat's schedules over `num_steps`. `params` only
    supplies the labels (shapes are enough: an abstract tree from jax.eval_shape works)."""
    opt_cfg = opt_cfg or OptConfig.for_recipe(getattr(config, "recipe", "2026"))
    lrm = lr_multiplier(opt_cfg, num_steps)
    groups = adamw_groups(config, opt_cfg)
    used = set(jax.tree.leaves(param_labels(params)))
    missing = used - set(groups) - {"muon"}
    if missing:
        raise ValueError(f"recipe {opt_cfg.recipe} has no AdamW group for {sorted(missing)}")
    transforms = {}
    for name, h in groups.items():
        transforms[name] = optax.adamw(learning_rate=lambda step, _lr=h["lr"]: _lr * lrm(step), b1=h["b1"],
                                       b2=h["b2"], eps=opt_cfg.adam_eps, weight_decay=h["wd"])
    mlr = opt_cfg.matrix_lr * opt_cfg.lr_scale
    dtype = jnp.dtype(opt_cfg.muon_dtype) if opt_cfg.muon_dtype else None
    transforms["muon"] = muon(lambda step: mlr * lrm(step), muon_momentum(opt_cfg, num_steps),
                              muon_weight_decay(opt_cfg, num_steps), recipe=opt_cfg.recipe,
                              beta2=opt_cfg.muon_beta2, ns_steps=opt_cfg.ns_steps, dtype=dtype, mesh=mesh)
    return optax.multi_transform(transforms, param_labels)
