"""The GPT: Flax modules in `gpt` (the architecture), the plain maths in `ops`, the CPU speed paths in `kernels_cpu`.
The names below are the model's API (`from nanochat_jax import model; model.forward(params, tokens, config)`)."""

from nanochat_jax.core.config import ModelConfig, flops_per_token, num_params  # noqa: F401
from nanochat_jax.model.gpt import (GPT, KVCache, forward, forward_cached, init_cache, init_params,  # noqa: F401
                                    loss, loss_and_count)
from nanochat_jax.model.kernels_cpu import (cached_attention, causal_attention, head_losses, linear,  # noqa: F401
                                            softcap_xent)
from nanochat_jax.model.ops import (SOFTCAP, attention_impl, attn_scale, rms_norm,  # noqa: F401
                                    rotary_tables, sdpa, softcap, token_losses)
