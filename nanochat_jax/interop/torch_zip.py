"""torch's .pt file format, read and written without torch.

A .pt file (torch.save's zip format) is a zip: <archive>/data.pkl (the pickled object), <archive>/data/<key> (raw
storage bytes, little-endian), and small records (byteorder, version). The pickle names `torch._utils.
_rebuild_tensor_v2` for each tensor, with a persistent id ('storage', torch.<X>Storage, key, 'cpu', numel) for its
data.

Reading: a restricted unpickler admits only the tensor-rebuild functions, storage types and OrderedDict; any other
class in the file is refused. Writing: the pickle is emitted opcode by opcode (protocol 2, as torch.save) with
exactly those names, so `torch.load(path)` (weights_only, torch's default) reads it, and each storage record starts
at a 64-byte boundary, as torch aligns them.
"""

from __future__ import annotations

import collections
import io
import pickle
import struct
import zipfile
from pathlib import Path

import ml_dtypes
import numpy as np

from nanochat_jax.core.common import UserError

_STORAGE_DTYPES = {"FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
                   "BFloat16Storage": "bfloat16", "LongStorage": np.int64, "IntStorage": np.int32,
                   "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_}


# ---------------------------------------------------------------------------------------------------------------
# Reading

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


def read_torch_file(path):
    """What a torch-saved (zip format) file holds, tensors as numpy arrays (bf16 as ml_dtypes), without torch."""
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
    return obj


def read_torch_state_dict(path) -> dict[str, np.ndarray]:
    """A torch-saved (zip format) state_dict as {name: numpy array}, without torch. bf16 arrives as ml_dtypes."""
    obj = read_torch_file(path)
    if not isinstance(obj, dict):
        raise UserError(f"{path} does not hold a state_dict (got {type(obj).__name__})")
    return {k: v for k, v in obj.items()}


# ---------------------------------------------------------------------------------------------------------------
# Writing: pickle opcodes (protocol 2), then the zip

_STORAGE_NAMES = {np.dtype(v) if v != "bfloat16" else np.dtype(ml_dtypes.bfloat16): k
                  for k, v in _STORAGE_DTYPES.items()}
_ALIGN = 64  # torch starts every storage record at a multiple of 64 bytes (so that torch.load(mmap=True) works)


def _op_global(module: str, name: str) -> bytes:
    return b"c" + f"{module}\n{name}\n".encode()


def _op_str(s: str) -> bytes:
    b = s.encode()
    return b"X" + struct.pack("<I", len(b)) + b


def _op_int(n: int) -> bytes:
    if 0 <= n < 256:
        return b"K" + bytes([n])
    if -2 ** 31 <= n < 2 ** 31:
        return b"J" + struct.pack("<i", n)
    raw = n.to_bytes(n.bit_length() // 8 + 1, "little", signed=True)
    return b"\x8a" + bytes([len(raw)]) + raw  # LONG1


def _op_tuple(items) -> bytes:
    return b"(" + b"".join(items) + b"t"


_OP_ORDERED_DICT = _op_global("collections", "OrderedDict") + b")R"  # OrderedDict()


def _op_tensor(key: str, a: np.ndarray) -> bytes:
    """_rebuild_tensor_v2((storage key), 0, shape, contiguous strides, False, OrderedDict()), as torch.save."""
    strides = tuple(s // a.itemsize for s in a.strides) if a.ndim else ()
    storage = _op_tuple([_op_str("storage"), _op_global("torch", _STORAGE_NAMES[a.dtype]), _op_str(key),
                         _op_str("cpu"), _op_int(a.size)]) + b"Q"  # BINPERSID
    args = _op_tuple([storage, _op_int(0), _op_tuple(map(_op_int, a.shape)), _op_tuple(map(_op_int, strides)),
                      b"\x89", _OP_ORDERED_DICT])  # \x89: False (requires_grad)
    return _op_global("torch._utils", "_rebuild_tensor_v2") + args + b"R"


def _pickle(obj, arrays: list) -> bytes:
    """Pickle opcodes of a tensor or a {str: tensor} dict (an OrderedDict, as a state_dict); each tensor's array
    is appended to `arrays`, its storage key being its index there."""
    def tensor(a):
        arrays.append(a)
        return _op_tensor(str(len(arrays) - 1), a)

    if isinstance(obj, dict):
        body = _OP_ORDERED_DICT + b"(" + b"".join(_op_str(k) + tensor(v) for k, v in obj.items()) + b"u"
    else:
        body = tensor(obj)
    return b"\x80\x02" + body + b"."


def _write_aligned(zf: zipfile.ZipFile, name: str, data) -> None:
    """Store `data` uncompressed, with the local header padded (an extra field, as torch's 'FB') so that the bytes
    start at a multiple of _ALIGN in the file."""
    header = 30 + len(name.encode()) + 4  # local file header + name + the extra field's own 4 bytes
    pad = -(zf.fp.tell() + header) % _ALIGN
    info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
    info.compress_type = zipfile.ZIP_STORED
    info.extra = b"FB" + struct.pack("<H", pad) + b"\0" * pad
    info.file_size = memoryview(data).nbytes
    with zf.open(info, "w") as f:
        f.write(data)


def write_torch_file(path, obj) -> Path:
    """Save a numpy array, or a {str: array} dict, as torch.save would (zip format, tensors contiguous on CPU).

    dtypes: those torch has storages for (float32/64/16, bfloat16 from ml_dtypes, int64/32/16/8, uint8, bool).
    The archive folder is the file's stem, as torch names it. Written to a temporary name, then renamed.
    """
    path = Path(path)
    items = obj.values() if isinstance(obj, dict) else [obj]
    for a in items:
        if not isinstance(a, np.ndarray) or a.dtype not in _STORAGE_NAMES:
            raise UserError(f"cannot write {type(a).__name__} {getattr(a, 'dtype', '')} as a torch tensor")
    if isinstance(obj, dict):
        obj = {str(k): np.asarray(v, order="C") for k, v in obj.items()}
    else:
        obj = np.asarray(obj, order="C")
    arrays: list[np.ndarray] = []
    pkl = _pickle(obj, arrays)
    archive = path.stem
    tmp = path.with_name(path.name + ".tmp")
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as zf:
        _write_aligned(zf, f"{archive}/data.pkl", pkl)
        _write_aligned(zf, f"{archive}/.format_version", b"1")
        _write_aligned(zf, f"{archive}/.storage_alignment", str(_ALIGN).encode())
        _write_aligned(zf, f"{archive}/byteorder", b"little")
        for key, a in enumerate(arrays):
            _write_aligned(zf, f"{archive}/data/{key}", a.reshape(-1).view(np.uint8))
        _write_aligned(zf, f"{archive}/version", b"3\n")
    tmp.replace(path)
    return path
