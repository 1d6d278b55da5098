"""Muon + AdamW, as nanochat trains: Muon for every matrix inside the transformer blocks, AdamW groups for the rest.

Two recipes (nanochat's 2025 original and its 2026 head, `fixtures/nanochat_ref/*.json` `formula_notes`):
- 2025: Nesterov momentum (0.85 -> 0.95 over 300 steps), quintic Newton-Schulz (3.4445, -4.7750, 2.0315) x5 in
  bf16 on X/(|X|_F + 1e-7), update scaled by sqrt(max(1, rows/cols)); AdamW (0.8, 0.95) for wte and lm_head.
- 2026: Nesterov momentum, MuonEq row equilibration, Polar Express x5 (in the compute dtype), Muon+ renormalisation,
  NorMuon variance reduction, cautious weight decay; six AdamW groups with their own lr / betas / weight decay.

Layout: our weights are JAX (in, out); nanochat's "rows" are the output dim = our LAST axis, "cols" = axis -2.

`build_optimizer(params, config, opt_cfg, num_steps, mesh=None)` -> optax.GradientTransformation (multi_transform over
`param_labels(params)`). Muon works on stacks of the matrices that nanochat iterates on with the same (wide) shape,
c_fc and c_proj together, each kept in our layout (a tall one iterates from the right, the transpose of nanochat's
form), and keeps its state in those stacks. With a mesh, each stack is split over all devices: each
device runs the whole Muon step for its share of the matrices and keeps only their state, and one gather brings
the updates back (like nanochat's DistMuon, which reduce-scatters, updates its own params and all-gathers).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from nanochat_jax.core.common import UserError, compute_dtype

__all__ = ['NS_COEFFS_2025', 'POLAR_EXPRESS_COEFFS', 'OptConfig', 'lr_multiplier', 'muon_momentum',
           'muon_weight_decay', 'newton_schulz_2025', 'polar_express', 'MIN_SPLIT_WORK', 'MuonState', 'muon',
           'param_label', 'param_labels', 'adamw_groups', 'build_optimizer']

# 2025: quintic Newton-Schulz coefficients, tuned to maximise the slope at zero (Keller Jordan's Muon)
NS_COEFFS_2025 = (3.4445, -4.7750, 2.0315)
# 2026: Polar Express, num_iters=5, safety_factor=2e-2, cushion=2 (arXiv 2505.16932), as in nanochat head
POLAR_EXPRESS_COEFFS = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)


# ---------------------------------------------------------------------------------------------------------------
# Hyperparameters

@dataclasses.dataclass(frozen=True)
class OptConfig:
    """Optimizer hyperparameters. Defaults are nanochat's per recipe (see `for_recipe`); `lr_scale` is the
    batch-size LR correction and `weight_decay` the already-scaled Muon weight decay (config.py derives both)."""
    recipe: str = "2026"
    matrix_lr: float = 0.02
    embedding_lr: float = 0.3
    unembedding_lr: float = 0.008
    scalar_lr: float = 0.5
    weight_decay: float = 0.28
    lr_scale: float = 1.0
    warmup_steps: int = 40
    warmdown_ratio: float = 0.65
    final_lr_frac: float = 0.05
    ns_steps: int = 5
    muon_beta2: float = 0.9           # NorMuon second-moment EMA (2026)
    adam_eps: float = 1e-10           # nanochat's; step 1 is then sign-like (m/sqrt(v) = g/|g|)
    muon_dtype: str | None = None     # None: bf16 for 2025 (always), the compute dtype (bf16 or fp32) for 2026
    schedules: bool = True            # False: lr multiplier 1, momentum 0.95, constant wd (the fixtures' setting)

    @classmethod
    def for_recipe(cls, recipe: str = "2026", **overrides) -> "OptConfig":
        if recipe == "2025":
            base = dict(recipe="2025", embedding_lr=0.2, unembedding_lr=0.004, weight_decay=0.0, warmup_steps=0,
                        warmdown_ratio=0.2, final_lr_frac=0.0)
        elif recipe == "2026":
            base = dict(recipe="2026")
        else:
            raise UserError(f"unknown recipe {recipe!r} (expected 2025 or 2026)")
        base.update(overrides)
        return cls(**base)


# ---------------------------------------------------------------------------------------------------------------
# Schedules (functions of the 0-based step, like nanochat's base_train; jnp-traceable)

def lr_multiplier(opt_cfg: OptConfig, num_steps: int) -> Callable:
    """Linear warmup over `warmup_steps`, constant, then linear warmdown over the last `warmdown_ratio` of the
    steps to `final_lr_frac` (nanochat base_train.get_lr_multiplier)."""
    if not opt_cfg.schedules:
        return lambda step: jnp.ones((), jnp.float32)
    warmup = opt_cfg.warmup_steps
    warmdown = round(opt_cfg.warmdown_ratio * num_steps)
    final = opt_cfg.final_lr_frac

    def fn(step):
        it = jnp.asarray(step, jnp.float32)
        up = (it + 1) / max(warmup, 1)
        progress = (num_steps - it) / max(warmdown, 1)
        down = progress + (1 - progress) * final
        return jnp.where(it < warmup, up, jnp.where(it <= num_steps - warmdown, 1.0, down))
    return fn


def muon_momentum(opt_cfg: OptConfig, num_steps: int) -> Callable:
    """2025: 0.85 -> 0.95 over the first 300 steps. 2026: 0.85 -> 0.97 over 400 steps, then 0.97 -> 0.90 during
    the LR warmdown (nanochat base_train.get_muon_momentum)."""
    if not opt_cfg.schedules:
        return lambda step: jnp.asarray(0.95, jnp.float32)
    if opt_cfg.recipe == "2025":
        return lambda step: 0.85 + 0.10 * jnp.minimum(jnp.asarray(step, jnp.float32) / 300, 1.0)
    warmdown = round(opt_cfg.warmdown_ratio * num_steps)
    start = num_steps - warmdown

    def fn(step):
        it = jnp.asarray(step, jnp.float32)
        warm = (1 - it / 400) * 0.85 + (it / 400) * 0.97
        progress = (it - start) / max(warmdown, 1)
        down = 0.97 * (1 - progress) + 0.90 * progress
        return jnp.where(it < 400, warm, jnp.where(it >= start, down, 0.97))
    return fn


def muon_weight_decay(opt_cfg: OptConfig, num_steps: int) -> Callable:
    """2026: cosine decay of the (scaled) weight decay to 0 over the run; 2025: none."""
    wd = opt_cfg.weight_decay
    if not opt_cfg.schedules or opt_cfg.recipe == "2025":
        return lambda step: jnp.asarray(wd, jnp.float32)
    return lambda step: wd * 0.5 * (1 + jnp.cos(jnp.pi * jnp.asarray(step, jnp.float32) / max(num_steps, 1)))


# ---------------------------------------------------------------------------------------------------------------
# Orthogonalisation (batched over a leading stack axis; X is (..., in, out) in JAX layout)

def _iterate(W, coeffs, right: bool = False):
    """The iteration on nanochat's wide matrix X (m <= n): A = X X^T, X = (aI + bA + cA^2) X. With `right`, W is
    a tall X^T in our layout and the same polynomial runs from the right: A = W^T W, W = W (aI + bA + cA^2), which
    is exactly the transpose of the left form (A is symmetric), so no transposed copy of W is ever made. nanochat
    writes the last step as aX + (bA + cA^2) X; folding a into the small m x m matrix is the same polynomial
    without a pass over the large X (and XLA:CPU runs the folded form at full speed)."""
    k = W.shape[-1] if right else W.shape[-2]
    eye = jnp.eye(k, dtype=W.dtype)
    for a, b, c in coeffs:
        if right:
            A = jnp.swapaxes(W, -1, -2) @ W
            W = W @ (a * eye + b * A + c * (A @ A))
        else:
            A = W @ jnp.swapaxes(W, -1, -2)
            W = (a * eye + b * A + c * (A @ A)) @ W
    return W


def _tall(shape) -> bool:
    """Whether our (in, out) matrix Y is tall, so that the iteration runs from the right (`_iterate`). nanochat
    iterates on the wide one of X = Y^T and Y: on Y^T when in >= out. For a square Y both forms are the same
    polynomial (p(Y Y^T) Y = Y p(Y^T Y)), and the left one is the faster product on XLA:CPU."""
    return shape[-1] < shape[-2]


def _ns_2025(W, steps: int = 5):
    """nanochat 2025 zeropower_via_newtonschulz5 on W in our layout (already in its dtype): quintic NS on
    W/(|W|_F + 1e-7)."""
    W = W / (jnp.linalg.norm(W, axis=(-2, -1), keepdims=True) + 1e-7)
    return _iterate(W, (NS_COEFFS_2025,) * steps, right=_tall(W.shape))


def _polar_express(W, steps: int = 5):
    """nanochat 2026 on W in our layout: W/(1.01|W|_F + 1e-6), then Polar Express iterations, in W's dtype."""
    W = W / (jnp.linalg.norm(W, axis=(-2, -1), keepdims=True) * 1.01 + 1e-6)
    return _iterate(W, POLAR_EXPRESS_COEFFS[:steps], right=_tall(W.shape))


def newton_schulz_2025(G, steps: int = 5, dtype=jnp.bfloat16):
    """nanochat 2025 zeropower_via_newtonschulz5: quintic NS in `dtype` on X/(|X|_F + 1e-7)."""
    return _ns_2025(G.astype(dtype), steps)


def polar_express(X, steps: int = 5):
    """nanochat 2026: X/(1.01|X|_F + 1e-6), then Polar Express iterations, in X's dtype."""
    return _polar_express(X, steps)


def _fro(x):
    return jnp.sqrt(jnp.sum(jnp.square(x.astype(jnp.float32)), axis=(-2, -1), keepdims=True))


MIN_SPLIT_WORK = 64 ** 3   # m*m*n of one matrix below which splitting costs more in collectives than it saves


def _muoneq_2026(X):
    """MuonEq on a (k, in, out) stack in our layout: each output row of nanochat's X (our column) rescaled to the
    mean row norm."""
    sq = jnp.square(X.astype(jnp.float32))
    fro = jnp.sqrt(jnp.sum(sq, axis=(-2, -1), keepdims=True))
    scale = (fro / math.sqrt(X.shape[-1])) / jnp.maximum(jnp.sqrt(jnp.sum(sq, axis=-2, keepdims=True)), 1e-6)
    return X * scale.astype(X.dtype)


def _normuon_axis(shape) -> int:
    """The axis of our (in, out) layout that NorMuon reduces over: nanochat's red_dim is the short dim of the wide
    matrix it iterates on, its rows for a non-square one and its columns (our rows) for a square one."""
    return -1 if shape[-1] < shape[-2] else -2


def _normuon_cautious_2026(u, s2, p, lr_eff, wd, beta2):
    """NorMuon and cautious weight decay on a (k, in, out) stack in our layout (formula_notes 'Muon step'),
    reducing over `_normuon_axis`. Returns (update, new_s2)."""
    m = min(u.shape[-2:])
    red_axis = _normuon_axis(u.shape)
    v_mean = jnp.mean(jnp.square(u), axis=red_axis, keepdims=True)
    v_norm = jnp.sqrt(jnp.sum(v_mean, axis=(-2, -1), keepdims=True) * m)
    s2 = s2 + (1 - beta2) * (v_mean - s2)
    step = jax.lax.rsqrt(jnp.maximum(s2, 1e-10))
    v_norm_new = jnp.sqrt(jnp.sum(v_mean * m * jnp.square(step), axis=(-2, -1), keepdims=True))
    u = u * (step * (v_norm / jnp.maximum(v_norm_new, 1e-10)))
    # cautious weight decay: decay only where the update and the weight agree in sign
    mask = (u * p) >= 0
    return -(lr_eff * u + lr_eff * wd * p * mask), s2


def _muon_matrices(g, p, s2, *, recipe, lr, wd, beta2, ns_steps, dtype):
    """Muon's orthogonalized step on a stack of same-shape (k, in, out) matrices in our layout: `g` the
    Nesterov-mixed gradients, `p` the weights and `s2` the NorMuon moments (2026, (k, in, 1) or (k, 1, out)), fp32;
    the iteration runs in `dtype`. Returns (update, new_s2)."""
    n_in, n_out = g.shape[-2:]
    lr_eff = lr * math.sqrt(max(1.0, n_out / n_in))
    if recipe == "2025":
        return -lr_eff * _ns_2025(g.astype(dtype), ns_steps).astype(jnp.float32), None
    u = _polar_express(_muoneq_2026(g.astype(dtype)), ns_steps).astype(jnp.float32)
    u = u * (math.sqrt(min(n_in, n_out)) / jnp.maximum(_fro(u), 1e-6))   # Muon+: |X|_F = sqrt(min(rows, cols))
    return _normuon_cautious_2026(u, s2, p, lr_eff, wd, beta2)


def _s2_shape(shape) -> tuple[int, int]:
    """NorMuon's factored moment of an (in, out) matrix: 1 along `_normuon_axis`."""
    red = list(shape)
    red[_normuon_axis(shape)] = 1
    return tuple(red)


def _muon_bucket(g, buf, p, s2, shapes, *, momentum, **kw):
    """One Muon step on a bucket stacked flat: row j of `g` (gradients), `buf` (momentum) and `p` (weights) is a
    matrix of shape shapes[j] raveled, and row j of `s2` its NorMuon moment raveled (2026), all fp32. Runs of
    equal shapes are viewed as (k, in, out) stacks (free reshapes of contiguous rows). Returns (update, new_buf,
    new_s2), flat like the inputs."""
    buf = buf + (1 - momentum) * (g - buf)                      # lerp(buf, g, 1 - mom)
    g = g + momentum * (buf - g)                                # Nesterov: lerp(g, buf, mom)
    ups, s2s, start = [], [], 0
    for shape, run in itertools.groupby(shapes):
        n = len(list(run))
        rows = slice(start, start + n)
        start += n
        u, v = _muon_matrices(g[rows].reshape((n,) + shape), None if p is None else p[rows].reshape((n,) + shape),
                              None if s2 is None else s2[rows].reshape((n,) + _s2_shape(shape)), **kw)
        ups.append(u.reshape(n, -1))
        s2s.append(None if v is None else v.reshape(n, -1))
    cat = lambda xs: xs[0] if len(xs) == 1 else jnp.concatenate(xs)   # noqa: E731
    return cat(ups), buf, (None if s2 is None else cat(s2s))


def _stack(leaves, idx, pad_to):
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


def _buckets(shapes) -> dict[str, list[int]]:
    """Leaf indices grouped by the shape nanochat iterates on (wide: (min, max)), so an MLP's c_fc (d, 4d) and
    c_proj (4d, d) share a bucket; within one, grouped by their own shape (first seen first), then in leaf order."""
    out: dict[str, dict[tuple, list[int]]] = {}
    for i, shape in enumerate(shapes):
        out.setdefault(_bucket_key(shape), {}).setdefault(tuple(shape), []).append(i)
    return {key: [i for idx in by_shape.values() for i in idx] for key, by_shape in out.items()}


def _split_over_devices(mesh, axes, idx, g_leaves, p_leaves, buf, s2, scalars, fn, offset: int = 0):
    """`fn(g, buf, p, s2, shapes, *scalars)` on the bucket of matrices `idx`, each device taking a contiguous share
    of them. Gradients and weights are whole on every device (data parallel): a switch on the device index stacks
    only the device's own share. The momentum and NorMuon stacks (state) are sharded over `axes` when the devices
    divide the bucket, so each device keeps only its share's (like nanochat's DistMuon), else whole, and then the
    shares start at device `offset` (so that small buckets land on different devices).
    Returns (update stack gathered whole on every device, new momentum stack, new s2 stack), unpadded, and the
    device where the next bucket's shares start."""
    from jax.sharding import PartitionSpec as P
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
                g_k = _stack(gs, share, per)
                p_k = None if ps is None else _stack(ps, share, per)
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


# ---------------------------------------------------------------------------------------------------------------
# Muon as an optax GradientTransformation

class MuonState(NamedTuple):
    """Muon's state, per bucket of matrices with the same wide shape (`_buckets`): key 'muon_{m}x{n}' -> a stack,
    one row per matrix (in `_buckets` order) raveled in our (in, out) layout. Stacked state shards over the
    devices' shares of each bucket."""
    count: jax.Array            # int32 step counter (0-based step of the next update)
    momentum: Any               # {key: (k, m*n)} momentum buffers
    second_moment: Any          # {key: (k, n or m)}: NorMuon's factored moments (`_s2_shape`) raveled; None in 2025


def _as_schedule(x):
    return x if callable(x) else (lambda step, _x=x: jnp.asarray(_x, jnp.float32))


def muon(lr, momentum=0.95, weight_decay=0.0, *, recipe: str = "2026", beta2: float = 0.9, ns_steps: int = 5,
         dtype=None, mesh=None, shard_axis=("data", "model")) -> optax.GradientTransformation:
    """Muon over a pytree of 2-D matrices (JAX (in, out) layout). lr / momentum / weight_decay: floats or
    functions of the 0-based step.

    Matrices of the same wide shape are stacked, raveled in our layout (the attention projections of all layers in
    one (4L, d*d) stack, the MLPs' c_fc and c_proj in one (2L, 4d*d)): runs of the same (in, out) shape are viewed
    as (k, in, out) stacks; where nanochat iterates on the transpose, the same polynomial runs from the right
    (`_iterate`) and its reductions follow the axes, so no matrix is ever copied transposed. The state is kept in
    these stacks. With a mesh, each stack is split over the `shard_axis` mesh axes (all devices by default) for
    the whole step, momentum to weight decay: each device does its share of the matrices instead of repeating all of
    them and keeps only its share of the state, and one gather per stack brings the updates back (like nanochat's
    DistMuon)."""
    lr_fn, mom_fn, wd_fn = _as_schedule(lr), _as_schedule(momentum), _as_schedule(weight_decay)
    if dtype is None:
        dtype = jnp.bfloat16 if recipe == "2025" else (
            jnp.bfloat16 if compute_dtype() == jnp.bfloat16 else jnp.float32)  # fp16 is unstable here: fp32
    axes = tuple(a for a in ((shard_axis,) if isinstance(shard_axis, str) else shard_axis)
                 if mesh is not None and a in mesh.axis_names)
    n_split = int(math.prod(mesh.shape[a] for a in axes)) if axes else 1

    def init_fn(params):
        leaves = jax.tree.leaves(params)
        for p in leaves:
            if p.ndim != 2:
                raise ValueError(f"Muon only takes matrices, got shape {p.shape}")
        mom, s2 = {}, {}
        for key, idx in _buckets([p.shape for p in leaves]).items():
            shape = leaves[idx[0]].shape
            mom[key] = jnp.zeros((len(idx), math.prod(shape)), jnp.float32)
            if recipe == "2026":   # the same size for all in a bucket: the long dim, or a square's side
                s2[key] = jnp.zeros((len(idx), math.prod(_s2_shape(shape))), jnp.float32)
        return MuonState(jnp.zeros((), jnp.int32), mom, s2 if recipe == "2026" else None)

    def update_fn(updates, state, params=None):
        if recipe == "2026" and params is None:
            raise ValueError("Muon (2026) needs params for cautious weight decay")
        g_leaves, treedef = jax.tree.flatten(updates)
        p_leaves = treedef.flatten_up_to(params) if recipe == "2026" else None
        step = state.count
        scalars = (mom_fn(step), lr_fn(step), wd_fn(step))

        def fn(g, buf, p, s2, shapes, mom, lr, wd):
            return _muon_bucket(g, buf, p, s2, shapes, recipe=recipe, momentum=mom, lr=lr, wd=wd, beta2=beta2,
                                ns_steps=ns_steps, dtype=dtype)

        out_u = [None] * len(g_leaves)
        new_m, new_s = {}, {}
        offset = 0   # the device where the next bucket's shares start
        for key, idx in _buckets([g.shape for g in g_leaves]).items():
            buf = state.momentum[key]
            s2 = None if recipe == "2025" else state.second_moment[key]
            m, n = sorted(g_leaves[idx[0]].shape)
            if n_split > 1 and m * m * n >= MIN_SPLIT_WORK:
                u, buf, s2, offset = _split_over_devices(mesh, axes, idx, g_leaves, p_leaves, buf, s2, scalars, fn,
                                                         offset)
            else:
                u, buf, s2 = fn(_stack(g_leaves, idx, len(idx)),
                                buf, None if p_leaves is None else _stack(p_leaves, idx, len(idx)), s2,
                                [g_leaves[i].shape for i in idx], *scalars)
            new_m[key], new_s[key] = buf, s2
            for k, i in enumerate(idx):
                out_u[i] = u[k].reshape(g_leaves[i].shape).astype(g_leaves[i].dtype)
        new_state = MuonState(step + 1, new_m, None if recipe == "2025" else new_s)
        return treedef.unflatten(out_u), new_state

    return optax.GradientTransformation(init_fn, update_fn)


# ---------------------------------------------------------------------------------------------------------------
# Parameter groups

def _path_str(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)


def param_label(path: str, ndim: int) -> str:
    """The optimizer group of the param at `path` ('blocks/0/attn/c_q', 'wte', ...)."""
    top = path.split("/")[0]
    if top == "blocks":
        if ndim != 2:  # non-matrix params never reach Muon
            raise ValueError(f"{path}: a non-matrix param inside the blocks has no optimizer group")
        return "muon"
    return {"wte": "embedding", "lm_head": "unembedding", "value_embeds": "value_embeds",
            "resid_lambdas": "resid", "x0_lambdas": "x0", "smear_gate": "smear", "smear_lambda": "smear",
            "backout_lambda": "smear"}.get(top) or _unknown(path)


def _unknown(path):
    raise ValueError(f"{path}: no optimizer group for this param")


def param_labels(params):
    """A pytree like `params` whose leaves are group names: 'muon' (block matrices), 'embedding', 'unembedding',
    'value_embeds', 'resid', 'x0', 'smear'."""
    return jax.tree_util.tree_map_with_path(lambda path, p: param_label(_path_str(path), p.ndim), params)


def adamw_groups(config, opt_cfg: OptConfig) -> dict[str, dict]:
    """AdamW group -> dict(lr, b1, b2, wd) at lr multiplier 1 (nanochat's GPT.setup_optimizer)."""
    s = (config.n_embd / 768) ** -0.5   # AdamW LRs tuned at width 768, scaled by 1/sqrt(width)
    k = opt_cfg.lr_scale
    if opt_cfg.recipe == "2025":
        wd = opt_cfg.weight_decay
        return {"unembedding": dict(lr=opt_cfg.unembedding_lr * s * k, b1=0.8, b2=0.95, wd=wd),
                "embedding": dict(lr=opt_cfg.embedding_lr * s * k, b1=0.8, b2=0.95, wd=wd)}
    return {
        "unembedding": dict(lr=opt_cfg.unembedding_lr * s * k, b1=0.8, b2=0.96, wd=0.01),
        "embedding": dict(lr=opt_cfg.embedding_lr * s * k, b1=0.8, b2=0.995, wd=0.001),
        "value_embeds": dict(lr=opt_cfg.embedding_lr * s * k * 0.5, b1=0.8, b2=0.995, wd=0.01),
        "resid": dict(lr=opt_cfg.scalar_lr * 0.01 * k, b1=0.8, b2=0.95, wd=0.05),
        "x0": dict(lr=opt_cfg.scalar_lr * k, b1=0.96, b2=0.95, wd=0.0),
        "smear": dict(lr=0.2, b1=0.8, b2=0.95, wd=0.0),   # fixed in nanochat's setup_optimizer
    }


def build_optimizer(params, config, opt_cfg: OptConfig | None = None, num_steps: int = 1, mesh=None
                    ) -> optax.GradientTransformation:
    """Muon for the block matrices + AdamW groups, with nanochat's schedules over `num_steps`. `params` only
    supplies the labels (shapes are enough: an abstract tree from jax.eval_shape works)."""
    opt_cfg = opt_cfg or OptConfig.for_recipe(getattr(config, "recipe", "2026"))
    lrm = lr_multiplier(opt_cfg, num_steps)
    groups = adamw_groups(config, opt_cfg)
    used = set(jax.tree.leaves(param_labels(params)))
    missing = used - set(groups) - {"muon"}
    if missing:
        raise ValueError(f"recipe {opt_cfg.recipe} has no AdamW group for {sorted(missing)}")
    transforms = {}
    for name, h in groups.items():
        transforms[name] = optax.adamw(learning_rate=lambda step, _lr=h["lr"]: _lr * lrm(step), b1=h["b1"],
                                       b2=h["b2"], eps=opt_cfg.adam_eps, weight_decay=h["wd"])
    mlr = opt_cfg.matrix_lr * opt_cfg.lr_scale
    dtype = jnp.dtype(opt_cfg.muon_dtype) if opt_cfg.muon_dtype else None
    transforms["muon"] = muon(lambda step: mlr * lrm(step), muon_momentum(opt_cfg, num_steps),
                              muon_weight_decay(opt_cfg, num_steps), recipe=opt_cfg.recipe,
                              beta2=opt_cfg.muon_beta2, ns_steps=opt_cfg.ns_steps, dtype=dtype, mesh=mesh)
    return optax.multi_transform(transforms, param_labels)
