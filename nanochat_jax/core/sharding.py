"""Meshes, the one table of partition rules, batch placement and multi-host start-up.

The mesh always has two named axes, `data` and `model` (size 1 unless asked for), with Auto axis types (classic
GSPMD: jit propagates shardings, no `out_sharding` annotations needed). Parallelism is a choice of
column in RULES, not a code path:
  dp    params and optimizer state replicated, batch split over `data`;
  fsdp  params and optimizer state sharded over `data` too (ZeRO-3 style; XLA gathers weights where used);
  tp    Megatron-style tensor parallel over `model` (column-parallel q/k/v/fc, row-parallel projections),
        replicated over `data`.
Optimizer-state shardings come from the same table: a state leaf is matched by the param path its own path ends
with, and a dim that the mesh axis does not divide stays unsharded (e.g. NorMuon's factored (1, out) moments).
"""

from __future__ import annotations

import os
import re

import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from nanochat_jax.core.common import UserError, print0

AXES = ("data", "model")
MODES = ("dp", "fsdp", "tp")
FSDP = "fsdp-auto"   # marker: shard the largest dim that `data` divides
STACK = "stack"      # marker: dim 0 over every device when they divide it (the devices' shares), else FSDP's
                     # choice in fsdp mode, replicated otherwise

# ---------------------------------------------------------------------------------------------------------------
# The rules table: param path (regex matched against the end of a '/'-joined path) -> spec per mode

RULES: list[tuple[str, dict]] = [
    (r"(^|/)wte$",                        dict(dp=P(), fsdp=FSDP, tp=P(None, "model"))),
    (r"(^|/)lm_head$",                    dict(dp=P(), fsdp=FSDP, tp=P(None, "model"))),
    (r"(^|/)value_embeds/\w+$",           dict(dp=P(), fsdp=FSDP, tp=P(None, "model"))),
    (r"(^|/)attn/(c_q|c_k|c_v)$",         dict(dp=P(), fsdp=FSDP, tp=P(None, "model"))),
    (r"(^|/)attn/c_proj$",                dict(dp=P(), fsdp=FSDP, tp=P("model", None))),
    (r"(^|/)mlp/(c_fc|c_gate|c_up)$",     dict(dp=P(), fsdp=FSDP, tp=P(None, "model"))),
    (r"(^|/)mlp/c_proj$",                 dict(dp=P(), fsdp=FSDP, tp=P("model", None))),
    # Muon's state stacks (optim/buckets.py): each device keeps its share of the matrices it orthogonalises
    (r"(^|/)muon_\d+x\d+$",               dict(dp=STACK, fsdp=STACK, tp=STACK)),
    (r".*",                               dict(dp=P(), fsdp=P(), tp=P())),   # scalars, small gates, counters
]
_COMPILED = [(re.compile(pat), specs) for pat, specs in RULES]


def path_str(path) -> str:
    """'blocks/0/attn/c_q' from a jax key path (dict keys, attribute names, sequence indices)."""
    parts = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return "/".join(parts)


def _fit(spec, shape, mesh) -> P:
    """`spec` restricted to dims the mesh axis divides (others replicated); FSDP picks the largest such dim."""
    if spec == FSDP:
        size = mesh.shape["data"]
        dims = sorted(range(len(shape)), key=lambda d: -shape[d])
        for d in dims:
            if size > 1 and shape[d] % size == 0 and shape[d] >= size:
                return P(*[("data" if i == d else None) for i in range(d + 1)])
        return P()
    spec = tuple(spec) + (None,) * (len(shape) - len(tuple(spec)))
    out = []
    for dim, axis in zip(shape, spec[:len(shape)]):
        names = () if axis is None else (axis if isinstance(axis, tuple) else (axis,))
        size = int(np.prod([mesh.shape[a] for a in names])) if names else 1
        out.append(axis if names and size > 1 and dim % size == 0 else None)
    while out and out[-1] is None:   # canonical form: P() for replicated, no trailing Nones
        out.pop()
    return P(*out)


def spec_for(path: str, shape, mode: str, mesh) -> P:
    """The PartitionSpec of the array at `path` (a param, or an optimizer-state leaf ending in a param path)."""
    if mode not in MODES:
        raise UserError(f"sharding mode must be one of {', '.join(MODES)}, got {mode!r}")
    if len(shape) == 0:
        return P()
    for pat, specs in _COMPILED:
        if pat.search(path):
            if specs[mode] == STACK:
                spec = _fit(P(AXES), tuple(shape), mesh)
                return _fit(FSDP, tuple(shape), mesh) if spec == P() and mode == "fsdp" else spec
            return _fit(specs[mode], tuple(shape), mesh)
    return P()


def param_specs(params, mode: str, mesh):
    """A pytree of PartitionSpecs for any pytree of arrays (or ShapeDtypeStructs): params, optimizer state, ..."""
    return jax.tree_util.tree_map_with_path(lambda path, x: spec_for(path_str(path), x.shape, mode, mesh), params)


def tree_shardings(tree, mesh, mode: str):
    """NamedShardings for every leaf of `tree` (params, optimizer state, a whole TrainState)."""
    return jax.tree.map(lambda s: NamedSharding(mesh, s), param_specs(tree, mode, mesh),
                        is_leaf=lambda x: isinstance(x, P))


# ---------------------------------------------------------------------------------------------------------------
# Meshes

def parse_mesh(spec: str | None, n_devices: int) -> dict[str, int]:
    """'data=4,model=2' -> {'data': 4, 'model': 2}; None/'' -> everything on data. One-line UserError otherwise."""
    if not spec:
        return {"data": n_devices, "model": 1}
    sizes = {}
    for part in str(spec).split(","):
        name, eq, value = part.strip().partition("=")
        if not eq or name not in AXES or not value.strip().isdigit() or int(value) < 1:
            raise UserError(f"bad --mesh {spec!r}: expected e.g. 'data=8' or 'data=4,model=2' (axes: data, model)")
        sizes[name] = int(value)
    if "data" not in sizes:   # the unnamed rest goes to data
        rest = n_devices // sizes.get("model", 1)
        sizes["data"] = max(rest, 1)
    sizes.setdefault("model", 1)
    if sizes["data"] * sizes["model"] != n_devices:
        raise UserError(f"--mesh {spec} needs {sizes['data'] * sizes['model']} devices, but {n_devices} are "
                        f"available")
    return sizes


def make_mesh(spec: str | None = None, devices=None) -> jax.sharding.Mesh:
    """A ('data', 'model') mesh over all devices (or `devices`), Auto axis types."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = parse_mesh(spec, len(devices))
    shape = (sizes["data"], sizes["model"])
    return jax.make_mesh(shape, AXES, axis_types=(AxisType.Auto,) * 2, devices=devices)


def describe(mesh, mode: str) -> str:
    return f"mesh data={mesh.shape['data']} model={mesh.shape['model']} ({mesh.devices.size} devices), mode {mode}"


# ---------------------------------------------------------------------------------------------------------------
# Batches

def batch_sharding(mesh, ndim: int = 3) -> NamedSharding:
    """Inputs/targets: (A, B, T) accumulation stacks split on B over `data`; (B, T) batches likewise."""
    spec = P(None, "data", None) if ndim == 3 else P("data", *([None] * (ndim - 1)))
    return NamedSharding(mesh, spec)


def put_batch(batch: dict, mesh) -> dict:
    """Host numpy batch (the global batch on one host, this host's share on several) -> sharded global arrays."""
    out = {}
    for k, v in batch.items():
        v = np.asarray(v)
        sharding = batch_sharding(mesh, v.ndim)
        data, bdim = mesh.shape["data"], (1 if v.ndim == 3 else 0)
        if (v.shape[bdim] * jax.process_count()) % data:
            raise UserError(f"batch size {v.shape[bdim] * jax.process_count()} is not divisible by the data axis "
                            f"({data})")
        if jax.process_count() > 1:
            out[k] = jax.make_array_from_process_local_data(sharding, v)
        else:
            out[k] = jax.device_put(v, sharding)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Several hosts

def init_distributed(coordinator: str | None = None, num_processes: int | None = None,
                     process_id: int | None = None) -> tuple[int, int]:
    """jax.distributed.initialize from arguments, else from $JAX_COORDINATOR_ADDRESS / $JAX_NUM_PROCESSES /
    $JAX_PROCESS_ID; a no-op on a single host. Call before anything touches a device. -> (process_id, count)."""
    coordinator = coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS")
    if num_processes is None and os.environ.get("JAX_NUM_PROCESSES"):
        num_processes = int(os.environ["JAX_NUM_PROCESSES"])
    if process_id is None and os.environ.get("JAX_PROCESS_ID"):
        process_id = int(os.environ["JAX_PROCESS_ID"])
    if coordinator:
        if num_processes is None or process_id is None:
            raise UserError("multi-host run: give the number of processes and this process's id "
                            "(JAX_NUM_PROCESSES, JAX_PROCESS_ID) along with the coordinator address")
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                                   process_id=process_id)
        print0(f"distributed: {jax.process_count()} processes, {jax.device_count()} devices")
    return jax.process_index(), jax.process_count()
