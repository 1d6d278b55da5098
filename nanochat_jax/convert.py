"""Entry point kept for outside code: `nanochat_jax.convert.from_nanochat(state_dict, config_dict)`.
The conversion lives in `nanochat_jax.interop.convert`."""

from nanochat_jax.interop.convert import from_nanochat, to_nanochat  # noqa: F401
