"""Reinforcement learning on GSM8K: nanochat's simplified GRPO (REINFORCE with a mean baseline, on policy).

    python -m scripts.chat_rl                                    # from the newest SFT checkpoint, one epoch
    python -m scripts.chat_rl --examples-per-step 16 --num-samples 16 --device-batch-size 8
    python -m scripts.chat_rl --checkpoint ckpt/sft --output-dir ckpt/rl --num-iterations 100
    python -m scripts.chat_rl --resume                           # continue the run in the output dir

Tiny CPU example (after the miniature's SFT):
    python -m scripts.chat_rl --num-iterations 4 --examples-per-step 2 --num-samples 4 --max-new-tokens 32 \\
        --eval-every 2 --eval-examples 4

Each step: for each of --examples-per-step problems, the engine samples --num-samples completions; the reward is
1 for an exact `####` answer (the task's `reward`); the advantage is r - mean(r) over the problem's samples; the
loss is -Σ adv · log p(token) / Σ tokens over the sampled tokens of the whole step (prompt, forced tool output and
padding masked); one optimizer update. pass@1..k on the test problems every --eval-every steps.
Offline, where GSM8K's train split cannot be had, the packaged GSM8K sample is split into train and test (noted
in the report); `--task SpellingBee` trains on the synthetic spelling task instead.
Checkpoints: <base>/checkpoints/rl/<tag>; curves: <base>/tensorboard/rl/<run>; a "Chat RL" report section.
"""

from __future__ import annotations

import math
import time

from nanochat_jax.core.common import ArgumentParser, UserError, enable_compilation_cache, parse_args, print0, run_main
from nanochat_jax.stages import finetune as ft

STAGE = "rl"


# ---------------------------------------------------------------------------------------------------------------
# Arguments

def build_parser():
    p = ArgumentParser(description="Chat RL (GRPO-style) on GSM8K")
    ft.add_source_args(p, default_source="sft")
    p.add_argument("--task", choices=("GSM8K", "SpellingBee"), default="GSM8K", help="the rewarded task")
    p.add_argument("--num-epochs", type=float, default=1.0, help="passes over the train problems")
    p.add_argument("--num-iterations", type=int, default=-1, help="optimizer steps (-1: --num-epochs)")
    p.add_argument("--examples-per-step", type=int, default=16, help="problems per optimizer step")
    p.add_argument("--num-samples", type=int, default=16, help="sampled completions per problem")
    p.add_argument("--device-batch-size", type=int, default=8, help="rows per device per forward/backward")
    p.add_argument("--max-new-tokens", type=int, default=256, help="generation budget per completion")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
    p.add_argument("--top-k", type=int, default=50, help="top-k sampling (0: off)")
    ft.add_optim_args(p, "rl")   # nanochat RL: LR x0.05, linear decay to 0
    p.add_argument("--eval-every", type=int, default=60, help="pass@k every N steps (-1: never)")
    p.add_argument("--eval-examples", type=int, default=400, help="test problems in the pass@k evaluation")
    p.add_argument("--eval-samples", type=int, default=8, help="k of pass@k (samples per test problem)")
    ft.add_output_args(p)
    return p


def load_tasks(args, log=print0):
    """(train task, test task, notes). GSM8K train unavailable -> the packaged sample split in two."""
    from nanochat_jax.tasks import GSM8K, TaskDataUnavailable, get_task
    if args.task == "SpellingBee":
        return get_task("SpellingBee", "train", size=8000), get_task("SpellingBee", "test", size=400), []
    notes = []
    try:
        train_task = get_task("GSM8K", "train")
    except TaskDataUnavailable as e:
        test = get_task("GSM8K", "test")   # raises TaskDataUnavailable (a UserError) when nothing is there either
        half = len(test) // 2
        train_task, test_task = GSM8K(rows=test.rows[half:]), GSM8K(rows=test.rows[:half])
        notes.append(f"GSM8K train not available ({str(e)[:120]}); trained on {len(train_task)} and evaluated on "
                     f"{len(test_task)} problems of the GSM8K test sample instead")
        log(notes[-1])
        return train_task, test_task, notes
    return train_task, get_task("GSM8K", "test"), notes


# ---------------------------------------------------------------------------------------------------------------
# Main

def main(argv=None):
    args = parse_args(build_parser(), "chat_rl", argv)
    for name in ("examples_per_step", "num_samples", "device_batch_size", "max_new_tokens", "eval_samples"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1")
    enable_compilation_cache()
    import jax
    import numpy as np

    # -- model, tasks, mesh ---------------------------------------------------------------------------------------
    params, config, tokenizer, meta, label = ft.load_start(args)
    train_task, test_task, notes = load_tasks(args)
    mesh, mode = ft.make_mesh_and_mode(args)
    data = mesh.shape["data"]
    rows_per_step = args.examples_per_step * args.num_samples
    accum = max(1, -(-rows_per_step // (args.device_batch_size * data)))
    num_steps = args.num_iterations if args.num_iterations > 0 else \
        max(1, int(len(train_task) * args.num_epochs) // args.examples_per_step)
    print0(f"RL from {label} (step {meta.get('step')}) on {train_task.name}: {len(train_task):,} train problems, "
           f"{args.examples_per_step} x {args.num_samples} samples = {rows_per_step} rows/step in {accum} "
           f"micro-batches, {num_steps} steps")

    # -- output directory -----------------------------------------------------------------------------------------
    from nanochat_jax.train.checkpoint import CheckpointManager, check_output_dir
    tag = ft.source_tag(args, meta, config)
    out_dir = ft.output_dir(args, STAGE, tag)
    resume_step = check_output_dir(out_dir, args.resume, args.overwrite, config)

    # -- optimizer, step, engine ----------------------------------------------------------------------------------
    from nanochat_jax import optim
    from nanochat_jax.stages import rl
    from nanochat_jax.train import loop as train
    from nanochat_jax.infer.engine import Engine
    opt_cfg = ft.stage_opt_config(args, config, STAGE)
    tx = optim.build_optimizer(params, config, opt_cfg, num_steps, mesh=mesh)
    state, shardings = train.init_train_state(params, tx, mesh, mode)
    del params
    rl_step = rl.make_rl_step(config, tx, mesh, shardings, lr_fn=optim.lr_multiplier(opt_cfg, num_steps))
    ckpt = CheckpointManager(out_dir, max_to_keep=args.keep_checkpoints, tokenizer=tokenizer)
    start, cursor, history = 0, 0, {}
    if resume_step is not None:
        state, loader_state, m = ckpt.restore(state, resume_step, fallback=True)
        start, cursor = int(m.get("step", resume_step)), int((loader_state or {}).get("cursor", 0))
        history = m.get("history") or {}
        print0(f"resumed from {out_dir}/{start} (next problem {cursor})")
    device0 = jax.local_devices()[0]

    def engine_params(p):
        """The policy's params on this process's first device, for the engine (gathered across hosts)."""
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            p = multihost_utils.process_allgather(p, tiled=True)
        return jax.device_put(p, device0)

    engine = Engine(engine_params(state.params), config, tokenizer,
                    max_batch=max(args.num_samples, args.eval_samples, 16))
    pad_id = tokenizer.encode_special("<|assistant_end|>")
    top_k = args.top_k or None

    from nanochat_jax.train.metrics import MetricsLogger
    from nanochat_jax.core import sharding as shd
    logger = MetricsLogger(STAGE, args.run or tag)
    rewards_seen, passk = history.get("rewards", []), history.get("passk") or {}
    t_train = history.get("train_seconds", 0.0)

    def evaluate(step):
        t0 = time.time()
        r = rl.evaluate_pass_at_k(engine, tokenizer, test_task, args.eval_examples, args.eval_samples,
                                  args.max_new_tokens, temperature=1.0, top_k=top_k, seed=10_000 + step)
        logger.scalars({f"eval/pass@{k}": v for k, v in r.items()}, step)
        print0(f"step {step:05d} | " + ", ".join(f"pass@{k} {v:.4f}" for k, v in r.items())
               + f" | {min(args.eval_examples, len(test_task))} problems in {time.time() - t0:.1f}s")
        return {str(k): v for k, v in r.items()}

    def save(step, force=False):
        ckpt.save(step, state, {"cursor": cursor},
                  {"model_config": config.to_dict(), "stage": STAGE, "model_tag": tag, "source": label,
                   "num_iterations": num_steps,
                   "history": {"rewards": rewards_seen, "passk": passk, "train_seconds": t_train},
                   "user_config": dict(vars(args))}, force=force)

    # -- the loop (on policy: every rollout uses the params of the step it trains) --------------------------------
    from nanochat_jax.train.stop import StopRequest
    pi, pc = jax.process_index(), jax.process_count()

    def local_rows(batch):
        """Every process samples the same rollouts (same params and seeds); each feeds its own share of rows."""
        if pc == 1:
            return batch
        n = batch["inputs"].shape[1] // pc
        return {k: v[:, pi * n:(pi + 1) * n] for k, v in batch.items()}

    stop = StopRequest().install()
    step, stopped = start, False
    try:
        while True:
            if args.eval_every > 0 and (step % args.eval_every == 0 or step == num_steps) and \
                    not (step == start and resume_step is not None and step < num_steps):
                passk = evaluate(step)
            if step >= num_steps:
                break
            if stop.requested:
                stopped = True
                break
            if args.save_every > 0 and step > start and step % args.save_every == 0:
                save(step)
            t0 = time.time()
            rolls = []
            for _ in range(args.examples_per_step):
                idx = cursor % len(train_task)
                rolls.append(rl.rollout(engine, tokenizer, train_task, idx, args.num_samples, args.max_new_tokens,
                                        args.temperature, top_k, seed=hash((step, idx)) & 0x7FFFFFFF))
                cursor += 1
            batch = rl.rollout_batch(rolls, pad_id, rows_multiple=math.lcm(data, pc), accum=accum,
                                     max_len=config.sequence_len)
            state, metrics = rl_step(state, shd.put_batch(local_rows(batch), mesh))
            engine.params = engine_params(state.params)
            m = {k: float(v) for k, v in jax.device_get(metrics).items()}
            step += 1
            dt = time.time() - t0
            if step - start > 1:   # each process's first step compiles: not timed
                t_train += dt
            reward = float(np.mean([r.rewards.mean() for r in rolls]))
            seq_len = float(np.mean([len(s) - r.prompt_len for r in rolls for s in r.sequences]))
            rewards_seen.append(reward)
            logger.scalars({"train/reward": reward, "train/loss": m["loss"], "train/lrm": m["lr"],
                            "train/grad_norm": m["grad_norm"], "train/completion_len": seq_len,
                            "train/dt_ms": dt * 1000}, step)
            if step % args.log_every == 0 or step == num_steps:
                print0(f"step {step:05d}/{num_steps:05d} | reward {reward:.4f} | loss {m['loss']:.6f} | "
                       f"lrm {m['lr']:.3f} | completion {seq_len:.1f} tokens | dt {dt * 1000:.0f}ms")
        save(step, force=True)
    finally:
        stop.uninstall()
        ckpt.close()
        logger.close()

    # -- report ---------------------------------------------------------------------------------------------------
    from nanochat_jax.report import writer as report
    first = rewards_seen[: max(1, len(rewards_seen) // 10)]
    last = rewards_seen[-max(1, len(rewards_seen) // 10):]
    section = {"source": label, "task": train_task.name, "train problems": len(train_task), "steps": step,
               "of steps": num_steps, "examples per step": args.examples_per_step,
               "samples per example": args.num_samples, "training time (min)": t_train / 60,
               "mean reward (first 10% of steps)": float(np.mean(first)) if rewards_seen else None,
               "mean reward (last 10% of steps)": float(np.mean(last)) if rewards_seen else None,
               "checkpoint": str(out_dir)}
    section.update({f"pass@{k}": v for k, v in passk.items()})
    report.log("Chat RL", [{k: v for k, v in section.items() if v is not None}] + [f"note: {n}" for n in notes])
    print0(f"done: {step} RL steps" + (" (stopped early; --resume)" if stopped else ""))
    return {"steps": step, "rewards": rewards_seen, "passk": passk}


if __name__ == "__main__":
    run_main(main)
