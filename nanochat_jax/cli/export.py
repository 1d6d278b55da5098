"""Export a trained model for other tools: Hugging Face Transformers, or PyTorch nanochat's own checkpoint files.

    python -m scripts.export --source sft --model-tag d20 --format hf --out exports/d20-hf
        # AutoModelForCausalLM.from_pretrained("exports/d20-hf"), AutoTokenizer.from_pretrained("exports/d20-hf")
    python -m scripts.export --source sft --model-tag d20 --format nanochat --out ~/.cache/nanochat
        # in a nanochat checkout: NANOCHAT_BASE_DIR=~/.cache/nanochat python -m scripts.chat_cli -i sft -g d20
    python -m scripts.export --checkpoint exports/d4 --format nanochat --out /tmp/nanochat --stage base

--format hf writes a directory for Transformers' own NanoChat model (config.json, model.safetensors, tokenizer.json,
tokenizer_config.json with the chat template, generation_config.json). It holds the 2025 recipe; the 2026 recipe's
value embeddings, smear, backout and sliding windows have no counterpart there, so such a model is refused.
--format nanochat writes nanochat's base-dir layout under --out (<phase>_checkpoints/<tag>/model_XXXXXX.pt +
meta_XXXXXX.json, tokenizer/tokenizer.pkl + token_bytes.pt) for either recipe; `scripts.import_nanochat` reads it
back. Neither needs torch.

Tiny CPU example (after the CPU miniature's base_train, `bash run_speedrun.sh`):
    python -m scripts.export --source base --model-tag d4-cpu --format nanochat --out /tmp/nanochat
"""

import jax
import numpy as np

from nanochat_jax.core.common import ArgumentParser, UserError, get_base_dir, parse_args, print0, run_main
from nanochat_jax.interop.hf import check_hf_expressible, export_hf
from nanochat_jax.interop.nanochat import check_nanochat_expressible, export_nanochat
from nanochat_jax.train.load import STAGES, load_model_from_args, resolve_checkpoint


# ---------------------------------------------------------------------------------------------------------------
# Arguments

def build_parser():
    p = ArgumentParser(description="Export a model as a Hugging Face Transformers directory or as nanochat's files",
                       doc=__doc__)
    p.add_argument("--source", default="sft", choices=STAGES, help="which training stage's checkpoint to export")
    p.add_argument("--model-tag", "-g", default=None, help="model tag (default: the most recently written)")
    p.add_argument("--step", "-s", type=int, default=None, help="checkpoint step (default: the newest)")
    p.add_argument("--checkpoint", default=None, help="a checkpoint/step/export directory (overrides --source)")
    p.add_argument("--format", required=True, choices=["hf", "nanochat"],
                   help="hf: Transformers' NanoChat model (2025 recipe); nanochat: PyTorch nanochat's files")
    p.add_argument("--out", required=True, help="hf: the model directory; nanochat: the nanochat base dir")
    p.add_argument("--stage", choices=STAGES, default=None,
                   help="nanochat: the phase to file it under (default: the checkpoint's stage)")
    p.add_argument("--tag", default=None, help="nanochat: the model tag to file it under (default: the run's tag)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing export at the destination")
    return p


def _stage_and_tag(args, meta: dict) -> tuple[str, str]:
    """Where a nanochat export is filed: --stage/--tag, else the checkpoint's own stage and run directory name."""
    _, run_dir, _ = resolve_checkpoint(args.checkpoint or get_base_dir() / "checkpoints" / args.source, args.step)
    parent = run_dir.parent.name if run_dir.parent.name in STAGES else None
    stage = args.stage or meta.get("stage") or parent or args.source
    tag = args.tag or args.model_tag or meta.get("model_tag") or run_dir.name
    return stage, tag


def main(argv=None):
    args = parse_args(build_parser(), "export", argv)

    # -- model ----------------------------------------------------------------------------------------------------
    params, config, tokenizer, meta = load_model_from_args(args)
    check = check_hf_expressible if args.format == "hf" else check_nanochat_expressible
    check(config)  # before any file is written
    params = jax.tree.map(np.asarray, params)
    print0(f"model: recipe {config.recipe}, {config.n_layer} layers, width {config.n_embd}, "
           f"vocab {config.vocab_size}, step {meta.get('step', 0)}")

    # -- export ---------------------------------------------------------------------------------------------------
    if args.format == "hf":
        out = export_hf(args.out, params, config, tokenizer, overwrite=args.overwrite)
        print0(f"wrote {out}: AutoModelForCausalLM.from_pretrained({str(out)!r})")
        return out
    stage, tag = _stage_and_tag(args, meta)
    if stage not in STAGES:
        raise UserError(f"--stage must be one of {', '.join(STAGES)}, got {stage!r}")
    out = export_nanochat(args.out, params, config, tokenizer, stage=stage, model_tag=tag,
                          step=int(meta.get("step") or 0), meta=meta, overwrite=args.overwrite)
    print0(f"wrote {out}")
    print0(f"nanochat: NANOCHAT_BASE_DIR={out.parent.parent} python -m scripts.chat_cli -i {stage} -g {tag}")
    return out


if __name__ == "__main__":
    run_main(main)
