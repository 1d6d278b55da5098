"""The optimizer: Muon for the block matrices and AdamW for the rest, as one optax transformation."""

from nanochat_jax.optim.build import (OptConfig, adamw_groups, build_optimizer, lr_multiplier, muon_momentum,
                                      muon_weight_decay, param_labels)
from nanochat_jax.optim.muon import muon, newton_schulz_2025, polar_express

__all__ = ["OptConfig", "adamw_groups", "build_optimizer", "lr_multiplier", "muon", "muon_momentum",
           "muon_weight_decay", "newton_schulz_2025", "param_labels", "polar_express"]
