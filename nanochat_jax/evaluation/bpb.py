"""Bits per byte: a tokenizer-independent validation loss.

    bpb = sum of nats over target tokens with byte length > 0  /  (ln 2 * sum of their byte lengths)

Special tokens (byte length 0) and ignored targets (-1) count in neither sum, so the number compares models with
different vocabularies (nanochat's `evaluate_bpb`). The per-batch sums run in one jitted function; the totals are
accumulated on the host in float64.

Byte lengths are each token's raw bytes, as nanochat 2026 counts them. nanochat 2025 counted the bytes of each token
decoded on its own, so a token that holds part of a UTF-8 character counted 3 (its U+FFFD): on text with non-ASCII
characters its bpb is a little lower for the same model. `Tokenizer.token_bytes(decoded=True)` (base_loss
`--bytes decoded`) counts as 2025 did, to compare with figures nanochat 2025 reported.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from nanochat_jax import model

BYTE_COUNTS = ("raw", "decoded")


def bytes_note(recipe: str, byte_count: str) -> str | None:
    """A line for reports when a bpb figure may be set beside one counted another way (see the module docstring)."""
    if recipe == "2025" and byte_count == "raw":
        return ("bpb counts raw token bytes (nanochat 2026's way); nanochat 2025 counted decoded bytes (a partial "
                "UTF-8 token = 3), so compare with its figures using --bytes decoded")
    return None


def one_pass_steps(tokens: int, rows: int, T: int, pass_batches: int, flag: str) -> tuple[int, str | None]:
    """Batches of (rows, T) to evaluate for `tokens` asked (by `flag`), at most one pass over the split.

    pass_batches: the batches one pass over the split fills (its loader's `pass_batches`). The loaders repeat a
    split endlessly, and reading a small split again only adds time, not information. Returns (batches, None), or
    (pass_batches, a line saying that the evaluation was cut to one pass).
    """
    asked = max(1, tokens // (rows * T))
    if asked <= pass_batches:
        return asked, None
    return pass_batches, (f"{flag} {tokens:,} asks for {asked:,} batches of {rows}x{T}, but the split fills only "
                          f"{pass_batches:,}: evaluating one pass over it ({pass_batches * rows * T:,} tokens)")


def make_bpb_fn(config=None, loss_fn=None):
    """Jitted (params, inputs (B,T), targets (B,T), token_bytes (V,)) -> (sum of nats, sum of bytes).

    loss_fn(params, inputs, targets) -> (sum of token losses over targets != -1, count); default the model's.
    """
    if loss_fn is None:
        loss_fn = functools.partial(model.loss_and_count, config=config)

    @jax.jit
    def bpb_sums(params, inputs, targets, token_bytes):
        valid = targets >= 0
        nbytes = jnp.where(valid, token_bytes[jnp.where(valid, targets, 0)], 0)
        counted = jnp.where(nbytes > 0, targets, -1)   # specials and ignored positions drop out of the loss too
        nats, _ = loss_fn(params, inputs, counted)
        return nats.astype(jnp.float32), nbytes.sum(dtype=jnp.int32)

    return bpb_sums


def evaluate_bpb(params, batches, token_bytes, steps: int | None = None, config=None, loss_fn=None, put=None,
                 bpb_fn=None) -> float:
    """Bits per byte over `steps` batches (all of them if None) of an iterable of {"inputs", "targets"} (B, T).

    put: maps a host batch array to device arrays (e.g. sharded over the mesh); default jnp.asarray.
    bpb_fn: a function from `make_bpb_fn`, to reuse its compilation across calls.
    """
    bpb_fn = bpb_fn or make_bpb_fn(config, loss_fn)
    put = put or jnp.asarray
    token_bytes = jnp.asarray(np.asarray(token_bytes, dtype=np.int32))
    total_nats, total_bytes = 0.0, 0
    sums = []
    for i, batch in enumerate(batches):
        if steps is not None and i >= steps:
            break
        sums.append(bpb_fn(params, put(batch["inputs"]), put(batch["targets"]), token_bytes))
    for nats, nbytes in sums:  # read back at the end: the device runs ahead of the host
        total_nats += float(nats)
        total_bytes += int(nbytes)
    if total_bytes == 0:
        return float("inf")
    return total_nats / (math.log(2) * total_bytes)
