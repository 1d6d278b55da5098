"""nanochat checkpoints in and out: `import_nanochat` turns a nanochat checkpoint directory into one of our exports,
`export_nanochat` writes a model of ours as nanochat's own files. Neither needs torch.

nanochat's layout under its base dir: `<phase>_checkpoints/<tag>/model_XXXXXX.pt` (the state_dict, torch's zip
format: `interop.torch_zip`) and `meta_XXXXXX.json` (with `model_config`), `tokenizer/tokenizer.pkl` (a pickled
tiktoken Encoding) and `tokenizer/token_bytes.pt` (bytes per token id, the bits-per-byte denominator). The tokenizer
pickle is read by a restricted unpickler: only the Encoding's plain-data state is accepted, and our Tokenizer is
rebuilt from its ranks.
"""

from __future__ import annotations

import io
import json
import pickle
from pathlib import Path

import tiktoken

from nanochat_jax.core.common import UserError, clear_output_dir
from nanochat_jax.core.config import ModelConfig
from nanochat_jax.data.tokenizer import Tokenizer
from nanochat_jax.interop.convert import from_nanochat, to_nanochat
from nanochat_jax.interop.torch_zip import read_torch_state_dict, write_torch_file
from nanochat_jax.train.checkpoint import checkpoint_dir
from nanochat_jax.train.load import export_weights

# ---------------------------------------------------------------------------------------------------------------
# The tokenizer pickle

class _EncodingState:
    """Stands in for tiktoken.core.Encoding while unpickling: keeps its plain-data state, builds nothing."""

    def __setstate__(self, state):
        self.state = state


class _TiktokenUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) == ("tiktoken.core", "Encoding"):
            return _EncodingState
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a tokenizer pickle")


def read_tiktoken_pickle(path):
    """nanochat's tokenizer.pkl (a pickled tiktoken Encoding) -> our Tokenizer, through a restricted unpickler."""
    path = Path(path)
    try:
        obj = _TiktokenUnpickler(io.BytesIO(path.read_bytes())).load()
    except (pickle.UnpicklingError, EOFError, ValueError) as e:
        raise UserError(f"{path}: not a tiktoken tokenizer pickle ({e})") from None
    state = getattr(obj, "state", None)
    if isinstance(state, str):
        raise UserError(f"{path} names the registered tiktoken encoding {state!r}, not one with its own ranks")
    ok = (isinstance(state, dict) and isinstance(state.get("pat_str"), str)
          and isinstance(state.get("mergeable_ranks"), dict) and isinstance(state.get("special_tokens"), dict)
          and all(isinstance(k, bytes) and isinstance(v, int) for k, v in state["mergeable_ranks"].items())
          and all(isinstance(k, str) and isinstance(v, int) for k, v in state["special_tokens"].items()))
    if not ok:
        raise UserError(f"{path}: unexpected tokenizer state (expected tiktoken Encoding data)")
    ranks, specials = state["mergeable_ranks"], state["special_tokens"]
    names = sorted(specials, key=specials.get)
    if [specials[n] for n in names] != list(range(len(ranks), len(ranks) + len(names))):
        raise UserError(f"{path}: special token ids do not follow the mergeable ranks; cannot convert")
    return Tokenizer(ranks, state["pat_str"], names)


def write_tiktoken_pickle(path, tokenizer: Tokenizer) -> Path:
    """Our tokenizer as nanochat's tokenizer.pkl: a pickled tiktoken Encoding named "rustbpe", as nanochat saves it."""
    specials = {name: tokenizer.encode_special(name) for name in tokenizer.get_special_tokens()}
    enc = tiktoken.Encoding(name="rustbpe", pat_str=tokenizer.get_pattern(),
                            mergeable_ranks=tokenizer.get_mergeable_ranks(), special_tokens=specials)
    path = Path(path)
    path.write_bytes(pickle.dumps(enc))
    return path


# ---------------------------------------------------------------------------------------------------------------
# A nanochat checkpoint directory -> our export

_NANOCHAT_STAGES = {"base_checkpoints": "base", "mid_checkpoints": "mid", "chatsft_checkpoints": "sft",
                    "chatrl_checkpoints": "rl"}
_STAGE_DIRS = {stage: name for name, stage in _NANOCHAT_STAGES.items()}


def _find_nanochat_tokenizer(ckpt_dir: Path) -> Path | None:
    for cand in (ckpt_dir / "tokenizer.pkl", ckpt_dir / "tokenizer" / "tokenizer.pkl",
                 ckpt_dir.parent / "tokenizer" / "tokenizer.pkl",
                 ckpt_dir.parent.parent / "tokenizer" / "tokenizer.pkl"):
        if cand.is_file():
            return cand
    return None


def import_nanochat(src_dir, out_dir=None, step: int | None = None, stage: str | None = None,
                    model_tag: str | None = None, tokenizer_path=None, dtype: str | None = None,
                    overwrite: bool = False) -> Path:
    """nanochat checkpoint dir (model_XXXXXX.pt, meta_XXXXXX.json, a tokenizer.pkl nearby) -> our export.

    Default destination: `<base dir>/checkpoints/<stage>/<tag>`, the stage from nanochat's directory name
    (base_checkpoints -> base, chatsft_checkpoints -> sft, ...), the tag from the directory's own name.
    dtype None keeps float32 (bit-exact with the source); "bfloat16" halves the size.
    """
    src = Path(src_dir).expanduser().resolve()
    if not src.is_dir():
        raise UserError(f"{src_dir} is not a directory")
    steps = sorted(int(p.stem.split("_")[1]) for p in src.glob("model_*.pt") if p.stem.split("_")[1].isdigit())
    if not steps:
        raise UserError(f"{src} holds no model_XXXXXX.pt")
    step = steps[-1] if step is None else int(step)
    model_pt, meta_json = src / f"model_{step:06d}.pt", src / f"meta_{step:06d}.json"
    if not model_pt.is_file():
        raise UserError(f"{src} has no step {step} (have: {', '.join(map(str, steps))})")
    if not meta_json.is_file():
        raise UserError(f"{meta_json} is missing: the model config comes from it")
    nano_meta = json.loads(meta_json.read_text(encoding="utf-8"))
    tok_path = Path(tokenizer_path) if tokenizer_path else _find_nanochat_tokenizer(src)
    if tok_path is None or not tok_path.is_file():
        raise UserError(f"no tokenizer.pkl found near {src}; pass --tokenizer PATH")
    tokenizer = read_tiktoken_pickle(tok_path)
    state_dict = read_torch_state_dict(model_pt)
    params, config = from_nanochat(state_dict, nano_meta["model_config"])
    if tokenizer.get_vocab_size() != config.vocab_size:
        raise UserError(f"tokenizer has {tokenizer.get_vocab_size()} tokens but the model {config.vocab_size}")
    if out_dir is None:
        stage = stage or _NANOCHAT_STAGES.get(src.parent.name, "base")
        out_dir = checkpoint_dir(stage, model_tag or src.name)
    meta = {"step": step, "source": "nanochat", "source_dir": str(src), "nanochat_meta": nano_meta}
    if "val_bpb" in nano_meta:
        meta["val_bpb"] = nano_meta["val_bpb"]
    return export_weights(out_dir, params, config, tokenizer, meta=meta, dtype=dtype, overwrite=overwrite)


# ---------------------------------------------------------------------------------------------------------------
# Our model -> nanochat's files

def check_nanochat_expressible(config: ModelConfig):
    """UserError (one line) when nanochat's GPT cannot hold `config`: its MLP is ReLU² and its RoPE base is fixed."""
    if config.mlp != "relu2":
        raise UserError(f"nanochat's MLP is ReLU² only; this model uses {config.mlp}, which no nanochat can load")
    base = 10000 if config.recipe == "2025" else 100000
    if config.rope_base != base:
        raise UserError(f"nanochat's {config.recipe} recipe fixes the RoPE base at {base:,}; this model uses "
                        f"{config.rope_base:,}, which no nanochat can load")


def export_nanochat(out_dir, params, config: ModelConfig, tokenizer: Tokenizer, stage: str, model_tag: str,
                    step: int = 0, meta: dict | None = None, overwrite: bool = False) -> Path:
    """Write a model as nanochat's base dir layout under `out_dir`; returns the checkpoint directory.

    `<out_dir>/<phase>_checkpoints/<model_tag>/model_<step>.pt` + `meta_<step>.json` (phase from `stage`: base,
    mid, chatsft, chatrl) and `<out_dir>/tokenizer/tokenizer.pkl` + `token_bytes.pt`, so that PyTorch nanochat
    runs it with `NANOCHAT_BASE_DIR=<out_dir>`. Weights are fp32, bit for bit ours (the 2025 recipe's vocab rows
    past `vocab_size`, which no token reaches, are cut as nanochat 2025 has none). token_bytes counts bytes as
    that recipe's nanochat did (2025: decoded UTF-8 length; 2026: the token's own bytes). An existing checkpoint
    directory, or another tokenizer already in `<out_dir>/tokenizer`, is replaced only with `overwrite`.
    """
    check_nanochat_expressible(config)
    base = Path(out_dir).expanduser().resolve()
    ckpt = clear_output_dir(base / _STAGE_DIRS[stage] / model_tag, overwrite)
    tok_pkl = base / "tokenizer" / "tokenizer.pkl"
    if tok_pkl.is_file() and not overwrite and read_tiktoken_pickle(tok_pkl).fingerprint() != tokenizer.fingerprint():
        raise UserError(f"{tok_pkl} holds another tokenizer; pass --overwrite to replace it")
    ckpt.mkdir(parents=True, exist_ok=True)
    tok_pkl.parent.mkdir(parents=True, exist_ok=True)
    write_torch_file(ckpt / f"model_{step:06d}.pt", to_nanochat(params, config))
    nano_meta = {"step": step, "model_config": config.nanochat_config(), "source": "nanochat_jax"}
    if meta and "val_bpb" in meta:
        nano_meta["val_bpb"] = meta["val_bpb"]
    (ckpt / f"meta_{step:06d}.json").write_text(json.dumps(nano_meta, indent=2), encoding="utf-8")
    write_tiktoken_pickle(tok_pkl, tokenizer)
    write_torch_file(tok_pkl.parent / "token_bytes.pt", tokenizer.token_bytes(decoded=config.recipe == "2025"))
    return ckpt
