"""Muon, the optimizer nanochat uses for every matrix inside the transformer blocks, as an optax transformation.

Two recipes (nanochat's 2025 original and its 2026 head, `fixtures/nanochat_ref/*.json` `formula_notes`):
- 2025: Nesterov momentum, quintic Newton-Schulz (3.4445, -4.7750, 2.0315) x5 in bf16 on X/(|X|_F + 1e-7), update
  scaled by sqrt(max(1, rows/cols)).
- 2026: Nesterov momentum, MuonEq row equilibration, Polar Express x5 (in the compute dtype), Muon+ renormalisation,
  NorMuon variance reduction, cautious weight decay.

Layout: our weights are JAX (in, out); nanochat's "rows" are the output dim = our LAST axis, "cols" = axis -2.

Muon works on stacks of the matrices that nanochat iterates on with the same (wide) shape, c_fc and c_proj
together, each kept in our layout (a tall one iterates from the right, the transpose of nanochat's form), and keeps
its state in those stacks; `optim/buckets.py` forms the stacks and splits them over the devices. In fp32 the MLP
stacks iterate through their Gram matrix (`_iterate_gram`: the same polynomial, fewer products), and on CPU every
stack the C++ kernel takes (model/csrc/muon_cpu.cc) runs there.
"""

from __future__ import annotations

import itertools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from nanochat_jax.core.common import compute_dtype
from nanochat_jax.model import attention_cpu
from nanochat_jax.optim.buckets import MIN_SPLIT_WORK, bucket_leaves, split_over_devices, stack_leaves

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
# Orthogonalisation (batched over a leading stack axis; X is (..., in, out) in JAX layout)

GRAM_MIN_ASPECT = 2   # long side / short side from which _iterate_gram does fewer multiply-adds than the direct form


def _iterate(W, coeffs, right: bool = False):
    """The polynomial iteration on nanochat's wide matrix X (m <= n): A = X X^T, X = (aI + bA + cA^2) X for each
    (a, b, c) in coeffs. With `right`, W is a tall X^T in our layout and the same polynomial runs from the right:
    A = W^T W, W = W (aI + bA + cA^2), exactly the transpose of the left form (A is symmetric), so no transposed copy
    of W is ever made. An fp32 X at least GRAM_MIN_ASPECT times wider than tall takes the polynomial through its Gram
    matrix (`_iterate_gram`), others the direct form (`_iterate_direct`); on CPU, a stack the C++ kernel takes runs
    there, in the same form (attention_cpu.polar_iterate)."""
    m, n = sorted(W.shape[-2:])
    gram = W.dtype == jnp.float32 and n >= GRAM_MIN_ASPECT * m
    stack = W.reshape((-1,) + W.shape[-2:])
    if jax.default_backend() == "cpu" and attention_cpu.supports_polar(stack) and attention_cpu.available():
        return attention_cpu.polar_iterate(stack, coeffs, right, gram).reshape(W.shape)
    return (_iterate_gram if gram else _iterate_direct)(W, coeffs, right)


def _iterate_direct(W, coeffs, right: bool = False):
    """`_iterate` in nanochat's form, A recomputed from X at every iteration. nanochat writes the last step as
    aX + (bA + cA^2) X; folding a into the small m x m matrix is the same polynomial without a pass over the large X
    (and XLA:CPU runs the folded form at full speed)."""
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


def _iterate_gram(W, coeffs, right: bool = False):
    """`_iterate`'s polynomial carried on the small m x m Gram matrix instead of the m x n X. With A_k = X_k X_k^T
    and B_k = a_k I + b_k A_k + c_k A_k^2, X_{k+1} = B_k X_k gives A_{k+1} = B_k A_k B_k = A_k B_k^2 (B_k is a
    polynomial in A_k, so the two commute), and the result is Q X_0 with Q = B_{K-1} ... B_0. X is multiplied twice
    (A_0, then Q X_0) instead of twice per iteration: for five iterations 17 m^3 + 2 m^2 n multiply-adds against
    5 (m^3 + 2 m^2 n), i.e. 25 m^3 against 45 m^3 for an MLP's (d, 4d) matrix. The same function in exact
    arithmetic; rounding in A builds up over the iterations (the direct form recomputes A from X each time): in fp32
    the result stays within ~3e-5 of the largest entry, though the directions of X's smallest singular values keep
    only ~1e-4 relative precision (the same stack batched differently differs there), and bf16 would lose them, so
    `_iterate` uses it for fp32 only."""
    A = jnp.swapaxes(W, -1, -2) @ W if right else W @ jnp.swapaxes(W, -1, -2)
    eye = jnp.eye(A.shape[-1], dtype=W.dtype)
    Q = None
    for i, (a, b, c) in enumerate(coeffs):
        B = a * eye + b * A + c * (A @ A)
        Q = B if Q is None else B @ Q
        if i + 1 < len(coeffs):
            A = A @ (B @ B)
    return W @ Q if right else Q @ W


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


# ---------------------------------------------------------------------------------------------------------------
# Muon as an optax GradientTransformation

class MuonState(NamedTuple):
    """Muon's state, per bucket of matrices with the same wide shape (`bucket_leaves`): key 'muon_{m}x{n}' -> a
    stack, one row per matrix (in `bucket_leaves` order) raveled in our (in, out) layout. Stacked state shards over
    the devices' shares of each bucket."""
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
        for key, idx in bucket_leaves([p.shape for p in leaves]).items():
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
        for key, idx in bucket_leaves([g.shape for g in g_leaves]).items():
            buf = state.momentum[key]
            s2 = None if recipe == "2025" else state.second_moment[key]
            m, n = sorted(g_leaves[idx[0]].shape)
            if n_split > 1 and m * m * n >= MIN_SPLIT_WORK:
                u, buf, s2, offset = split_over_devices(mesh, axes, idx, g_leaves, p_leaves, buf, s2, scalars, fn,
                                                        offset)
            else:
                u, buf, s2 = fn(stack_leaves(g_leaves, idx, len(idx)),
                                buf, None if p_leaves is None else stack_leaves(p_leaves, idx, len(idx)), s2,
                                [g_leaves[i].shape for i in idx], *scalars)
            new_m[key], new_s[key] = buf, s2
            for k, i in enumerate(idx):
                out_u[i] = u[k].reshape(g_leaves[i].shape).astype(g_leaves[i].dtype)
        new_state = MuonState(step + 1, new_m, None if recipe == "2025" else new_s)
        return treedef.unflatten(out_u), new_state

    return optax.GradientTransformation(init_fn, update_fn)
