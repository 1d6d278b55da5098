"""scripts/import_nanochat.py, interop/nanochat.py and interop/torch_zip.py's torch-free readers: a .pt written in
torch's zip format by this test (no torch installed), imported, gives nanochat's own logits."""

import collections
import io
import json
import pickle
import sys
import types
import zipfile

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from helpers import load_ref, ref_state_dict
from nanochat_jax.interop import nanochat, torch_zip
from nanochat_jax.train.load import load_model
from nanochat_jax.core.common import UserError


# ---------------------------------------------------------------------------------------------------------------
# Writing torch's format without torch: fake `torch` modules exist only while pickling, so the pickle names
# torch._utils._rebuild_tensor_v2 and torch.<X>Storage exactly as torch.save does.

class _Storage:
    def __init__(self, key, cls, arr):
        self.key, self.cls, self.arr = key, cls, arr


class _Tensor:
    def __init__(self, storage, offset, shape, stride):
        self.storage, self.offset, self.shape, self.stride = storage, offset, shape, stride

    def __reduce_ex__(self, protocol):
        rebuild = sys.modules["torch._utils"]._rebuild_tensor_v2
        return rebuild, (self.storage, self.offset, self.shape, self.stride, False, collections.OrderedDict())


def write_torch_pt(path, tensors: dict, archive="archive"):
    """tensors: name -> np array, or (storage array, offset, shape, stride) for views. Saves like torch.save."""
    torch_mod, utils_mod = types.ModuleType("torch"), types.ModuleType("torch._utils")

    def _rebuild_tensor_v2(*a):  # never called: only its name goes into the pickle
        raise AssertionError

    _rebuild_tensor_v2.__module__, _rebuild_tensor_v2.__qualname__ = "torch._utils", "_rebuild_tensor_v2"
    utils_mod._rebuild_tensor_v2 = _rebuild_tensor_v2
    storage_cls = {}
    for name in ("FloatStorage", "BFloat16Storage", "LongStorage"):
        storage_cls[name] = type(name, (), {"__module__": "torch"})
        setattr(torch_mod, name, storage_cls[name])
    torch_mod._utils = utils_mod
    kinds = {np.dtype(np.float32): "FloatStorage", np.dtype(ml_dtypes.bfloat16): "BFloat16Storage",
             np.dtype(np.int64): "LongStorage"}
    saved = {k: sys.modules.get(k) for k in ("torch", "torch._utils")}
    sys.modules["torch"], sys.modules["torch._utils"] = torch_mod, utils_mod
    try:
        sd, blobs = collections.OrderedDict(), {}
        for i, (name, t) in enumerate(tensors.items()):
            if isinstance(t, tuple):
                arr, offset, shape, stride = t
            else:
                arr, offset, shape = np.ascontiguousarray(t), 0, t.shape
                stride = tuple(s // arr.itemsize for s in arr.strides)
            st = _Storage(str(i), storage_cls[kinds[arr.dtype]], arr.ravel())
            blobs[str(i)] = arr.ravel().tobytes()
            sd[name] = _Tensor(st, offset, tuple(shape), tuple(stride))

        class Pickler(pickle.Pickler):
            def persistent_id(self, obj):
                if isinstance(obj, _Storage):
                    return ("storage", obj.cls, obj.key, "cpu", obj.arr.size)
                return None

        buf = io.BytesIO()
        Pickler(buf, protocol=2).dump(sd)
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{archive}/data.pkl", buf.getvalue())
        z.writestr(f"{archive}/byteorder", "little")
        for key, b in blobs.items():
            z.writestr(f"{archive}/data/{key}", b)
        z.writestr(f"{archive}/version", "3\n")


def write_tokenizer_pkl(path, n_ranks: int):
    """A nanochat-style tokenizer.pkl: a pickled tiktoken Encoding with `n_ranks` ranks + the 9 specials."""
    import tiktoken
    from nanochat_jax.data.tokenizer import SPECIAL_TOKENS, SPLIT_PATTERN
    ranks = {bytes([i]): i for i in range(256)}
    letters = b"abcdefghijklmnopqrstuvwxyz"
    for a in letters:
        for b in letters:
            if len(ranks) < n_ranks:
                ranks[bytes([a, b])] = len(ranks)
    specials = {s: n_ranks + i for i, s in enumerate(SPECIAL_TOKENS)}
    enc = tiktoken.Encoding(name="rustbpe", pat_str=SPLIT_PATTERN, mergeable_ranks=ranks, special_tokens=specials)
    path.write_bytes(pickle.dumps(enc))
    return enc


# ---------------------------------------------------------------------------------------------------------------

def test_reader_handles_views_offsets_bf16_and_refuses_other_classes(tmp_path):
    base = np.arange(24, dtype=np.float32)
    bf = (np.arange(6, dtype=np.float32) / 3).astype(ml_dtypes.bfloat16).reshape(2, 3)
    write_torch_pt(tmp_path / "m.pt", {
        "_orig_mod.a": np.arange(6, dtype=np.float32).reshape(2, 3),
        "t": (base, 2, (3, 4), (1, 3)),        # a transposed view starting at element 2
        "b": bf,
        "n": np.array([7, 8], dtype=np.int64)})
    sd = torch_zip.read_torch_state_dict(tmp_path / "m.pt")
    np.testing.assert_array_equal(sd["_orig_mod.a"], np.arange(6).reshape(2, 3))
    np.testing.assert_array_equal(sd["t"], base[2:14].reshape(4, 3).T)
    assert sd["b"].dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(sd["b"].astype(np.float32), bf.astype(np.float32))
    assert sd["n"].tolist() == [7, 8]

    class Evil:
        def __reduce__(self):
            import os
            return (os.system, ("echo pwned",))

    with zipfile.ZipFile(tmp_path / "evil.pt", "w") as z:
        z.writestr("archive/data.pkl", pickle.dumps({"x": Evil()}))
    with pytest.raises(UserError, match="refusing to load"):
        torch_zip.read_torch_state_dict(tmp_path / "evil.pt")
    (tmp_path / "evil_tok.pkl").write_bytes(pickle.dumps(Evil()))
    with pytest.raises(UserError, match="refusing to load"):
        nanochat.read_tiktoken_pickle(tmp_path / "evil_tok.pkl")


def test_tokenizer_pickle_becomes_our_tokenizer(tmp_path):
    enc = write_tokenizer_pkl(tmp_path / "tokenizer.pkl", 503)
    tok = nanochat.read_tiktoken_pickle(tmp_path / "tokenizer.pkl")
    assert tok.get_vocab_size() == 512
    text = "hello world, abc zz"
    assert tok.encode(text) == enc.encode_ordinary(text)
    assert tok.get_bos_token_id() == enc.encode_single_token("<|bos|>")


@pytest.mark.parametrize("name", ["orig_d2", "head_d4"])
def test_import_gives_nanochat_logits(tmp_path, base_dir, name):
    from nanochat_jax import model
    from nanochat_jax.cli import import_nanochat
    arrays, meta = load_ref(name)
    sd = ref_state_dict(arrays)
    src = tmp_path / "nanochat" / "chatsft_checkpoints" / "d2"
    src.mkdir(parents=True)
    write_torch_pt(src / "model_000010.pt", {"_orig_mod." + k: v for k, v in sd.items()}, archive="model_000010")
    (src / "meta_000010.json").write_text(json.dumps({"step": 10, "val_bpb": 1.25, "model_config": meta["config"]}))
    write_tokenizer_pkl(tmp_path / "nanochat" / "tokenizer.pkl", meta["config"]["vocab_size"] - 9)
    (tmp_path / "nanochat" / "tokenizer").mkdir()
    (tmp_path / "nanochat" / "tokenizer.pkl").rename(tmp_path / "nanochat" / "tokenizer" / "tokenizer.pkl")

    out = import_nanochat.main([str(src)])
    assert out == base_dir / "checkpoints" / "sft" / "d2"          # stage from nanochat's directory name
    params, config, tok, info = load_model("sft", "d2")
    assert info["step"] == 10 and info["val_bpb"] == 1.25 and tok.get_vocab_size() == config.vocab_size
    logits = model.forward(params, jnp.asarray(arrays["idx"]), config)
    np.testing.assert_allclose(np.asarray(logits), arrays["logits"], atol=1e-5, rtol=0)
    with pytest.raises(SystemExit):
        from nanochat_jax.core.common import run_main
        run_main(import_nanochat.main, [str(src)])      # the destination exists: one-line error, exit 2
