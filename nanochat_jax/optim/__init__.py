"""The optimizer: Muon for the block matrices and AdamW for the rest, as one optax transformation."""

from nanochat_jax.optim.muon import *  # noqa: F401,F403
from nanochat_jax.optim.muon import __all__  # noqa: F401
