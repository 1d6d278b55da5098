"""nanochat (PyTorch) weights <-> our params.

`from_nanochat(state_dict, model_config)` takes a dict of numpy arrays with nanochat's key names (as in a torch
`state_dict`, `_orig_mod.` prefixes allowed) and the `model_config` dict of nanochat's checkpoint meta, and returns
(params, ModelConfig). The recipe is detected from the keys: the 2026 (head) checkpoints carry `resid_lambdas`,
`smear_gate.weight`, `value_embeds.*`; the 2025 ones have only wte, blocks and lm_head. Linear weights are
transposed from PyTorch's (out, in) to our (in, out); vocab rows are padded with zeros to a multiple of 64.
Reading and writing the checkpoint files themselves is `interop.nanochat`'s job.
"""

from __future__ import annotations

import re

import jax
import numpy as np

from nanochat_jax.core.common import UserError
from nanochat_jax.core.config import ModelConfig
from nanochat_jax.model import init_params

_BLOCK = re.compile(r"transformer\.h\.(\d+)\.(attn|mlp)\.(\w+)\.weight")
_VALUE_EMBED = re.compile(r"value_embeds\.(\d+)\.weight")
_SCALARS = ("resid_lambdas", "x0_lambdas", "smear_lambda", "backout_lambda")


def detect_recipe(keys) -> str:
    keys = set(keys)
    return "2026" if "resid_lambdas" in keys or "smear_gate.weight" in keys else "2025"


def config_from_nanochat(model_config: dict, recipe: str) -> ModelConfig:
    """ModelConfig from nanochat's meta `model_config` (sequence_len, vocab_size, n_layer, n_head, n_kv_head,
    n_embd, [window_pattern])."""
    try:
        n_embd, n_head = int(model_config["n_embd"]), int(model_config["n_head"])
        return ModelConfig(n_layer=int(model_config["n_layer"]), n_embd=n_embd, n_head=n_head,
                           n_kv_head=int(model_config.get("n_kv_head", n_head)), head_dim=n_embd // max(n_head, 1),
                           vocab_size=int(model_config["vocab_size"]), sequence_len=int(model_config["sequence_len"]),
                           recipe=recipe, window_pattern=model_config.get("window_pattern") or "SSSL")
    except KeyError as e:
        raise UserError(f"nanochat model_config lacks {e.args[0]!r}") from None


def _pad_rows(a: np.ndarray, rows: int, name: str) -> np.ndarray:
    if a.shape[0] > rows:
        raise UserError(f"nanochat weight {name} has {a.shape[0]} rows, more than the padded vocab {rows}")
    if a.shape[0] < rows:
        a = np.concatenate([a, np.zeros((rows - a.shape[0],) + a.shape[1:], a.dtype)])
    return a


def from_nanochat(state_dict: dict, model_config: dict):
    """nanochat state_dict (numpy arrays) + meta model_config -> (params as nested dict of fp32 np arrays, config)."""
    sd = {k.removeprefix("_orig_mod."): np.asarray(v, dtype=np.float32) for k, v in state_dict.items()}
    config = config_from_nanochat(model_config, detect_recipe(sd))
    V = config.padded_vocab_size
    params = {"wte": _pad_rows(sd.pop("transformer.wte.weight"), V, "wte") if "transformer.wte.weight" in sd else None,
              "lm_head": _pad_rows(sd.pop("lm_head.weight"), V, "lm_head").T if "lm_head.weight" in sd else None,
              "blocks": {}}
    if config.recipe == "2026":
        params["value_embeds"] = {}
    for name in list(sd):
        if m := _BLOCK.fullmatch(name):
            layer, part, leaf = m.groups()
            params["blocks"].setdefault(layer, {"attn": {}, "mlp": {}})[part][leaf] = sd.pop(name).T
        elif m := _VALUE_EMBED.fullmatch(name):
            params["value_embeds"][m.group(1)] = _pad_rows(sd.pop(name), V, name)
        elif name in _SCALARS:
            params[name] = sd.pop(name).reshape(-1)
        elif name == "smear_gate.weight":
            params["smear_gate"] = sd.pop(name).T
    if sd:
        raise UserError(f"unsupported nanochat checkpoint: unexpected keys {sorted(sd)[:5]}")
    _check_shapes(params, config)
    return params, config


def to_nanochat(params, config: ModelConfig) -> dict:
    """Our params -> nanochat state_dict names and layout (numpy fp32). Vocab rows stay padded for the 2026 recipe
    (nanochat 2026 pads them too) and are cut to `vocab_size` for 2025 (nanochat 2025 has no padding)."""
    rows = config.vocab_size if config.recipe == "2025" else config.padded_vocab_size
    sd = {"transformer.wte.weight": np.asarray(params["wte"])[:rows],
          "lm_head.weight": np.asarray(params["lm_head"]).T[:rows]}
    for layer, blk in params["blocks"].items():
        for part in ("attn", "mlp"):
            for leaf, w in blk[part].items():
                sd[f"transformer.h.{layer}.{part}.{leaf}.weight"] = np.asarray(w).T
    for layer, w in params.get("value_embeds", {}).items():
        sd[f"value_embeds.{layer}.weight"] = w
    for name in _SCALARS:
        if name in params:
            sd[name] = params[name]
    if "smear_gate" in params:
        sd["smear_gate.weight"] = np.asarray(params["smear_gate"]).T
    return {k: np.asarray(v, dtype=np.float32) for k, v in sd.items()}


def _check_shapes(params, config: ModelConfig):
    """Every leaf present with the shape init_params would give, else one UserError line."""
    want = jax.eval_shape(lambda: init_params(config, jax.random.PRNGKey(0)))
    want_flat = {jax.tree_util.keystr(p): s.shape for p, s in jax.tree_util.tree_leaves_with_path(want)}
    try:
        got_flat = {jax.tree_util.keystr(p): np.shape(a) for p, a in jax.tree_util.tree_leaves_with_path(params)}
    except Exception:  # e.g. None where wte/lm_head were missing
        got_flat = {}
    missing = sorted(set(want_flat) - set(got_flat))
    if missing:
        raise UserError(f"nanochat checkpoint lacks {len(missing)} tensors, e.g. {missing[0]} "
                        f"(is model_config right for these weights?)")
    extra = sorted(set(got_flat) - set(want_flat))
    if extra:
        raise UserError(f"nanochat checkpoint has tensors this config does not use, e.g. {extra[0]}")
    for k, shape in want_flat.items():
        if tuple(got_flat[k]) != tuple(shape):
            raise UserError(f"nanochat weight {k} has shape {tuple(got_flat[k])}, expected {tuple(shape)} "
                            f"for {config.nanochat_config()}")
