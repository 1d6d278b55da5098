"""Turn a nanochat checkpoint directory into one of ours (a weights-only export with our tokenizer files).

    python -m scripts.import_nanochat ~/.cache/nanochat/chatsft_checkpoints/d20
        # -> <base dir>/checkpoints/sft/d20, then: python -m scripts.chat_cli --source sft --model-tag d20
    python -m scripts.import_nanochat DIR --step 650 --output exports/d20 --dtype bfloat16

DIR holds nanochat's `model_XXXXXX.pt` (a torch state_dict, zip + pickle) and `meta_XXXXXX.json` (model_config);
its `tokenizer.pkl` (a pickled tiktoken Encoding) is looked for in DIR, DIR/tokenizer and nanochat's base dir
(`DIR/../../tokenizer`), or given with --tokenizer. No torch needed: the files are read by restricted unpicklers
that admit tensor data and the tokenizer's plain data only, never arbitrary classes. Both nanochat versions our
fixtures come from (2025 and 2026 recipes) are recognised from the parameter names.
"""

from nanochat_jax.interop.nanochat import import_nanochat
from nanochat_jax.core.common import ArgumentParser, parse_args, print0, run_main


# ---------------------------------------------------------------------------------------------------------------
# Arguments

def build_parser():
    p = ArgumentParser(description="Import a nanochat checkpoint directory (no torch needed)",
                        doc=__doc__)
    p.add_argument("dir", help="nanochat checkpoint directory (model_XXXXXX.pt + meta_XXXXXX.json)")
    p.add_argument("--step", type=int, default=None, help="step to import (default: the newest)")
    p.add_argument("--stage", choices=["base", "mid", "sft", "rl"], default=None,
                   help="our stage to file it under (default: from nanochat's directory name, else base)")
    p.add_argument("--model-tag", default=None, help="tag to file it under (default: DIR's name, e.g. d20)")
    p.add_argument("--output", "--output-dir", default=None,
                   help="write the export here instead of <base dir>/checkpoints/<stage>/<tag>")
    p.add_argument("--tokenizer", default=None, help="path of nanochat's tokenizer.pkl (default: found near DIR)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="weights dtype of the export (float32 keeps them bit-exact)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing export at the destination")
    return p


def main(argv=None):
    args = parse_args(build_parser(), "import_nanochat", argv)
    out = import_nanochat(args.dir, out_dir=args.output, step=args.step, stage=args.stage, model_tag=args.model_tag,
                          tokenizer_path=args.tokenizer, dtype=args.dtype, overwrite=args.overwrite)
    print0(f"imported {args.dir} -> {out}")
    print0(f"load it with --checkpoint {out}")
    return out


if __name__ == "__main__":
    run_main(main)
