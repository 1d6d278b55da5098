"""Evaluate a chat model on ARC-Easy/Challenge, MMLU, GSM8K, HumanEval and SpellingBee; print ChatCORE.

    python -m scripts.chat_eval --source sft                       # every task, the newest SFT checkpoint
    python -m scripts.chat_eval -a arc,gsm8k --max-problems 100     # some tasks, capped
    python -m scripts.eval --checkpoint out/sft --tasks arc,gsm8k,mmlu --report_path report.md
    python -m scripts.chat_eval --source sft -a gsm8k --num-samples 8 --temperature 0.7   # pass@8

Tiny CPU example (after the miniature's SFT):  python -m scripts.chat_eval --source sft --max-problems 20

Categorical tasks (ARC, MMLU) are one batched forward each, the answer being the argmax over the letter tokens;
generative tasks sample with the jitted engine, a batch of prompts at a time. A task whose data cannot be had
offline is skipped with a note, and then ChatCORE (which needs every task) is not printed.
"""

from __future__ import annotations

import time

from nanochat_jax.core.common import ArgumentParser, UserError, enable_compilation_cache, parse_args, print0, run_main


def build_parser():
    p = ArgumentParser(description=__doc__.split("\n\n")[0], doc=__doc__)
    p.add_argument("--source", default="sft", help="base|mid|sft|rl: which stage's checkpoint")
    p.add_argument("--model-tag", default=None, help="the run's tag (default: the newest)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest)")
    p.add_argument("--checkpoint", default=None, help="a checkpoint/export directory (overrides --source)")
    p.add_argument("-a", "--task-name", "--tasks", dest="task_name", default="all",
                   help="comma-separated tasks: arc, mmlu, gsm8k, humaneval, spellingbee or full names")
    p.add_argument("--max-problems", type=int, default=None, help="at most this many problems per task")
    p.add_argument("--batch-size", type=int, default=16, help="prompts per forward / per engine batch")
    p.add_argument("--num-samples", type=int, default=1, help="samples per generative problem (pass@k)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="generation budget per answer")
    p.add_argument("-t", "--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("-k", "--top-k", type=int, default=50)
    p.add_argument("--report-path", default=None, help="also write the results as markdown to this file")
    return p


def main(argv=None):
    args = parse_args(build_parser(), "chat_eval", argv)
    enable_compilation_cache()
    from nanochat_jax.report import writer as report
    from nanochat_jax.train.load import load_model_from_args
    from nanochat_jax.evaluation.chat_eval import chatcore, evaluate_tasks
    from nanochat_jax.tasks import EVAL_TASKS, resolve_task_names

    names = resolve_task_names(args.task_name)
    if args.num_samples < 1 or args.batch_size < 1:
        raise UserError("--num-samples and --batch-size must be at least 1")
    t0 = time.time()
    params, config, tokenizer, meta = load_model_from_args(args)
    label = args.checkpoint or args.source
    print0(f"evaluating {label} (step {meta.get('step')}) on {', '.join(names)}")

    def engine_factory():
        from nanochat_jax.infer.engine import Engine
        return Engine(params, config, tokenizer)

    results, notes = evaluate_tasks(names, params, config, tokenizer, engine_factory,
                                    max_problems=args.max_problems, batch_size=args.batch_size,
                                    num_samples=args.num_samples, max_tokens=args.max_new_tokens,
                                    temperature=args.temperature, top_k=args.top_k, log=print0)
    score = chatcore(results, {n: EVAL_TASKS[n] for n in names}) if set(names) == set(EVAL_TASKS) else None
    if score is not None:
        print0(f"ChatCORE: {score:.4f}")
    rows = [{"task": n, "accuracy": "skipped" if results[n] is None else round(results[n], 4), "detail": notes[n]}
            for n in names]
    data = {"checkpoint": label, "step": meta.get("step"), "max problems per task": args.max_problems,
            "samples per problem": args.num_samples, "results": rows, "ChatCORE": score,
            "time (s)": round(time.time() - t0, 1)}
    # the per-task accuracies also go in as plain keys, for the summary table
    data.update({n: (round(v, 4) if v is not None else "skipped") for n, v in results.items()})
    stage = meta.get("stage") or args.source
    report.log(f"Chat evaluation {stage}", data)
    if args.report_path:
        from pathlib import Path
        Path(args.report_path).write_text(report.render(f"Chat evaluation {stage}", data), encoding="utf-8")
        print0(f"wrote {args.report_path}")
    return results


if __name__ == "__main__":
    run_main(main)
