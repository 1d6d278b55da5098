"""The C++ CPU kernels in csrc/ behind jax.ffi: fused causal attention with its own backward pass
(csrc/attention_cpu.cc), the LM head's softcapped cross-entropy with its gradient (csrc/xent_cpu.cc), Muon's
polynomial iteration over a stack of matrices (csrc/muon_cpu.cc), the products of a few rows by a weight matrix
that a decode step makes, and on a CPU with AMX the model's large products as bf16x3 on the tile unit
(csrc/matmul_cpu.cc).

XLA:CPU computes attention as batched matmuls and elementwise passes over (B, H, T, T) scores in DRAM, at a
fraction of the machine's matmul rate; the kernel keeps each query block's scores in cache and skips the key blocks
a query cannot see. The cross-entropy kernel reads each row of logits once and writes its gradient over it while
the row is in cache. The Muon kernel carries each matrix through all its iterations on one thread while its m x m
operands stay in cache, and computes the products with a symmetric result by halves; on a CPU with AMX (Intel's
tile unit) its products run there as bf16x3 (csrc/amx.h, `polar_splits`). The few-rows product reads
each weight once, whole rows at a time, where XLA:CPU's GEMM repacks the weights (bench/RESULTS.md has the
measurements). They are built, as one library, on first use with the
system's C++ compiler ($CXX, default g++) against the FFI headers jaxlib ships, for this machine's CPU
(-march=native), and cached under $NANOCHAT_KERNEL_CACHE (default ~/.cache/nanochat_jax/kernels), keyed by the
sources, jaxlib's version and the CPU. Where they cannot be built, `available()` is False, one warning says why,
and the XLA paths run instead. NANOCHAT_CPU_ATTENTION=0 turns them off; NANOCHAT_AMX=0 keeps every product in fp32, off the tile
unit."""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

CSRC = Path(__file__).with_name("csrc")
SOURCES = tuple(CSRC / f for f in ("attention_cpu.cc", "xent_cpu.cc", "muon_cpu.cc", "matmul_cpu.cc"))   # one library
BLOCK = 64          # the kernel's query/key block: T must be a multiple
HEAD_MULTIPLE = 32  # and the head dim a multiple of its micro-kernel's width
_TARGETS = {"nanochat_attention_fwd": "NanochatAttentionForward", "nanochat_attention_bwd": "NanochatAttentionBackward",
            "nanochat_cached_attention": "NanochatCachedAttention", "nanochat_softcap_xent": "NanochatSoftcapXent",
            "nanochat_polar_iterate": "NanochatPolarIterate", "nanochat_small_matmul": "NanochatSmallMatmul",
            "nanochat_tile_matmul": "NanochatTileMatmul", "nanochat_row_argmax": "NanochatRowArgmax",
            "nanochat_attention_rope_fwd": "NanochatAttentionRopeForward",
            "nanochat_attention_rope_bwd": "NanochatAttentionRopeBackward"}


def _cpu_id() -> str:
    """What -march=native depends on: the CPU's model and flags (a cache shared by machines keeps one build each)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
        return "\n".join(sorted({ln for ln in info.splitlines() if ln.startswith(("model name", "flags"))}))
    except OSError:
        return platform.processor() or platform.machine()


def _build() -> Path:
    """The compiled kernel library, built now if the cache has none for this source, jaxlib and CPU."""
    cxx = os.environ.get("CXX", "g++")
    flags = ["-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-pthread"]
    texts = [p.read_text() for p in (*SOURCES, CSRC / "simd.h", CSRC / "amx.h")]
    key = hashlib.sha256("\0".join([*texts, jax.__version__, cxx, *flags, _cpu_id()]).encode())
    cache = Path(os.environ.get("NANOCHAT_KERNEL_CACHE") or Path.home() / ".cache" / "nanochat_jax" / "kernels")
    lib = cache / f"attention_cpu-{key.hexdigest()[:16]}.so"
    if lib.exists():
        return lib
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        out = Path(tmp) / lib.name
        cmd = [cxx, *flags, f"-I{jax.ffi.include_dir()}", *map(str, SOURCES), "-o", str(out)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{cxx} failed: {(done.stderr or done.stdout).strip().splitlines()[-1:]}")
        os.replace(out, lib)       # atomic: a concurrent process sees the whole library or none
    return lib


_LIB = None   # the loaded kernel library, once available() succeeded


@functools.lru_cache(maxsize=1)
def available() -> bool:
    """True once the kernels are built, loaded and registered with XLA for the CPU; False (with one warning) where it
    cannot be, or when NANOCHAT_CPU_ATTENTION=0."""
    if os.environ.get("NANOCHAT_CPU_ATTENTION", "1").strip() == "0":
        return False
    global _LIB
    try:
        lib = ctypes.CDLL(str(_build()))
        for name, symbol in _TARGETS.items():
            jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
    except (OSError, RuntimeError, AttributeError, FileNotFoundError) as e:
        print(f"nanochat_jax: the fused CPU kernels are unavailable ({e}); attention, the cross-entropy, Muon's "
              "iteration and the decode products run through XLA instead (slower). Install a C++ compiler (g++) to "
              "enable them.", file=sys.stderr)
        return False
    _LIB = lib
    return True


@functools.lru_cache(maxsize=1)
def amx_ready() -> bool:
    """Whether the kernels run products on the AMX tile unit here: built with AMX (-march=native on a CPU that has
    AMX-BF16) and granted the tile state by Linux."""
    return available() and bool(_LIB.NanochatAmxReady())


def supports(q, k) -> bool:
    """Whether the kernel takes these shapes: fp32, T a multiple of 64, head dim a multiple of 32."""
    T, D = q.shape[1], q.shape[3]
    return (q.dtype == jnp.float32 and k.dtype == jnp.float32 and T % BLOCK == 0 and D % HEAD_MULTIPLE == 0
            and q.shape[2] % k.shape[2] == 0 and k.shape[1] == T)


def _require():
    """The kernels are registered with XLA (built first if need be); callers check available() beforehand."""
    if not available():
        raise RuntimeError("the fused CPU kernels are unavailable (see the warning above)")


def _attrs(scale: float, window: int) -> dict:
    _require()
    return {"scale": np.float32(scale), "window": np.int64(window)}


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def attention(q, k, v, scale: float, window: int):
    """softmax(q k^T * scale) v over keys i - window .. i for query i; q (B, T, H, D), k and v (B, T, KV, D), fp32.
    window >= T - 1 is full causal attention."""
    return _forward(q, k, v, scale, window)[0]


def _forward(q, k, v, scale, window):
    B, T, H, _ = q.shape
    out = (jax.ShapeDtypeStruct(q.shape, jnp.float32), jax.ShapeDtypeStruct((B, H, T), jnp.float32))
    o, lse = jax.ffi.ffi_call("nanochat_attention_fwd", out)(q, k, v, **_attrs(scale, window))
    return o, (q, k, v, o, lse)


def _backward(scale, window, res, g):
    q, k, v, o, lse = res
    out = tuple(jax.ShapeDtypeStruct(a.shape, jnp.float32) for a in (q, k, v))
    return jax.ffi.ffi_call("nanochat_attention_bwd", out)(q, k, v, o, lse, g.astype(jnp.float32),
                                                          **_attrs(scale, window))


attention.defvjp(_forward, _backward)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def attention_rope(q, k, v, cos, sin, scale: float, window: int, eps: float):
    """attention(rms_norm(rotary(q)), rms_norm(rotary(k)), v) with the rotary embedding (half-split, cos and sin
    (T, D/2)) and the parameter-free RMS norm (eps) applied inside the kernel, on q and k as the projections made
    them: the two cost no passes of their own over (B, T, H, D) arrays, forward or backward."""
    return _rope_forward(q, k, v, cos, sin, scale, window, eps)[0]


def _rope_attrs(scale, window, eps):
    return {**_attrs(scale, window), "eps": np.float32(eps)}


def _rope_forward(q, k, v, cos, sin, scale, window, eps):
    B, T, H, _ = q.shape
    out = (jax.ShapeDtypeStruct(q.shape, jnp.float32), jax.ShapeDtypeStruct((B, H, T), jnp.float32))
    o, lse = jax.ffi.ffi_call("nanochat_attention_rope_fwd", out)(q, k, v, cos, sin, **_rope_attrs(scale, window, eps))
    return o, (q, k, v, cos, sin, o, lse)


def _rope_backward(scale, window, eps, res, g):
    q, k, v, cos, sin, o, lse = res
    out = tuple(jax.ShapeDtypeStruct(a.shape, jnp.float32) for a in (q, k, v))
    dq, dk, dv = jax.ffi.ffi_call("nanochat_attention_rope_bwd", out)(
        q, k, v, cos, sin, o, lse, g.astype(jnp.float32), **_rope_attrs(scale, window, eps))
    return dq, dk, dv, jnp.zeros_like(cos), jnp.zeros_like(sin)


attention_rope.defvjp(_rope_forward, _rope_backward)


def supports_cache(q, k, v) -> bool:
    """Whether cached_attention takes these arrays: fp32 queries and cache, head dim a multiple of 16 up to 256."""
    D = q.shape[-1]
    return all(a.dtype == jnp.float32 for a in (q, k, v)) and D % 16 == 0 and D <= 256 and q.shape[2] % k.shape[1] == 0


def cached_attention(q, k, v, mask, scale: float):
    """ops.cached_attention in one kernel call: q (B, t, H, D) over keys (B, KV, D, S) and values (B, KV, S, D)
    where mask (B, t, S) is set, reading each row's visible span only; a row that sees no key gets zeros.
    Inference only (no gradient)."""
    _require()
    out = jax.ShapeDtypeStruct(q.shape, jnp.float32)
    return jax.ffi.ffi_call("nanochat_cached_attention", out)(q, k, v, mask.astype(jnp.bool_), scale=np.float32(scale))


def softcap_xent(z, targets, vocab: int, cap: float, grad: bool = True):
    """(losses (N,), dz (N, V)) of the cross-entropy of cap * tanh(z / cap)[:, :vocab] against targets (N,) int32,
    from fp32 logits z (N, V): 0 loss and a zero gradient row where a target is < 0, zero gradient in the padded
    columns. dz (d loss_i / d z_i, per row) is written over z's buffer; with grad=False it holds no gradient and
    only the losses count. Same formula as ops.token_losses(ops.softcap(z)[:, :vocab], targets)."""
    _require()
    out = (jax.ShapeDtypeStruct(z.shape[:1], jnp.float32), jax.ShapeDtypeStruct(z.shape, jnp.float32))
    return jax.ffi.ffi_call("nanochat_softcap_xent", out, input_output_aliases={0: 1})(
        z, targets.astype(jnp.int32), vocab=np.int64(vocab), cap=np.float32(cap), grad=bool(grad))


POLAR_MULTIPLE = 32   # both sides of a matrix the Muon kernel takes: a multiple of its micro-kernel's width


def supports_polar(w) -> bool:
    """Whether polar_iterate takes this (k, r, c) stack: fp32, both sides multiples of 32, and at least two
    matrices per core (the kernel runs one matrix per thread; with fewer, XLA's per-product threading wins)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return (w.ndim == 3 and w.dtype == jnp.float32 and w.shape[1] % POLAR_MULTIPLE == 0
            and w.shape[2] % POLAR_MULTIPLE == 0 and w.shape[0] >= 2 * cores)


def polar_splits() -> int:
    """How polar_iterate multiplies by default: bf16x3 products on the AMX tile unit where amx_ready() (3), about
    twice as fast as fp32 there and within ~5e-5 of the fp32 iteration's largest entry after five iterations (2e-4 at
    most in the tests), the order of the fp32 Gram form's own distance from the direct one. The Gram form takes them
    for its two products with X only; its chain of small products stays in fp32 (csrc/muon_cpu.cc).
    NANOCHAT_AMX=0, or no tile unit: fp32 throughout (0)."""
    return 3 if tiles_on() else 0


def tiles_on() -> bool:
    """Whether the kernels' products run on the AMX tile unit as bf16x3 by default: where amx_ready(), unless
    NANOCHAT_AMX=0 (then every product is fp32)."""
    return os.environ.get("NANOCHAT_AMX", "1").strip() != "0" and amx_ready()


def polar_iterate(w, coeffs, right: bool, gram: bool, splits: int | None = None):
    """optim/muon.py's `_iterate` (gram: `_iterate_gram`) on a (k, r, c) fp32 stack in one kernel call, one matrix
    per thread, the products with a symmetric result computed by halves. coeffs: the (a, b, c) of each iteration.
    splits: the products in fp32 (0), or on the AMX tile unit where the CPU has one (csrc/amx.h) from bf16 operands
    (1) or from high and low bf16 parts (3, bf16x3); None: polar_splits()."""
    _require()
    c = jnp.asarray(np.asarray(coeffs, np.float32).reshape(-1, 3))
    splits = polar_splits() if splits is None else splits
    return jax.ffi.ffi_call("nanochat_polar_iterate", jax.ShapeDtypeStruct(w.shape, jnp.float32))(
        w, c, right=bool(right), gram=bool(gram), splits=np.int64(splits))


TILE_MIN = 128   # each side of a product tile_matmul takes: at least this, and a multiple of 32 (smaller ones gain
                 # little over XLA's fp32 GEMM and keep the exact fp32 arithmetic)


def supports_tile(m: int, n: int, k: int) -> bool:
    """Whether tile_matmul takes an (m x k) (k x n) product here: tiles_on(), and each side >= TILE_MIN and a
    multiple of 32."""
    return all(d >= TILE_MIN and d % POLAR_MULTIPLE == 0 for d in (m, n, k)) and tiles_on()


def tile_matmul(a, b, at: bool = False, bt: bool = False):
    """op(a) @ op(b) of fp32 matrices on the AMX tile unit as bf16x3 (csrc/matmul_cpu.cc): each operand split into
    high and low bf16 parts, a b ~ ah bh + ah bl + al bh with fp32 accumulation, within ~1e-5 of the fp32 product's
    largest entry. op(a) is a, or a.T with at (a given as (k, m)); op(b) is b, or b.T with bt. Callers check
    supports_tile."""
    _require()
    m, n = a.shape[1 if at else 0], b.shape[0 if bt else 1]
    return jax.ffi.ffi_call("nanochat_tile_matmul", jax.ShapeDtypeStruct((m, n), jnp.float32))(
        a, b, at=bool(at), bt=bool(bt))


SMALL_ROWS = (1, 16)   # the rows small_matmul serves (bench/RESULTS.md): from ~16 rows the product is no longer
                       # bound by reading the weights but by multiply-adds, a GEMM's job


def supports_small(x, w) -> bool:
    """Whether small_matmul takes x (..., k) @ w (k, n): fp32, 1 to 16 rows, n a multiple of 32."""
    rows = int(np.prod(x.shape[:-1]))
    return (x.dtype == jnp.float32 and w.dtype == jnp.float32 and w.ndim == 2 and x.shape[-1] == w.shape[0]
            and SMALL_ROWS[0] <= rows <= SMALL_ROWS[1] and w.shape[1] % POLAR_MULTIPLE == 0)


def small_matmul(x, w):
    """x (..., k) @ w (k, n) in fp32 for a few rows (csrc/matmul_cpu.cc): the weights streamed once from memory,
    where XLA:CPU's GEMM for more than one row first copies them into packed panels."""
    _require()
    x2 = x.reshape(-1, x.shape[-1])
    out = jax.ShapeDtypeStruct((x2.shape[0], w.shape[1]), jnp.float32)
    y = jax.ffi.ffi_call("nanochat_small_matmul", out, vmap_method="sequential")(x2, w)
    return y.reshape(*x.shape[:-1], w.shape[1])


def row_argmax(z):
    """jnp.argmax(z, axis=-1) for fp32 z (..., V) as int32 (csrc/xent_cpu.cc): the first index of each row's largest
    value (its first NaN where it holds one), in one vectorized pass over the row."""
    _require()
    out = jax.ShapeDtypeStruct(z.shape[:-1], jnp.int32)
    return jax.ffi.ffi_call("nanochat_row_argmax", out, vmap_method="broadcast_all")(z)
