"""Loading a model for inference from Orbax checkpoints, and weights-only exports.

A weights-only export (`export_weights`) is one directory: `params/` (bf16 by default, no optimizer state),
`export.json` (meta + model_config) and `tokenizer/`.

`load_model_from_path(path)` accepts a run's directory (newest step), one step's directory, an
export, or a stage directory (newest tag); `load_model(source, model_tag, step)` finds the same under the base dir.
The tokenizer comes from the `tokenizer/` directory beside the checkpoints (else the base dir's), checked against
the fingerprint in the meta.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp

from nanochat_jax.core.common import UserError, clear_output_dir, get_base_dir, process_index
from nanochat_jax.core.config import ModelConfig
from nanochat_jax.data.tokenizer import Tokenizer, get_tokenizer
from nanochat_jax.train.checkpoint import (FORMAT, TOKENIZER_DIR, CheckpointManager, is_complete_step,
                                           orbax_checkpoint)
from nanochat_jax.train.checkpoint_tree import config_dict, params_target

STAGES = ("base", "mid", "sft", "rl")
EXPORT_META = "export.json"


# ---------------------------------------------------------------------------------------------------------------
# Weights-only export

def export_weights(out_dir, params, config, tokenizer=None, meta: dict | None = None, dtype="bfloat16",
                   overwrite: bool = False) -> Path:
    """Write params (cast to `dtype`; None keeps them), model config, meta and tokenizer files to `out_dir`."""
    ocp = orbax_checkpoint()
    out = clear_output_dir(out_dir, overwrite)
    out.mkdir(parents=True, exist_ok=True)
    if dtype is not None:
        dt = jnp.dtype(dtype)
        params = jax.tree.map(lambda x: x.astype(dt) if jnp.issubdtype(x.dtype, jnp.floating) else x, params)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(out / "params", params)
        ckptr.wait_until_finished()
    info = dict(meta or {})
    info.update(format=FORMAT, kind="export", model_config=config_dict(config),
                dtype=str(jnp.dtype(dtype)) if dtype is not None else "as saved")
    if tokenizer is not None:
        info["tokenizer_fingerprint"] = tokenizer.fingerprint()
    if process_index() == 0:
        if tokenizer is not None:
            tokenizer.save(out / TOKENIZER_DIR)
        (out / EXPORT_META).write_text(json.dumps(info, indent=2), encoding="utf-8")
    return out


def _load_export(path: Path, shardings=None):
    ocp = orbax_checkpoint()
    meta = json.loads((path / EXPORT_META).read_text(encoding="utf-8"))
    with ocp.StandardCheckpointer() as ckptr:
        md = ckptr.metadata(path / "params")
        md = getattr(md, "item_metadata", md)
        target = params_target(getattr(md, "tree", md), shardings)
        params = ckptr.restore(path / "params", target)
    return params, meta


# ---------------------------------------------------------------------------------------------------------------
# Loading a model for inference

def _load_tokenizer(run_dir: Path, meta: dict):
    """The tokenizer saved beside the checkpoints, else the base dir's (checked against the fingerprint)."""
    d = run_dir / TOKENIZER_DIR
    tok = Tokenizer.from_directory(d) if d.is_dir() else get_tokenizer()
    want = meta.get("tokenizer_fingerprint")
    if want and tok.fingerprint() != want:
        raise UserError(f"the tokenizer at {d if d.is_dir() else 'the base dir'} is not the one this model was "
                        f"trained with (fingerprint {tok.fingerprint()} != {want})")
    return tok


def _make_config(meta: dict):
    if not meta.get("model_config"):
        raise UserError("checkpoint meta has no model_config")
    return ModelConfig.from_dict(meta["model_config"])


def _is_run_dir(path: Path) -> bool:
    """A directory holding Orbax step directories (complete ones: they hold `_CHECKPOINT_METADATA`)."""
    return path.is_dir() and any(is_complete_step(p) for p in path.iterdir())


def _newest_subdir(path: Path) -> Path | None:
    """The most recently written tag directory under a stage directory."""
    cands = [p for p in path.iterdir() if p.is_dir() and (_is_run_dir(p) or (p / EXPORT_META).is_file())]
    if not cands:
        return None
    return max(cands, key=lambda p: max((q.stat().st_mtime for q in p.iterdir()), default=p.stat().st_mtime))


def resolve_checkpoint(path, step: int | None = None) -> tuple[str, Path, int | None]:
    """What `--checkpoint PATH` names: ('export', dir, None) or ('run', run dir, step)."""
    p = Path(path).expanduser().resolve()
    if not p.exists():
        raise UserError(f"checkpoint {path} does not exist")
    if (p / EXPORT_META).is_file():
        return "export", p, None
    if is_complete_step(p):
        if step is not None and int(step) != int(p.name):
            raise UserError(f"--step {step} contradicts the step directory {p}")
        return "run", p.parent, int(p.name)
    if _is_run_dir(p):
        return "run", p, step
    if p.is_dir():
        sub = _newest_subdir(p)
        if sub is not None:
            return resolve_checkpoint(sub, step)
    raise UserError(f"{path} is neither a checkpoint directory, a step directory, nor an export")


def load_model_from_path(path, step: int | None = None, shardings=None, dtype=jnp.float32):
    """(params, config, tokenizer, meta) from a run dir (newest step, or `step`), a step dir, or an export.

    Params come back on the first local device (or `shardings`) and, unless dtype=None, cast to `dtype`
    (float32: master-weight precision, which the model casts to the compute dtype itself).
    """
    kind, d, step = resolve_checkpoint(path, step)
    if kind == "export":
        params, meta = _load_export(d, shardings)
    else:
        mngr = CheckpointManager(d, max_to_keep=None, async_save=False)
        params, meta = mngr.restore_params(step, shardings)
        mngr.close()
    if dtype is not None:
        params = jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, params)
    return params, _make_config(meta), _load_tokenizer(d, meta), meta


def load_model_from_args(args, **kwargs):
    """(params, config, tokenizer, meta) for the model the flags name: `--checkpoint PATH` (with `--step`), else
    `--source` / `--model-tag` / `--step` under the base dir."""
    if getattr(args, "checkpoint", None):
        return load_model_from_path(args.checkpoint, step=args.step, **kwargs)
    return load_model(args.source, args.model_tag, args.step, **kwargs)


def load_model(source: str, model_tag: str | None = None, step: int | None = None, **kwargs):
    """(params, config, tokenizer, meta) of stage `source` (base|mid|sft|rl) under the base dir.

    model_tag None picks the most recently written tag; step None the newest step.
    """
    if source not in STAGES:
        raise UserError(f"--source must be one of {', '.join(STAGES)}, got {source!r}")
    stage_dir = get_base_dir() / "checkpoints" / source
    if model_tag is None:
        sub = _newest_subdir(stage_dir) if stage_dir.is_dir() else None
        if sub is None:
            raise UserError(f"no {source} checkpoints under {stage_dir}; train one first")
        path = sub
    else:
        path = stage_dir / model_tag
        if not path.exists():
            have = sorted(p.name for p in stage_dir.iterdir()) if stage_dir.is_dir() else []
            raise UserError(f"no {source} checkpoint tagged {model_tag!r} (have: {', '.join(have) or 'none'})")
    return load_model_from_path(path, step=step, **kwargs)
