"""Test-session set-up shared by every test file.

8 fake CPU devices (for the sharding tests; single-device code simply uses device 0), fp32 compute, a persistent
compilation cache so reruns skip compiles, and a private base dir and Hugging Face cache so tests never touch the
user's caches.
"""

import os
import tempfile
from pathlib import Path

# The concurrency-optimized scheduler deadlocked XLA:CPU's collectives (data=4,model=2) under load: keep it off.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 "
                                   "--xla_cpu_enable_concurrency_optimized_scheduler=false")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("NANOCHAT_DTYPE", "float32")
_CACHE = Path(os.environ.get("NANOCHAT_TEST_CACHE", Path(tempfile.gettempdir()) / "nanochat_jax_test_cache"))
os.environ.setdefault("NANOCHAT_JAX_CACHE", str(_CACHE / "jax_cache"))
os.environ.setdefault("HF_HUB_CACHE", str(_CACHE / "hf_hub"))  # never the user's Hugging Face cache
os.environ.setdefault("NANOCHAT_KERNEL_CACHE", str(_CACHE / "kernels"))

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).resolve().parent / "fixtures"


@pytest.fixture(autouse=True, scope="session")
def _jax_setup():
    from nanochat_jax.core.common import enable_compilation_cache
    enable_compilation_cache(os.environ["NANOCHAT_JAX_CACHE"])
    yield


@pytest.fixture()
def base_dir(tmp_path, monkeypatch):
    """A private $NANOCHAT_BASE_DIR for one test."""
    d = tmp_path / "base"
    d.mkdir()
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(d))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf_hub"))  # and a private Hugging Face cache
    return d
