"""What the post-pretraining stages (mid_train, chat_sft, chat_rl) share: loading the checkpoint they start from,
building task mixtures that skip what cannot be had offline, the stage's optimizer and LR schedule, the output
directory, an approximate epoch length, and validation/accuracy hooks.

    params, config, tokenizer, meta, label = load_start(args)            # --source/--model-tag/--step/--checkpoint
    tasks, notes = build_tasks([("SmolTalk", "train", {}), ("identity", None, {}), ...])
    opt_cfg = stage_opt_config(args, config, "sft")                       # init_lr_frac, warmdown, final frac
"""

from __future__ import annotations

import dataclasses
import math
import random
from pathlib import Path

from nanochat_jax.core import sharding as shd
from nanochat_jax.core.common import UserError, get_base_dir, print0
from nanochat_jax.core.config import batch_lr_scale
from nanochat_jax.data.loader import sft_loader
from nanochat_jax.evaluation.chat_eval import run_categorical
from nanochat_jax.optim import OptConfig
from nanochat_jax.report import writer as report
from nanochat_jax.tasks import TaskDataUnavailable, get_task
from nanochat_jax.train.checkpoint import CheckpointManager, check_output_dir, checkpoint_dir
from nanochat_jax.train.load import load_model_from_args, resolve_checkpoint
from nanochat_jax.train.loop import Hook, MicroBatches, process_rows, resume_run, run_loop
from nanochat_jax.train.metrics import MetricsLogger
from nanochat_jax.train.step import make_eval_loss, setup_train

# ---------------------------------------------------------------------------------------------------------------
# Flags shared by the stage scripts


def add_source_args(p, default_source: str):
    p.add_argument("--source", default=default_source, help="base|mid|sft|rl: the stage whose checkpoint we start from")
    p.add_argument("--model-tag", default=None, help="the source run's tag (default: the newest)")
    p.add_argument("--step", type=int, default=None, help="the source checkpoint's step (default: the newest)")
    p.add_argument("--checkpoint", "--pretrained-checkpoint", dest="checkpoint", default=None,
                   help="start from this checkpoint/export directory instead of --source")


# (init_lr_frac, warmdown_ratio) per stage and recipe, from nanochat: mid (2025) keeps the base LRs and decays over
# the last 20%; SFT 2025 starts at 2% and decays linearly to 0, SFT 2026 at 80% with a 50% warmdown; RL at 5%.
STAGE_LR = {"mid": {"2025": (1.0, 0.2), "2026": (1.0, 0.2)},
            "sft": {"2025": (0.02, 1.0), "2026": (0.8, 0.5)},
            "rl": {"2025": (0.05, 1.0), "2026": (0.05, 1.0)}}


def add_optim_args(p, stage: str, final_lr_frac: float = 0.0):
    p.add_argument("--embedding-lr", type=float, default=None, help="AdamW LR of the embedding (default: recipe's)")
    p.add_argument("--unembedding-lr", type=float, default=None, help="AdamW LR of lm_head (default: recipe's)")
    p.add_argument("--matrix-lr", type=float, default=None, help="Muon LR (default: recipe's)")
    p.add_argument("--weight-decay", type=float, default=0.0, help="Muon weight decay (nanochat: 0 after pretraining)")
    lr = STAGE_LR[stage]
    p.add_argument("--init-lr-frac", type=float, default=None,
                   help=f"every LR is this fraction of the base LR (default: {lr['2025'][0]} for recipe 2025, "
                        f"{lr['2026'][0]} for 2026)")
    p.add_argument("--warmdown-ratio", type=float, default=None,
                   help=f"fraction of the steps in the final linear LR decay (default: {lr['2025'][1]} for 2025, "
                        f"{lr['2026'][1]} for 2026)")
    p.add_argument("--final-lr-frac", type=float, default=final_lr_frac, help="LR multiplier at the end")


def add_output_args(p):
    p.add_argument("--output-dir", default=None, help="checkpoint directory (default <base>/checkpoints/<stage>/<tag>)")
    p.add_argument("--model-tag-out", "--out-tag", dest="out_tag", default=None,
                   help="tag of this run's checkpoints (default: the source's tag, e.g. d20)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in the output dir")
    p.add_argument("--overwrite", action="store_true", help="delete the output dir's checkpoints and start over")
    p.add_argument("--save-every", type=int, default=-1, help="checkpoint every N steps (-1: only at the end)")
    p.add_argument("--keep-checkpoints", type=int, default=2, help="keep the newest N checkpoints")
    p.add_argument("--run", default=None, help="TensorBoard run name (default: the tag)")
    p.add_argument("--log-every", type=int, default=1, help="print a log line every N steps")
    p.add_argument("--mesh", default=None, help="e.g. data=8 (default: all devices on data)")
    p.add_argument("--sharding", choices=("dp", "fsdp", "tp"), default=None, help="dp | fsdp | tp")
    p.add_argument("--seed", type=int, default=42, help="data-order / sampling seed")


# ---------------------------------------------------------------------------------------------------------------
# The starting checkpoint

def load_start(args):
    """(params fp32, config, tokenizer, meta, label) from --checkpoint PATH or --source/--model-tag/--step."""
    params, config, tokenizer, meta = load_model_from_args(args)
    label = str(args.checkpoint) if args.checkpoint else f"{args.source}/{args.model_tag or 'newest'}"
    return params, config, tokenizer, meta, label


def source_tag(args, meta, config) -> str:
    """This run's tag: --model-tag-out, else the source run's tag (its directory's name, e.g. d20 or d4-cpu)."""
    if getattr(args, "out_tag", None):
        return args.out_tag
    if args.model_tag:
        return args.model_tag
    try:
        path = args.checkpoint or get_base_dir() / "checkpoints" / args.source
        _, run_dir, _ = resolve_checkpoint(path)
        return run_dir.name
    except UserError:
        return meta.get("model_tag") or f"d{config.n_layer}"


def output_dir(args, stage: str, tag: str) -> Path:
    return Path(args.output_dir).expanduser() if args.output_dir else checkpoint_dir(stage, tag)


# ---------------------------------------------------------------------------------------------------------------
# Tasks: a mixture of what is available

def build_tasks(specs, log=print0):
    """specs: [(name, split or None, kwargs)] for `tasks.get_task`. Returns (tasks, notes); a task whose data
    cannot be had (offline, not cached) is left out with a one-line note."""
    tasks, notes = [], []
    for name, split, kw in specs:
        try:
            task = get_task(name, split or "train", **dict(kw))
        except TaskDataUnavailable as e:
            note = f"{name}/{split or '-'}: skipped, data not available ({str(e).splitlines()[0][:160]})"
            notes.append(note)
            log(note)
            continue
        if len(task):
            tasks.append(task)
    return tasks, notes


def describe_mixture(tasks) -> str:
    counts = {}
    for t in tasks:
        counts[t.name] = counts.get(t.name, 0) + len(t)
    return ", ".join(f"{k} {v:,}" for k, v in counts.items())


def epoch_tokens(conversations, tokenizer, max_tokens: int, sample: int = 2000, seed: int = 0) -> int:
    """Tokens in one pass over `conversations` (each cut to max_tokens): exact up to `sample` conversations,
    else extrapolated from a random sample of that many."""
    n = len(conversations)
    idx = range(n) if n <= sample else random.Random(seed).sample(range(n), sample)
    total = sum(len(tokenizer.render_conversation(conversations[i], max_tokens=max_tokens)[0]) for i in idx)
    return total if n <= sample else round(total * n / sample)


# ---------------------------------------------------------------------------------------------------------------
# Optimizer for a stage

def stage_opt_config(args, config, stage: str, tokens_per_step: int | None = None):
    """nanochat's optimizer settings for the model's recipe, every LR times --init-lr-frac, no warmup, a linear
    decay over the last --warmdown-ratio of the steps to --final-lr-frac, and --weight-decay.

    2026 recipe: the LRs are also scaled by the batch size, √(tokens_per_step / 524,288), exactly as base_train
    scales them; otherwise a small-batch run (the CPU miniature) would finetune at ~10x its pretraining LR."""
    over = {k: getattr(args, k) for k in ("embedding_lr", "unembedding_lr", "matrix_lr")
            if getattr(args, k) is not None}
    frac_default, warmdown_default = STAGE_LR[stage][config.recipe]
    frac = frac_default if args.init_lr_frac is None else args.init_lr_frac
    warmdown = warmdown_default if args.warmdown_ratio is None else args.warmdown_ratio
    if not 0 < frac:
        raise UserError(f"--init-lr-frac must be > 0, got {frac}")
    if not 0 <= warmdown <= 1:
        raise UserError(f"--warmdown-ratio must be in [0, 1], got {warmdown}")
    if config.recipe == "2026" and tokens_per_step:
        frac *= batch_lr_scale(tokens_per_step)
    return OptConfig.for_recipe(config.recipe, **over, weight_decay=args.weight_decay, warmup_steps=0,
                                warmdown_ratio=warmdown, final_lr_frac=args.final_lr_frac, lr_scale=frac)


def make_mesh_and_mode(args):
    mesh = shd.make_mesh(args.mesh)
    mode = args.sharding or ("tp" if mesh.shape["model"] > 1 else "dp")
    return mesh, mode


def check_seq_len(args, config):
    """The stage's sequence length: --max-seq-len, at most the model's context."""
    T = args.max_seq_len or config.sequence_len
    if T > config.sequence_len:
        raise UserError(f"--max-seq-len {T} exceeds the model's context {config.sequence_len}")
    return T


def num_steps_for_epochs(tokens: int, tokens_per_step: int, epochs: float) -> int:
    return max(1, math.ceil(epochs * tokens / tokens_per_step))


def opt_summary(opt_cfg) -> dict:
    d = dataclasses.asdict(opt_cfg)
    return {k: d[k] for k in ("recipe", "matrix_lr", "embedding_lr", "unembedding_lr", "lr_scale", "weight_decay",
                              "warmdown_ratio", "final_lr_frac")}


# ---------------------------------------------------------------------------------------------------------------
# Hooks: masked validation loss, categorical accuracy

def val_loss_hook(config, tokenizer, mesh, param_sharding, val_convs, rows: int, T: int, steps: int):
    """fn(state, step) -> {"val/loss": Σ masked token losses / Σ tokens over `steps` batches of the val set}."""
    eval_fn = make_eval_loss(config, mesh, param_sharding)

    def fn(state, step):
        loader = sft_loader(val_convs, tokenizer, rows, T, shuffle=False, process_index=0, process_count=1)
        total = count = 0.0
        try:
            for _ in range(steps):
                b = next(loader)
                placed = shd.put_batch({"x": process_rows(b["inputs"]), "y": process_rows(b["targets"])}, mesh)
                s, c = eval_fn(state.params, placed["x"], placed["y"])
                total, count = total + float(s), count + float(c)
        finally:
            loader.close()
        if count == 0:   # e.g. every val row cropped before its first assistant token: no number, not 0
            print0(f"val loss: no unmasked tokens in {steps} batches of {rows} x {T}")
            return {"val/loss": float("nan")}
        return {"val/loss": total / count}
    return fn


def accuracy_hook(config, tokenizer, task_names, max_problems: int, batch_size: int = 16, log=print0):
    """fn(state, step) -> {"eval/<task>": accuracy} for the categorical tasks that are available (MMLU, ARC)."""
    tasks, _ = build_tasks([(n, "test", {}) for n in task_names], log=log)

    def fn(state, step):
        out = {}
        for t in tasks:
            correct, total = run_categorical(t, state.params, config, tokenizer, batch_size, max_problems)
            out[f"eval/{t.name}"] = correct / max(total, 1)
        return out
    return fn, [t.name for t in tasks]


# ---------------------------------------------------------------------------------------------------------------
# The mid/SFT run: conversations through the shared loop

def train_on_conversations(args, stage: str, section: str, start, train_ds, val_ds, notes=(),
                           accuracy_tasks=("MMLU", "ARC-Easy"), mesh=None, mode=None):
    """Train on conversations with the masked loss (loss only where the rendering mask is 1), resumable, with
    TensorBoard curves and a report section. start = load_start(...)'s tuple. Returns the loop's result.

    args needs: max_seq_len, device_batch_size, grad_accum, packing, num_iterations, num_epochs, seed, eval_every,
    eval_steps, eval_metrics_every, eval_metrics_max_problems, the optimizer flags and the output flags."""
    params, config, tokenizer, meta, label = start
    T = check_seq_len(args, config)
    if mesh is None:
        mesh, mode = make_mesh_and_mode(args)
    rows = args.device_batch_size * mesh.shape["data"]
    tokens_per_step = rows * T * args.grad_accum
    print0(f"{stage} from {label} (step {meta.get('step')}): d{config.n_layer}, {rows} rows x {T} tokens x "
           f"{args.grad_accum} micro-batches = {tokens_per_step:,} tokens/step, {mode} on {mesh.shape['data']} "
           f"data devices")
    num_steps = conversation_steps(args, train_ds, tokenizer, T, tokens_per_step)
    loader = sft_loader(train_ds, tokenizer, rows, T, packing=args.packing, seed=args.seed,
                        process_index=0, process_count=1)

    # -- output directory (after every input is checked: --overwrite deletes) -------------------------------------
    tag = source_tag(args, meta, config)
    out_dir = output_dir(args, stage, tag)
    resume_step = check_output_dir(out_dir, args.resume, args.overwrite, config)

    # -- optimizer, step, resume ----------------------------------------------------------------------------------
    opt_cfg = stage_opt_config(args, config, stage, tokens_per_step)
    state, shardings, step_fn = setup_train(params, config, opt_cfg, num_steps, mesh, mode)
    del params
    batches = MicroBatches(loader, args.grad_accum, mesh)
    ckpt = CheckpointManager(out_dir, max_to_keep=args.keep_checkpoints, tokenizer=tokenizer)
    state, loop_state, start_step, _ = resume_run(ckpt, state, batches, resume_step, num_steps)
    hooks = conversation_hooks(args, config, tokenizer, mesh, shardings.params, val_ds, rows, T, accuracy_tasks)
    logger = MetricsLogger(stage, args.run or tag)

    def meta_fn(step, loop):
        return {"model_config": config.to_dict(), "stage": stage, "model_tag": tag, "source": label,
                "num_iterations": num_steps, "val_loss": loop.results.get("val/loss"),
                "user_config": dict(vars(args))}

    try:
        result = run_loop(state, step_fn, batches, num_steps=num_steps, tokens_per_step=tokens_per_step,
                          start_step=start_step, loop_state=loop_state, hooks=hooks, ckpt=ckpt,
                          save_every=args.save_every, meta_fn=meta_fn, logger=logger, log_every=args.log_every)
    finally:
        ckpt.close()
        loader.close()
        logger.close()

    log_conversation_report(args, stage, section, result, label, len(train_ds), num_steps, tokens_per_step,
                            opt_cfg, out_dir, notes)
    return result


def conversation_steps(args, train_ds, tokenizer, T: int, tokens_per_step: int) -> int:
    """--num-iterations, else the steps of --num-epochs passes over the conversations (each cut to T + 1)."""
    if args.num_iterations > 0:
        return args.num_iterations
    ep_tokens = epoch_tokens(train_ds, tokenizer, T + 1)
    num_steps = num_steps_for_epochs(ep_tokens, tokens_per_step, args.num_epochs)
    print0(f"{args.num_epochs:g} epoch(s) ~ {ep_tokens * args.num_epochs:,.0f} tokens -> {num_steps} steps")
    return num_steps


def conversation_hooks(args, config, tokenizer, mesh, param_sharding, val_ds, rows: int, T: int, accuracy_tasks):
    """The val-loss hook (every --eval-every steps, when there is validation data) and the accuracy hook (every
    --eval-metrics-every steps, over the categorical tasks that are available)."""
    hooks = []
    if args.eval_every > 0 and val_ds is not None and len(val_ds):
        hooks.append(Hook("val loss", args.eval_every, val_loss_hook(
            config, tokenizer, mesh, param_sharding, val_ds, rows, T, args.eval_steps)))
    if args.eval_metrics_every > 0 and accuracy_tasks:
        acc_fn, acc_names = accuracy_hook(config, tokenizer, list(accuracy_tasks), args.eval_metrics_max_problems)
        if acc_names:
            hooks.append(Hook("accuracy", args.eval_metrics_every, acc_fn))
    return hooks


def log_conversation_report(args, stage: str, section: str, result, label: str, conversations: int, num_steps: int,
                            tokens_per_step: int, opt_cfg, out_dir, notes):
    """The stage's report section and its last line (steps, val loss, whether it stopped early)."""
    s = result.summary
    data = {"source": label, "data": getattr(args, "data_path", None) or "task mixture",
            "conversations": conversations, "steps": result.step, "of steps": num_steps,
            "tokens per step": tokens_per_step, "training time (min)": s["train seconds"] / 60,
            "final train loss": s.get("final train loss (smoothed)"), "val loss": s.get("val/loss"),
            "checkpoint": str(out_dir)}
    data.update({k.split("/", 1)[1] + " accuracy": v for k, v in s.items() if k.startswith("eval/")})
    data.update({f"optimizer {k}": v for k, v in opt_summary(opt_cfg).items()})
    report.log(section, [{k: v for k, v in data.items() if v is not None}] + [f"note: {n}" for n in notes])
    val = s.get("val/loss")
    print0(f"done: {result.step} {stage} steps" + (f", val loss {val:.4f}" if val is not None and math.isfinite(val)
                                                   else "") + (" (stopped early; --resume)" if result.stopped else ""))
