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
padding masked); one optimizer update with the train step every stage shares (float16 loss scaling included), in
the loop every stage shares (checkpoints, SIGTERM, logging). pass@1..k on the test problems every --eval-every steps.
Offline, where GSM8K's train split cannot be had, the packaged GSM8K sample is split into train and test (noted
in the report); `--task SpellingBee` trains on the synthetic spelling task instead.
Checkpoints: <base>/checkpoints/rl/<tag>; curves: <base>/tensorboard/rl/<run>; a "Chat RL" report section.
"""

from __future__ import annotations

import numpy as np

from nanochat_jax.core.common import ArgumentParser, UserError, enable_compilation_cache, parse_args, print0, run_main
from nanochat_jax.infer.engine import Engine
from nanochat_jax.report import writer as report
from nanochat_jax.stages import finetune as ft
from nanochat_jax.stages import rl
from nanochat_jax.tasks import GSM8K, TaskDataUnavailable, get_task
from nanochat_jax.train.checkpoint import CheckpointManager, check_output_dir
from nanochat_jax.train.loop import Hook, resume_run, run_loop
from nanochat_jax.train.metrics import MetricsLogger
from nanochat_jax.train.step import setup_train

STAGE = "rl"


# ---------------------------------------------------------------------------------------------------------------
# Arguments

def build_parser():
    p = ArgumentParser(description="Chat RL (GRPO-style) on GSM8K", doc=__doc__)
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

    # -- model, tasks, mesh ---------------------------------------------------------------------------------------
    params, config, tokenizer, meta, label = ft.load_start(args)
    train_task, test_task, notes = load_tasks(args)
    mesh, mode = ft.make_mesh_and_mode(args)
    rows_per_step = args.examples_per_step * args.num_samples
    accum = max(1, -(-rows_per_step // (args.device_batch_size * mesh.shape["data"])))
    num_steps = args.num_iterations if args.num_iterations > 0 else \
        max(1, int(len(train_task) * args.num_epochs) // args.examples_per_step)
    print0(f"RL from {label} (step {meta.get('step')}) on {train_task.name}: {len(train_task):,} train problems, "
           f"{args.examples_per_step} x {args.num_samples} samples = {rows_per_step} rows/step in {accum} "
           f"micro-batches, {num_steps} steps")

    # -- output directory -----------------------------------------------------------------------------------------
    tag = ft.source_tag(args, meta, config)
    out_dir = ft.output_dir(args, STAGE, tag)
    resume_step = check_output_dir(out_dir, args.resume, args.overwrite, config)

    # -- optimizer: the shared train step with the policy-gradient loss -------------------------------------------
    opt_cfg = ft.stage_opt_config(args, config, STAGE)
    state, _, train_step = setup_train(params, config, opt_cfg, num_steps, mesh, mode, loss_fn=rl.pg_loss(config))
    del params

    # -- data: the train problems in order; resume ----------------------------------------------------------------
    problems = rl.Problems(len(train_task), args.examples_per_step)
    ckpt = CheckpointManager(out_dir, max_to_keep=args.keep_checkpoints, tokenizer=tokenizer)
    state, loop_state, start, ckpt_meta = resume_run(ckpt, state, problems, resume_step, num_steps)
    rewards = list((ckpt_meta.get("history") or {}).get("rewards", []))   # the mean reward of every step taken

    # -- the engine: rollouts (on policy: every rollout uses the params of the step it trains) and pass@k -------
    engine = Engine(rl.policy_params(state.params), config, tokenizer,
                    max_batch=max(args.num_samples, args.eval_samples, 16))
    top_k = args.top_k or None
    step_fn = rl.on_policy_step(train_step, engine, tokenizer, train_task, mesh, num_samples=args.num_samples,
                                max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=top_k,
                                accum=accum, max_len=config.sequence_len)
    hooks = [Hook("pass@k", args.eval_every, rl.pass_at_k_hook(engine, tokenizer, test_task, args.eval_examples,
                                                               args.eval_samples, args.max_new_tokens, top_k))]

    # -- the loop -------------------------------------------------------------------------------------------------
    logger = MetricsLogger(STAGE, args.run or tag)

    def meta_fn(step, loop):
        return {"model_config": config.to_dict(), "stage": STAGE, "model_tag": tag, "source": label,
                "num_iterations": num_steps, "history": {"rewards": rewards}, "user_config": dict(vars(args))}

    try:
        result = run_loop(state, step_fn, problems, num_steps=num_steps, tokens_per_step=0, start_step=start,
                          loop_state=loop_state, hooks=hooks, ckpt=ckpt, save_every=args.save_every, meta_fn=meta_fn,
                          logger=logger, log_every=args.log_every, on_step=lambda s, m: rewards.append(m["reward"]),
                          show=("reward", "completion_len"))
    finally:
        ckpt.close()
        logger.close()

    # -- report ---------------------------------------------------------------------------------------------------
    passk = {k.split("@", 1)[1]: v for k, v in result.summary.items() if k.startswith("eval/pass@")}
    log_report(args, result, label, train_task, num_steps, rewards, passk, out_dir, notes)
    print0(f"done: {result.step} RL steps" + (" (stopped early; --resume)" if result.stopped else ""))
    return {"steps": result.step, "rewards": rewards, "passk": passk}


def log_report(args, result, label, train_task, num_steps, rewards, passk, out_dir, notes):
    """The "Chat RL" report section: the run's shape, the mean reward early and late, pass@k at the end."""
    first = rewards[: max(1, len(rewards) // 10)]
    last = rewards[-max(1, len(rewards) // 10):]
    section = {"source": label, "task": train_task.name, "train problems": len(train_task), "steps": result.step,
               "of steps": num_steps, "examples per step": args.examples_per_step,
               "samples per example": args.num_samples, "training time (min)": result.summary["train seconds"] / 60,
               "mean reward (first 10% of steps)": float(np.mean(first)) if rewards else None,
               "mean reward (last 10% of steps)": float(np.mean(last)) if rewards else None,
               "checkpoint": str(out_dir)}
    section.update({f"pass@{k}": v for k, v in passk.items()})
    report.log("Chat RL", [{k: v for k, v in section.items() if v is not None}] + [f"note: {n}" for n in notes])


if __name__ == "__main__":
    run_main(main)
