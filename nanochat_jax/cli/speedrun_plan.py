"""What run_speedrun.sh needs from a preset, derived for a number of GPUs, as shell variable assignments.

    python -m scripts.speedrun_plan --preset d24 --gpus 8      # the 8-GPU plan of configs/d24.toml
    python -m scripts.speedrun_plan --preset cpu               # the CPU miniature
    eval "$(python -m scripts.speedrun_plan --preset d24 --gpus 1)"

A preset (configs/<name>.toml) holds one table per script, plus a [speedrun] table for the pipeline itself:
    gpus = 8                 # the node the batch sizes were written for (0: a CPU preset)
    dataset = "climbmix-400b" # pretraining shards ($NANOCHAT_DATASET); "" = none (the corpus is in the tables)
    shards = 170             # shards to download in all (0: no download)
    tokenizer_shards = 8     # shards fetched first, for the tokenizer; the rest download while it trains
    rl = false               # run chat_rl and its evaluation without --rl
    offline = false          # true: no task-data downloads (NANOCHAT_OFFLINE=1; cached and packaged data only)
On G GPUs instead of the preset's gpus, the total batch stays: base_train derives its accumulation from the
device count (the device batch only shrinks when the total batch is not a multiple of it), and the chat stages'
--grad-accum grows by gpus/G. Nothing here imports JAX or touches a device.
"""

import math
import shlex
import tomllib
from pathlib import Path

from nanochat_jax.core.common import ArgumentParser, UserError, load_preset, parse_args, run_main

REPO = Path(__file__).resolve().parents[2]
SPEEDRUN_DEFAULTS = {"gpus": 8, "dataset": "", "shards": 0, "tokenizer_shards": 8, "rl": False, "offline": False}
VOCAB_DEFAULT = 65536   # tok_train's default


def preset_path(name: str) -> Path:
    """`cpu` -> configs/cpu.toml; a path to a .toml file is taken as it is."""
    p = Path(name)
    if p.suffix == ".toml" and p.is_file():
        return p.resolve()
    q = REPO / "configs" / f"{p.stem if p.suffix == '.toml' else name}.toml"
    if not q.is_file():
        known = ", ".join(sorted(x.stem for x in (REPO / "configs").glob("*.toml")))
        raise UserError(f"preset {name!r} not found (known: {known}, or a path to a .toml file)")
    return q


def speedrun_table(path: Path) -> dict:
    table = dict(SPEEDRUN_DEFAULTS)
    extra = tomllib.loads(path.read_text(encoding="utf-8")).get("speedrun", {})
    unknown = sorted(set(extra) - set(SPEEDRUN_DEFAULTS))
    if unknown:
        raise UserError(f"preset {path} [speedrun]: unknown keys {', '.join(unknown)}")
    table.update(extra)
    return table


def base_plan(path: Path, gpus: int):
    """(extra flags, plan text, tag) of base_train on `gpus` devices (at least 1: a CPU is one device)."""
    # on call: base_train imports JAX, which the rest of the plan does not need
    from nanochat_jax.cli import base_train
    from nanochat_jax.core import config as cfg
    args = parse_args(base_train.build_parser(), "base_train", ["--config", str(path)])
    vocab = load_preset(path, "tok_train").get("vocab_size", VOCAB_DEFAULT)
    config = cfg.config_from_args(args, vocab)
    n = max(1, gpus)
    flags = []
    total = args.total_batch_size if args.total_batch_size > 0 else cfg.total_batch_size(
        config, args.target_param_data_ratio)
    db = args.device_batch_size
    while db > 1 and total % (db * config.sequence_len * n):
        db -= 1   # keep the total batch: the largest device batch that divides it
    if total % (db * config.sequence_len * n):
        raise UserError(f"total batch {total:,} tokens cannot be split over {n} devices x {config.sequence_len}")
    if db != args.device_batch_size:
        flags.append(f"--device-batch-size {db}")
        args.device_batch_size = db
    plan = base_train.make_plan(args, config, n)
    p = cfg.num_params(config)["total"]
    text = (f"d{config.n_layer} ({config.recipe} recipe, {p / 1e6:,.1f}M params, vocab {vocab:,}, context "
            f"{config.sequence_len}): {plan.device_batch} rows/device x {config.sequence_len} x {n} device(s) = "
            f"{plan.rows * plan.seq_len:,} tokens/micro-batch, x {plan.accum} accumulation = "
            f"{plan.total_batch:,} tokens/step; {plan.num_steps:,} steps = {plan.num_steps * plan.total_batch:,} "
            f"tokens ({plan.flops_per_token * plan.total_batch * plan.num_steps:.2e} FLOPs)")
    tag = args.model_tag or f"d{config.n_layer}"
    return flags, text, tag, plan


def chat_plan(path: Path, section: str, ref_gpus: int, gpus: int):
    """(extra flags, plan text) of a chat stage: --grad-accum scaled so that the rows per step stay."""
    t = load_preset(path, section)
    if not t:
        return [], ""
    if section == "chat_rl":
        return [], ""
    db, accum = t.get("device_batch_size", 8 if section == "mid_train" else 4), t.get("grad_accum", 1)
    flags = []
    n = max(1, gpus)
    if ref_gpus > 0 and n != ref_gpus:
        rows = db * accum * ref_gpus
        if rows % n:
            raise UserError(f"[{section}]: {rows} rows/step do not split over {n} GPUs")
        per = rows // n
        new_accum = max(1, math.ceil(per / db))
        while per % new_accum:
            new_accum += 1
        if per // new_accum != db:
            flags.append(f"--device-batch-size {per // new_accum}")
        db, accum = per // new_accum, new_accum
        flags.append(f"--grad-accum {accum}")
    text = f"{db} rows/device x {n} device(s) x {accum} accumulation = {db * n * accum} rows/step"
    return flags, text


# ---------------------------------------------------------------------------------------------------------------

def build_parser():
    p = ArgumentParser(description="The speedrun's derived settings for a preset, as shell assignments",
                        doc=__doc__)
    p.add_argument("--preset", default="cpu", help="a configs/ name (cpu, d20, d24, d26, d32) or a .toml path")
    p.add_argument("--gpus", type=int, default=None, help="GPUs to plan for (default: the preset's [speedrun] gpus)")
    return p


def main(argv=None):
    args = parse_args(build_parser(), "speedrun_plan", argv)
    path = preset_path(args.preset)
    sr = speedrun_table(path)
    gpus = sr["gpus"] if args.gpus is None else args.gpus
    if gpus < 0:
        raise UserError(f"--gpus must be >= 0, got {gpus}")
    base_flags, base_text, tag, plan = base_plan(path, gpus)
    out = {"PRESET_FILE": str(path), "PRESET_NAME": path.stem, "REF_GPUS": sr["gpus"], "PLAN_GPUS": gpus,
           "DATASET": sr["dataset"], "SHARDS": sr["shards"], "TOK_SHARDS": min(sr["tokenizer_shards"], sr["shards"]),
           "RL_DEFAULT": int(bool(sr["rl"])), "OFFLINE": int(bool(sr["offline"])), "TAG": tag, "BASE_FLAGS": " ".join(base_flags),
           "BASE_PLAN": base_text, "BASE_STEPS": plan.num_steps, "BASE_ACCUM": plan.accum}
    for section, key in (("mid_train", "MID"), ("chat_sft", "SFT")):
        flags, text = chat_plan(path, section, sr["gpus"], gpus)
        out[f"{key}_FLAGS"], out[f"{key}_PLAN"] = " ".join(flags), text
    for k, v in out.items():
        print(f"{k}={shlex.quote(str(v))}")
    return out


if __name__ == "__main__":
    run_main(main)
