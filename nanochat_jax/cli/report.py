"""Start or assemble the run report, `report.md`, as nanochat's speedrun does.

    python -m scripts.report reset                   # at the start of a run: clear old sections, record the environment
    python -m scripts.report reset --hourly-cost 24  # ... pricing the machine at $24/hour (default: by GPU model)
    python -m scripts.report generate                # at the end: <base dir>/report/report.md + plots beside it
    python -m scripts.report generate --output report.md

Each stage writes its own section under <base dir>/report/ as it finishes (nanochat_jax.report.writer.log); `generate`
stitches them under a header (git commit, hardware, software, hourly cost, code size), a summary table (CORE, ARC,
MMLU, GSM8K, HumanEval, ChatCORE at BASE/MID/SFT/RL), the total wall-clock time and cost, and PNG plots of the loss
curves and LR schedules drawn from the training stages' metrics.jsonl files (beside their TensorBoard events).
"""

from nanochat_jax.report import writer as report
from nanochat_jax.core.common import ArgumentParser, UserError, parse_args, print0, run_main


# ---------------------------------------------------------------------------------------------------------------
# Arguments

def build_parser():
    p = ArgumentParser(description="Start (reset) or assemble (generate) report.md", doc=__doc__)
    p.add_argument("action", choices=("reset", "generate"), help="reset: start a new report; generate: write it")
    p.add_argument("--hourly-cost", type=float, default=None,
                   help="reset: $/hour of this machine (default: estimated from the GPUs; 0 on a CPU)")
    p.add_argument("--preset", default=None, help="reset: the preset's name, recorded in the header")
    p.add_argument("--output", default=None, help="generate: where to write (default <base dir>/report/report.md)")
    p.add_argument("--no-plots", action="store_true", help="generate: skip the PNG plots")
    return p


def main(argv=None):
    args = parse_args(build_parser(), "report", argv)
    if args.action == "reset":
        if args.hourly_cost is not None and args.hourly_cost < 0:
            raise UserError(f"--hourly-cost must be >= 0, got {args.hourly_cost}")
        report.reset()
        path = report.write_header(args.hourly_cost, args.preset)
        print0(f"new report started: {path}")
        return path
    path = report.generate_report(args.output, plots=not args.no_plots)
    print0(f"report: {path}")
    return path


if __name__ == "__main__":
    run_main(main)
