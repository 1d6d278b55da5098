"""Muon's device bucketing: the block matrices grouped by the wide shape nanochat iterates on, stacked flat, and
(with a mesh) each stack split over the devices.

A bucket key is 'muon_{m}x{n}' with m <= n, so an MLP's c_fc (d, 4d) and c_proj (4d, d) share one. A bucket's
matrices are stacked one row per matrix, raveled in our (in, out) layout. With a mesh, each device runs the whole
Muon step for a contiguous share of a bucket's matrices and keeps only their state, and one gather brings the
updates back (like nanochat's DistMuon, which reduce-scatters, updates its own params and all-gathers).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

MIN_SPLIT_WORK = 64 ** 3   # m*m*n of one matrix below which splitting costs more in collectives than it saves


def stack_leaves(leaves, idx, pad_to):
    """(pad_to, numel) fp32 stack of leaves[idx] (not empty) raveled, zero rows after them."""
    parts = [leaves[i].astype(jnp.float32).reshape(-1) for i in idx]
    return jnp.stack(parts + [jnp.zeros_like(parts[0])] * (pad_to - len(idx)))


def _pad_rows(x, start, stop, per):
    """Rows start:stop of the stack x, zero rows after them up to `per`."""
    x = x[start:min(stop, x.shape[0])]
    return x if x.shape[0] == per else jnp.concatenate([x, jnp.zeros((per - x.shape[0],) + x.shape[1:], x.dtype)])


def _bucket_key(shape) -> str:
    m, n = sorted(shape)
    return f"muon_{m}x{n}"


def bucket_leaves(shapes) -> dict[str, list[int]]:
    """Leaf indices grouped by the shape nanochat iterates on (wide: (min, max)), so an MLP's c_fc (d, 4d) and
    c_proj (4d, d) share a bucket; within one, grouped by their own shape (first seen first), then in leaf order."""
    out: dict[str, dict[tuple, list[int]]] = {}
    for i, shape in enumerate(shapes):
        out.setdefault(_bucket_key(shape), {}).setdefault(tuple(shape), []).append(i)
    return {key: [i for idx in by_shape.values() for i in idx] for key, by_shape in out.items()}


def split_over_devices(mesh, axes, idx, g_leaves, p_leaves, buf, s2, scalars, fn, offset: int = 0):
    """`fn(g, buf, p, s2, shapes, *scalars)` on the bucket of matrices `idx`, each device taking a contiguous share
    of them. Gradients and weights are whole on every device (data parallel): a switch on the device index stacks
    only the device's own share. The momentum and NorMuon stacks (state) are sharded over `axes` when the devices
    divide the bucket, so each device keeps only its share's (like nanochat's DistMuon), else whole, and then the
    shares start at device `offset` (so that small buckets land on different devices).
    Returns (update stack gathered whole on every device, new momentum stack, new s2 stack), unpadded, and the
    device where the next bucket's shares start."""
    size = int(math.prod(mesh.shape[a] for a in axes))
    count = len(idx)
    per = -(-count // size)
    sharded = count % size == 0
    state_spec = P(axes) if sharded else P()
    first = 0 if sharded else offset % size   # the device of the first share
    unrotate = lambda x: x if first == 0 else jnp.roll(x, -first * per, axis=0)   # noqa: E731

    def local(gs, ps, b, v, scal):
        d = jax.lax.axis_index(axes)

        def branch(k):   # device k's share: matrices idx[k*per : (k+1)*per], zero matrices to fill it
            share = idx[k * per:(k + 1) * per]
            shapes = [gs[i].shape for i in share]
            shapes += [shapes[-1] if shapes else gs[idx[-1]].shape] * (per - len(share))   # padding: zeros

            def own(stack):   # this device's rows of a state stack
                if stack is None or sharded:
                    return stack
                return _pad_rows(stack, k * per, (k + 1) * per, per)
            if share:
                g_k = stack_leaves(gs, share, per)
                p_k = None if ps is None else stack_leaves(ps, share, per)
            else:
                g_k = jnp.zeros((per,) + b.shape[1:], jnp.float32)
                p_k = None if ps is None else g_k
            return fn(g_k, own(b), p_k, own(v), shapes, *scal)
        u, b, v = jax.lax.switch((d - first) % size, [lambda k=k: branch(k) for k in range(size)])
        u = unrotate(jax.lax.all_gather(u, axes, tiled=True))
        if not sharded:
            b = unrotate(jax.lax.all_gather(b, axes, tiled=True))
            v = None if v is None else unrotate(jax.lax.all_gather(v, axes, tiled=True))
        return u, b, v

    u, b, v = jax.shard_map(local, mesh=mesh, in_specs=(P(), P(), state_spec, state_spec, P()),
                            out_specs=(P(), state_spec, state_spec), check_vma=False)(
        g_leaves, p_leaves, buf, s2, scalars)
    used = -(-count // per)   # devices that got matrices
    return u[:count], b[:count], (None if v is None else v[:count]), offset + used
