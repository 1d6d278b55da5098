"""nanochat checkpoints, read without torch, and turned into one of our exports (`import_nanochat`).

A torch .pt file is a zip: <archive>/data.pkl (the pickled state_dict) and <archive>/data/<key> (raw storage
bytes). The pickle is read by a restricted unpickler that admits only the tensor-rebuild functions, storage types
and OrderedDict; any other class in the file is refused. The tokenizer pickle (a tiktoken Encoding) likewise:
only the Encoding's plain-data state is accepted, and our Tokenizer is rebuilt from its ranks.
"""

from __future__ import annotations

import collections
import io
import json
import pickle
import zipfile
from pathlib import Path

import ml_dtypes
import numpy as np

from nanochat_jax.core.common import UserError
from nanochat_jax.data.tokenizer import Tokenizer
from nanochat_jax.interop.convert import from_nanochat
from nanochat_jax.train.checkpoint import checkpoint_dir
from nanochat_jax.train.load import export_weights

# ---------------------------------------------------------------------------------------------------------------
# The torch .pt file

_STORAGE_DTYPES = {"FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
                   "BFloat16Storage": "bfloat16", "LongStorage": np.int64, "IntStorage": np.int32,
                   "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_}


class _StorageType:
    def __init__(self, name):
        dt = _STORAGE_DTYPES[name]
        self.dtype = np.dtype(ml_dtypes.bfloat16 if dt == "bfloat16" else dt)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                       metadata=None):
    size, stride = tuple(size), tuple(stride)
    if not size:
        return storage[storage_offset].copy()
    item = storage.itemsize
    view = np.lib.stride_tricks.as_strided(storage[storage_offset:], shape=size,
                                           strides=tuple(s * item for s in stride))
    return np.array(view)  # copy: contiguous, owning its memory


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None):
    return data


class _TorchUnpickler(pickle.Unpickler):
    _ALLOWED = {("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
                ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
                ("collections", "OrderedDict"): collections.OrderedDict}

    def __init__(self, file, zf: zipfile.ZipFile, prefix: str):
        super().__init__(file)
        self._zf, self._prefix = zf, prefix

    def find_class(self, module, name):
        if (module, name) in self._ALLOWED:
            return self._ALLOWED[(module, name)]
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a checkpoint (not tensor data)")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType)):
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r}")
        _, stype, key, _location, numel = pid
        data = self._zf.read(f"{self._prefix}data/{key}")
        return np.frombuffer(data, dtype=stype.dtype, count=numel)


def read_torch_state_dict(path) -> dict[str, np.ndarray]:
    """A torch-saved (zip format) state_dict as {name: numpy array}, without torch. bf16 arrives as ml_dtypes."""
    path = Path(path)
    try:
        zf = zipfile.ZipFile(path)
    except zipfile.BadZipFile:
        raise UserError(f"{path} is not a torch zip checkpoint (legacy torch.save format is not supported)") from None
    with zf:
        pkl = [n for n in zf.namelist() if n.endswith("data.pkl")]
        if not pkl:
            raise UserError(f"{path} holds no data.pkl: not a torch checkpoint")
        prefix = pkl[0][:-len("data.pkl")]
        byteorder = f"{prefix}byteorder"
        if byteorder in zf.namelist() and zf.read(byteorder).strip() != b"little":
            raise UserError(f"{path} was saved big-endian; not supported")
        try:
            obj = _TorchUnpickler(io.BytesIO(zf.read(pkl[0])), zf, prefix).load()
        except pickle.UnpicklingError as e:
            raise UserError(f"{path}: {e}") from None
    if not isinstance(obj, dict):
        raise UserError(f"{path} does not hold a state_dict (got {type(obj).__name__})")
    return {k: v for k, v in obj.items()}


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


# ---------------------------------------------------------------------------------------------------------------
# A nanochat checkpoint directory -> our export

_NANOCHAT_STAGES = {"base_checkpoints": "base", "mid_checkpoints": "mid", "chatsft_checkpoints": "sft",
                    "chatrl_checkpoints": "rl"}


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
