"""A train state as checkpoint items: the params as their own pytree, every other leaf in a flat dict, and the
restore targets (jax.ShapeDtypeStructs carrying shardings on the current mesh); the meta as clean JSON.

`checkpoint.CheckpointManager` saves and restores through these; `load` builds its params target with them.
"""

from __future__ import annotations

import dataclasses
import json

import jax
import numpy as np


# ---------------------------------------------------------------------------------------------------------------
# Train state <-> (params, flat dict of the other leaves)
# The params are saved as their own nested-dict item (so inference restores them alone); everything else in the
# train state (optax NamedTuples, the step counter, a loss scale) is flattened to {"00000": leaf, ...} in tree
# order, which Orbax stores without needing to know the container types. The caller's target state supplies the
# structure again on restore.

def split_state(state):
    """state -> (params, rest) where rest is the state with params removed (a dict, NamedTuple or dataclass)."""
    if isinstance(state, dict):
        return state["params"], {k: v for k, v in state.items() if k != "params"}
    if hasattr(state, "_replace"):
        return state.params, state._replace(params=None)
    if hasattr(state, "replace"):  # flax.struct.dataclass
        return state.params, state.replace(params=None)
    if dataclasses.is_dataclass(state):
        return state.params, dataclasses.replace(state, params=None)
    raise TypeError(f"checkpoint: cannot split a train state of type {type(state).__name__} (needs .params)")


def join_state(rest, params):
    if isinstance(rest, dict):
        return {**rest, "params": params}
    if hasattr(rest, "_replace"):
        return rest._replace(params=params)
    if hasattr(rest, "replace"):
        return rest.replace(params=params)
    return dataclasses.replace(rest, params=params)


def flatten_rest(tree) -> tuple[dict, object, list[str]]:
    leaves_with_path, treedef = jax.tree_util.tree_flatten_with_path(tree)
    flat = {f"{i:05d}": leaf for i, (_, leaf) in enumerate(leaves_with_path)}
    paths = [jax.tree_util.keystr(p) for p, _ in leaves_with_path]
    return flat, treedef, paths


# ---------------------------------------------------------------------------------------------------------------
# Restore targets: every leaf as a jax.ShapeDtypeStruct carrying its sharding on the current mesh

def _abstract(x, sharding=None):
    """A jax.ShapeDtypeStruct with a sharding, from an array, a ShapeDtypeStruct or a Python/numpy scalar."""
    if isinstance(x, jax.ShapeDtypeStruct):
        if x.sharding is None and sharding is not None:
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)
        return x
    if isinstance(x, jax.Array):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
    a = np.asarray(x)
    return jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding or _default_sharding())


def _default_sharding():
    return jax.sharding.SingleDeviceSharding(jax.local_devices()[0])


def abstract_state(state, sharding=None):
    """The restore target for `state`: every leaf as a ShapeDtypeStruct carrying its (current-mesh) sharding."""
    return jax.tree.map(lambda x: _abstract(x, sharding), state)


def params_target(metadata_tree, shardings):
    """The restore target of a params tree from its Orbax metadata: on the first local device (shardings None),
    on one Sharding for every leaf, or on a pytree of them."""
    is_leaf = lambda x: hasattr(x, "shape") and hasattr(x, "dtype")  # noqa: E731
    if shardings is None or isinstance(shardings, jax.sharding.Sharding):
        s = shardings or _default_sharding()
        return jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=s), metadata_tree,
                            is_leaf=is_leaf)
    return jax.tree.map(lambda m, s: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=s), metadata_tree,
                        shardings, is_leaf=is_leaf)


# ---------------------------------------------------------------------------------------------------------------
# The meta as JSON

def config_dict(config) -> dict:
    if config is None:
        return None
    if isinstance(config, dict):
        d = config
    elif hasattr(config, "to_dict"):
        d = config.to_dict()
    else:
        d = dataclasses.asdict(config)
    return json.loads(json.dumps(d))  # tuples -> lists, so it compares equal with what JSON gives back


def jsonable(obj):
    """A JSON-clean copy: numpy/jax scalars -> Python numbers, arrays -> lists, tuples -> lists."""
    def default(x):
        if hasattr(x, "tolist"):
            return x.tolist()
        if dataclasses.is_dataclass(x):
            return dataclasses.asdict(x)
        raise TypeError(f"checkpoint meta: {type(x).__name__} is not JSON-serialisable")
    return json.loads(json.dumps(obj, default=default))
