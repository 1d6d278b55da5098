"""nanochat-jax: the whole life of a small ChatGPT-like model, in JAX."""

__version__ = "0.1.0"
