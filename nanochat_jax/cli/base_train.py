"""Pretrain the base model: nanochat's base_train, on a JAX mesh.

    python -m scripts.base_train --config configs/d24.toml                 # the 2026 GPT-2 run (8 GPUs)
    python -m scripts.base_train --depth 20 --recipe 2025                  # nanochat's $100 tier
    python -m scripts.base_train --config configs/cpu.toml                 # tiny CPU example: d4, embedded corpus
    python -m scripts.base_train --data_path data/pretrain.txt --output_dir checkpoints/pretrain --d_model 256 \\
        --n_heads 4 --depth 4 --max-seq-len 256 --device-batch-size 8 --total-batch-size 4096 --num-iterations 200
    python -m scripts.base_train --config configs/cpu.toml --resume         # continue from the newest checkpoint

Several hosts: run the same command on each, with `--coordinator-address HOST:PORT --num-processes N
--process-id I` (or $JAX_COORDINATOR_ADDRESS, $JAX_NUM_PROCESSES, $JAX_PROCESS_ID). Every process reads the same
global batches and keeps its own rows, so the run is the same whatever the number of processes.

The tokenizer comes from `python -m scripts.tok_train` (<base dir>/tokenizer). --data_path is `shards` (the downloaded
pretraining shards, the default), `embedded` (English shipped with Python), or a .txt/.jsonl/.parquet file or
directory: it is tokenized once into <base dir>/pretok and reused. Checkpoints go to <base dir>/checkpoints/base/<tag>
(or --output_dir); TensorBoard events to <base dir>/tensorboard/base/<run>.
"""

import dataclasses
import math
from pathlib import Path

import jax
import numpy as np

from nanochat_jax import model
from nanochat_jax.core import config as cfg
from nanochat_jax.core import sharding as shd
from nanochat_jax.core.common import (ArgumentParser, UserError, compute_dtype, enable_compilation_cache, parse_args,
                                      print0, run_main)
from nanochat_jax.data.loader import pretrain_loader
from nanochat_jax.data.shards import ensure_pretokenized
from nanochat_jax.data.tokenizer import get_tokenizer
from nanochat_jax.evaluation import core as core_eval
from nanochat_jax.evaluation import greedy_samples, make_greedy_step, mini_bundle
from nanochat_jax.evaluation.bpb import evaluate_bpb, make_bpb_fn, one_pass_steps
from nanochat_jax.optim import OptConfig
from nanochat_jax.report import writer as report
from nanochat_jax.train.checkpoint import CheckpointManager, check_output_dir, checkpoint_dir
from nanochat_jax.train.loop import Hook, MicroBatches, process_rows, resume_run, run_loop
from nanochat_jax.train.metrics import MetricsLogger
from nanochat_jax.train.step import setup_train


# ---------------------------------------------------------------------------------------------------------------
# Arguments

def build_parser():
    p = ArgumentParser(description="Pretrain a base model", doc=__doc__)
    cfg.add_model_args(p, depth=20)
    # horizon (precedence: --num-iterations, --target-flops, --target-param-data-ratio)
    p.add_argument("--num-iterations", type=int, default=-1, help="optimizer steps (-1: derive)")
    p.add_argument("--target-flops", type=float, default=-1.0, help="training FLOPs budget (-1: off)")
    p.add_argument("--target-param-data-ratio", type=float, default=None,
                   help="tokens per scaling parameter (default: 20 for recipe 2025, 10.5 for 2026)")
    # batch
    p.add_argument("--device-batch-size", type=int, default=32, help="rows per device per micro-batch")
    p.add_argument("--total-batch-size", type=int, default=-1, help="tokens per optimizer step (-1: derive)")
    # optimizer (None: the recipe's default)
    p.add_argument("--embedding-lr", type=float, default=None, help="AdamW LR of the embedding (at width 768)")
    p.add_argument("--unembedding-lr", type=float, default=None, help="AdamW LR of lm_head (at width 768)")
    p.add_argument("--matrix-lr", type=float, default=None, help="Muon LR of the block matrices")
    p.add_argument("--scalar-lr", type=float, default=None, help="AdamW LR of the 2026 scalars")
    p.add_argument("--weight-decay", type=float, default=None, help="Muon weight decay (before its scaling)")
    p.add_argument("--warmup-steps", type=int, default=None, help="LR warmup steps")
    p.add_argument("--warmdown-ratio", type=float, default=None, help="fraction of the steps in LR warmdown")
    p.add_argument("--final-lr-frac", type=float, default=None, help="LR multiplier at the end of the warmdown")
    # evaluation
    p.add_argument("--eval-every", type=int, default=250, help="val bpb every N steps (-1: never)")
    p.add_argument("--eval-tokens", type=int, default=20 * 524288,
                   help="tokens per val bpb evaluation (at most one pass over the validation split)")
    p.add_argument("--core-metric-every", type=int, default=2000, help="CORE every N steps (-1: never)")
    p.add_argument("--core-metric-max-per-task", type=int, default=500, help="CORE items per task (-1: all)")
    p.add_argument("--core-bundle-dir", default=None,
                   help="CORE eval bundle dir (default: <base dir>/eval_bundle, downloaded); 'mini': the small "
                        "offline bundle")
    p.add_argument("--sample-every", type=int, default=2000, help="greedy samples every N steps (-1: never)")
    # checkpoints and output
    p.add_argument("--save-every", type=int, default=-1, help="checkpoint every N steps (-1: only at the end)")
    p.add_argument("--keep-checkpoints", type=int, default=3, help="keep the newest N checkpoints")
    p.add_argument("--model-tag", default=None, help="checkpoint tag (default d<depth>)")
    p.add_argument("--output-dir", default=None,
                   help="checkpoint directory (default <base dir>/checkpoints/base/<tag>)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in the output dir")
    p.add_argument("--resume-from-step", type=int, default=None, help="continue from this step's checkpoint")
    p.add_argument("--overwrite", action="store_true", help="delete the output dir's checkpoints and start over")
    p.add_argument("--run", default=None, help="TensorBoard run name (default: the model tag)")
    p.add_argument("--log-every", type=int, default=1, help="print a log line every N steps")
    # data and devices
    p.add_argument("--data-path", default="shards", help="shards | embedded | a .txt/.jsonl/.parquet file or dir")
    p.add_argument("--loader-workers", type=int, default=0, help="grain worker processes (0: in this process)")
    p.add_argument("--mesh", default=None, help="e.g. data=8 or data=4,model=2 (default: all devices on data)")
    p.add_argument("--sharding", choices=("dp", "fsdp", "tp"), default=None,
                   help="dp | fsdp | tp (default: tp when the mesh has a model axis, else dp)")
    p.add_argument("--seed", type=int, default=42, help="init and data-order seed")
    p.add_argument("--coordinator-address", default=None, help="multi-host: HOST:PORT of process 0")
    p.add_argument("--num-processes", type=int, default=None, help="multi-host: number of processes")
    p.add_argument("--process-id", type=int, default=None, help="multi-host: this process's id")
    return p


# ---------------------------------------------------------------------------------------------------------------
# The plan: everything derived from the flags, checked before anything is written

@dataclasses.dataclass
class Plan:
    config: object
    total_batch: int
    device_batch: int
    seq_len: int
    data_devices: int
    accum: int
    num_steps: int
    flops_per_token: int
    ratio: float | None

    @property
    def rows(self) -> int:            # rows of one global micro-batch
        return self.device_batch * self.data_devices

    def describe(self) -> str:
        c = self.config
        fwd = self.rows * self.seq_len
        return "\n".join([
            cfg.describe(c, self.total_batch, self.num_steps, param_data_ratio=self.ratio),
            f"batch: {self.device_batch} rows/device x {self.seq_len} tokens x {self.data_devices} data devices = "
            f"{fwd:,} tokens/micro-batch; x {self.accum} accumulation = {self.total_batch:,} tokens/step",
            f"horizon: {self.num_steps:,} steps = {self.num_steps * self.total_batch:,} tokens "
            f"({self.num_steps * self.total_batch / cfg.scaling_params(c):.2f} tokens/scaling param)",
            f"FLOPs budget: {self.flops_per_token * self.total_batch * self.num_steps:.3e} "
            f"({self.flops_per_token:.3e}/token)",
        ])


def make_plan(args, config, data_devices: int) -> Plan:
    """Batch and horizon from the flags; UserError when the total batch is not a multiple of one micro-batch."""
    T = config.sequence_len
    if args.device_batch_size < 1:
        raise UserError(f"--device-batch-size must be >= 1, got {args.device_batch_size}")
    total = args.total_batch_size if args.total_batch_size > 0 else cfg.total_batch_size(
        config, args.target_param_data_ratio)
    fwd = args.device_batch_size * T * data_devices
    if total % fwd:
        raise UserError(f"--total-batch-size {total:,} is not a multiple of --device-batch-size "
                        f"{args.device_batch_size} x seq len {T} x {data_devices} data devices = {fwd:,} tokens")
    steps = cfg.num_iterations(config, total, args.num_iterations, args.target_flops, args.target_param_data_ratio)
    return Plan(config, total, args.device_batch_size, T, data_devices, total // fwd, steps,
                cfg.flops_per_token(config), args.target_param_data_ratio)


def make_opt_config(args, plan: Plan):
    """nanochat's optimizer settings for the recipe, the flags' overrides, and the 2026 batch/data scalings."""
    c = plan.config
    over = {k: getattr(args, k) for k in ("embedding_lr", "unembedding_lr", "matrix_lr", "scalar_lr",
                                          "weight_decay", "warmup_steps", "warmdown_ratio", "final_lr_frac")
            if getattr(args, k) is not None}
    base = OptConfig.for_recipe(c.recipe, **over)
    if c.recipe == "2025":   # the 2025 recipe trains at a fixed 524,288-token batch: no scaling
        return base
    return dataclasses.replace(base, lr_scale=cfg.batch_lr_scale(plan.total_batch),
                               weight_decay=base.weight_decay * cfg.weight_decay_scale(c, plan.total_batch,
                                                                                       plan.ratio))


# ---------------------------------------------------------------------------------------------------------------
# Evaluation hooks

def val_batches(val_shards, tokenizer, plan: Plan):
    """The validation stream: global (rows, T) batches in corpus order (repeating; a split smaller than one batch
    is read anyway: nanochat's embedded-corpus miniature holds out only ~3k tokens)."""
    return pretrain_loader(val_shards, plan.rows, plan.seq_len, tokenizer.get_bos_token_id(), shuffle=False,
                           fingerprint=tokenizer.fingerprint(), require_full_batch=False, process_index=0,
                           process_count=1)


def core_bundle(args):
    """The CORE bundle directory, downloaded or built now (at start-up, so that a failure is not mid-run)."""
    if args.core_bundle_dir == "mini":
        return mini_bundle.ensure_mini_bundle()
    if args.core_bundle_dir:
        if not (Path(args.core_bundle_dir) / "core.yaml").is_file():
            raise UserError(f"--core-bundle-dir {args.core_bundle_dir}: not an eval bundle (no core.yaml)")
        return Path(args.core_bundle_dir)
    return core_eval.download_eval_bundle()


def make_hooks(args, plan: Plan, tokenizer, val_shards, mesh, bundle=None):
    """Val bpb every --eval-every steps, CORE every --core-metric-every, greedy samples every --sample-every."""
    config = plan.config
    probe = val_batches(val_shards, tokenizer, plan)
    eval_steps, cut = one_pass_steps(args.eval_tokens, plan.rows, plan.seq_len, probe.pass_batches, "--eval-tokens")
    probe.close()
    if cut and args.eval_every > 0:
        print0(f"val bpb: {cut}")
    token_bytes = tokenizer.token_bytes()
    bpb_fn = make_bpb_fn(config)

    def put(x):
        return shd.put_batch({"x": process_rows(np.asarray(x))}, mesh)["x"]

    def val_bpb(state, step):
        loader = val_batches(val_shards, tokenizer, plan)
        try:
            return {"val/bpb": evaluate_bpb(state.params, loader, token_bytes, steps=eval_steps, put=put,
                                            bpb_fn=bpb_fn)}
        finally:
            loader.close()

    greedy = make_greedy_step(config)

    def samples(state, step):
        return {"samples": "\n".join(greedy_samples(state.params, config, tokenizer, step_fn=greedy))}

    def core(state, step):
        r = core_eval.evaluate_core(state.params, config, tokenizer, max_per_task=args.core_metric_max_per_task,
                          bundle_dir=bundle)
        out = {"core/metric": r["core_metric"]}
        out.update({f"core/{k}": v for k, v in r["centered_results"].items()})
        return out

    return [Hook("val bpb", args.eval_every, val_bpb), Hook("CORE", args.core_metric_every, core),
            Hook("samples", args.sample_every, samples)]


# ---------------------------------------------------------------------------------------------------------------
# Main

def main(argv=None):
    args = parse_args(build_parser(), "base_train", argv)
    if args.resume_from_step is not None:
        args.resume = True

    # -- compute set-up (before anything touches a device) ----------------------------------------------------------
    shd.init_distributed(args.coordinator_address, args.num_processes, args.process_id)
    enable_compilation_cache()

    # -- tokenizer, model config, mesh, batch plan ------------------------------------------------------------------
    tokenizer = get_tokenizer()
    config = cfg.config_from_args(args, tokenizer.get_vocab_size())
    if config.vocab_size < tokenizer.get_vocab_size():
        raise UserError(f"--vocab-size {config.vocab_size} is smaller than the tokenizer's "
                        f"{tokenizer.get_vocab_size()}")
    mesh = shd.make_mesh(args.mesh)
    mode = args.sharding or ("tp" if mesh.shape["model"] > 1 else "dp")
    plan = make_plan(args, config, mesh.shape["data"])
    opt_cfg = make_opt_config(args, plan)
    print0(plan.describe())
    print0(f"{shd.describe(mesh, mode)} | {jax.process_count()} process(es) | compute {compute_dtype()}")
    print0(f"optimizer: {opt_cfg}")

    # -- data (a missing path fails here, before the output dir is touched) -----------------------------------------
    train_shards, val_shards = ensure_pretokenized(args.data_path, tokenizer)
    if not train_shards or not val_shards:
        raise UserError(f"{args.data_path}: needs both a train and a validation split")
    loader = pretrain_loader(train_shards, plan.rows, plan.seq_len, tokenizer.get_bos_token_id(), seed=args.seed,
                             fingerprint=tokenizer.fingerprint(), num_workers=args.loader_workers,
                             process_index=0, process_count=1)
    bundle = core_bundle(args) if args.core_metric_every > 0 else None

    # -- output directory: refuse to clobber, resume when asked -----------------------------------------------------
    tag = args.model_tag or f"d{config.n_layer}"
    out_dir = Path(args.output_dir).expanduser() if args.output_dir else checkpoint_dir("base", tag)
    resume_step = check_output_dir(out_dir, args.resume, args.overwrite, config)
    if args.resume_from_step is not None:
        resume_step = args.resume_from_step

    # -- model, optimizer, train step, resume -----------------------------------------------------------------------
    params = model.init_params(config, jax.random.PRNGKey(args.seed))
    state, _, step_fn = setup_train(params, config, opt_cfg, plan.num_steps, mesh, mode)
    del params
    ckpt = CheckpointManager(out_dir, max_to_keep=args.keep_checkpoints, tokenizer=tokenizer)
    batches = MicroBatches(loader, plan.accum, mesh)
    state, loop_state, start, _ = resume_run(ckpt, state, batches, resume_step, plan.num_steps,
                                             fallback=args.resume_from_step is None)

    # -- the loop ---------------------------------------------------------------------------------------------------
    logger = MetricsLogger("base", args.run or tag)
    hooks = make_hooks(args, plan, tokenizer, val_shards, mesh, bundle)

    def meta_fn(step, loop):
        return {"model_config": config.to_dict(), "opt_config": dataclasses.asdict(opt_cfg),
                "val_bpb": loop.results.get("val/bpb"), "num_iterations": plan.num_steps,
                "total_batch_size": plan.total_batch, "device_batch_size": plan.device_batch,
                "user_config": {k: v for k, v in vars(args).items()}}

    result = run_loop(state, step_fn, batches, num_steps=plan.num_steps, tokens_per_step=plan.total_batch,
                      start_step=start, loop_state=loop_state, flops_per_token=plan.flops_per_token, hooks=hooks,
                      ckpt=ckpt, save_every=args.save_every, meta_fn=meta_fn, logger=logger,
                      log_every=args.log_every)
    ckpt.close()
    loader.close()
    logger.close()
    log_report(config, plan, result, out_dir)
    return result


def log_report(config, plan: Plan, result, out_dir):
    """The "Base model training" report section and the run's last line."""
    s = result.summary
    section = {"parameters": cfg.num_params(config)["total"], "depth": config.n_layer, "recipe": config.recipe,
               "total batch size": plan.total_batch, "steps": result.step, "of steps": plan.num_steps,
               "tokens": s["tokens"], "training time (min)": s["train seconds"] / 60,
               "final train loss": s.get("final train loss (smoothed)"), "val bpb": s.get("val/bpb"),
               "CORE": s.get("core/metric"), "MFU (%)": s.get("MFU (%)"),
               "throughput (tok/s)": s.get("throughput (tok/s)"),
               "peak device memory (GiB)": s.get("peak device memory (GiB)"), "checkpoint": str(out_dir)}
    report.log("Base model training", {k: v for k, v in section.items() if v is not None})
    val = s.get("val/bpb")
    print0(f"done: {result.step} steps, {s['train seconds'] / 60:.2f} min training"
           + (f", val bpb {val:.4f}" if val is not None and math.isfinite(val) else "")
           + (" (stopped early; resume with --resume)" if result.stopped else ""))


if __name__ == "__main__":
    run_main(main)
