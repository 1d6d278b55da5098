"""Shared test helpers: the nanochat reference fixtures (tests/fixtures/nanochat_ref, see tests/fixtures/README.md)."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import numpy as np
import pytest

NANOCHAT_REF = Path(__file__).resolve().parent / "fixtures" / "nanochat_ref"


def fixture_path(name: str, suffix: str = ".npz") -> Path:
    """Path of `<name><suffix>` in tests/fixtures/nanochat_ref; skips the test when it is not there."""
    p = NANOCHAT_REF / f"{name}{suffix}"
    if p.is_file():
        return p
    pytest.skip(f"fixture {name}{suffix} not available")


def load_ref(name: str):
    """(npz arrays as a dict, the JSON meta) of a nanochat reference fixture, e.g. 'orig_d2', 'head_d4'."""
    with np.load(fixture_path(name, ".npz")) as z:
        arrays = {k: z[k] for k in z.files}
    meta = json.loads(fixture_path(name, ".json").read_text())
    return arrays, meta


def ref_state_dict(arrays: dict, prefix: str = "") -> dict:
    """The nanochat parameters in a fixture's arrays (keys `<prefix><state_dict name>`), prefix stripped."""
    skip = ("grad/", "act/", "rope/", "after1/", "after2/")
    names = {"idx", "targets", "logits", "loss", "loss_fp64", "loss2"}
    if prefix:
        return {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}
    return {k: v for k, v in arrays.items() if not k.startswith(skip) and k not in names}


def max_rel(a, b) -> float:
    """The fixture README's error: max|a-b| / max|b| over the tensor."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


@contextlib.contextmanager
def direct_muon():
    """Muon in nanochat's direct form through XLA, for tests that compare two computations of one step (sharded and
    not, accumulated and not). The Gram form (optim/muon.py, _iterate_gram) carries rounding in A through all
    iterations, so inputs that differ by fp32 rounding (a gradient summed in another order, a stack batched or split
    differently, the CPU kernel against XLA) give updates that differ by up to ~1e-4 in the directions of the
    smallest singular values; the direct form shows what the compared machinery itself changes, which must stay
    within 1e-5. tests/test_attention_cpu.py checks the kernel and the Gram form against the XLA forms."""
    import importlib
    from nanochat_jax.model import attention_cpu
    muon_mod = importlib.import_module("nanochat_jax.optim.muon")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(attention_cpu, "supports_polar", lambda w: False)
        mp.setattr(muon_mod, "GRAM_MIN_ASPECT", float("inf"))
        yield
