"""Download the pretraining shards (and, optionally, the CORE eval bundle and the task datasets) before a run.

    python -m scripts.download_data -n 8                        # tokenizer data: 7 train shards + the val shard
    python -m scripts.download_data -n 240 -w 8                 # the 2025 d20 speedrun (with --dataset fineweb-edu-100b)
    python -m scripts.download_data -n -1                       # every shard of the dataset
    python -m scripts.download_data --config d24                # what the preset's [download_data] table says
    python -m scripts.download_data -n 2 --eval-bundle --tasks  # prepare an offline node: shards, CORE, tasks
    NANOCHAT_DATA_URL=http://127.0.0.1:8000 python -m scripts.download_data -n 2   # tiny example from a mirror

Shards go to <base dir>/base_data/<dataset>/shard_NNNNN.parquet. `-n N` fetches the first N-1 shards for training
plus the dataset's last shard (the validation split), so the split never moves when more shards are fetched later.
They come from the dataset's Hugging Face repo through huggingface_hub (HF_TOKEN, HF_ENDPOINT and HF_HUB_OFFLINE
apply; task datasets land in the shared Hugging Face cache), or from a plain mirror (--base-url). Downloads are
parallel (-w threads), retried with exponential backoff, resumed where they stopped and checked (a shard whose
parquet footer does not read is fetched again); shards already there are skipped.
"""

from nanochat_jax.data import download
from nanochat_jax.core.common import ArgumentParser, UserError, parse_args, print0, run_main

DEFAULT_SHARDS = 8  # enough for the tokenizer (~2B characters), as nanochat's speedrun fetches first


# ---------------------------------------------------------------------------------------------------------------
# Arguments

def build_parser() -> ArgumentParser:
    p = ArgumentParser(description=__doc__.split("\n")[0], doc=__doc__)
    p.add_argument("-n", "--num-shards", type=int, default=None,
                   help=f"shards to fetch (N-1 train + the val shard); -1 = all; default: the preset's, else "
                        f"{DEFAULT_SHARDS}")
    p.add_argument("-w", "--workers", type=int, default=4, help="parallel downloads")
    p.add_argument("--dataset", default=None, choices=sorted(download.DATASETS),
                   help=f"shard set (default $NANOCHAT_DATASET or {download.DEFAULT_DATASET})")
    p.add_argument("--base-url", default=None,
                   help="a plain mirror of the shard files (default $NANOCHAT_DATA_URL, else the Hugging Face Hub)")
    p.add_argument("--retries", type=int, default=5,
                   help="retries per file from a mirror, with exponential backoff (huggingface_hub retries its own)")
    p.add_argument("--eval-bundle", action="store_true", help="also fetch the CORE eval bundle")
    p.add_argument("--tasks", action="store_true", help="also fetch the task datasets (ARC, MMLU, GSM8K, ...)")
    p.add_argument("--no-shards", action="store_true", help="skip the shards (only --eval-bundle / --tasks)")
    return p


# ---------------------------------------------------------------------------------------------------------------
# The extras other modules own: called if they exist

def fetch_eval_bundle():
    try:
        from nanochat_jax.evaluation.core import download_eval_bundle
    except ImportError:
        raise UserError("--eval-bundle: nanochat_jax.evaluation.core.download_eval_bundle is not available "
                        "in this version") from None
    print0(f"CORE eval bundle: {download_eval_bundle()}")


def fetch_tasks():
    try:
        from nanochat_jax.tasks import prefetch_all
    except ImportError:
        raise UserError("--tasks: nanochat_jax.tasks.prefetch_all is not available in this version") from None
    prefetch_all()
    print0("task datasets fetched")


# ---------------------------------------------------------------------------------------------------------------

def main(argv=None):
    args = parse_args(build_parser(), "download_data", argv)
    if not args.no_shards:
        n = args.num_shards if args.num_shards is not None else DEFAULT_SHARDS
        paths = download.download_shards(n, args.dataset, workers=args.workers, base_url=args.base_url,
                                         retries=args.retries)
        print0(f"{len(paths)} shards ready in {download.data_dir(args.dataset)} "
               f"(validation: {paths[-1].name})")
    if args.eval_bundle:
        fetch_eval_bundle()
    if args.tasks:
        fetch_tasks()


if __name__ == "__main__":
    run_main(main)
