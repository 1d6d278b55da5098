"""nanochat-jax: the whole life of a small ChatGPT-like model, in JAX. The layers are described in
docs/ARCHITECTURE.md; `load_model(source, model_tag=None, step=None) -> (params, config, tokenizer, meta)` is the one
call outside code needs to get a trained model."""

__version__ = "0.1.0"


def load_model(source: str, model_tag: str | None = None, step: int | None = None, **kwargs):
    """(params, config, tokenizer, meta) of stage `source` (base|mid|sft|rl) under the base dir; see
    `nanochat_jax.train.load.load_model`. Imported on call: `import nanochat_jax` stays free of JAX."""
    from nanochat_jax.train.load import load_model as load  # on call: `import nanochat_jax` stays free of JAX
    return load(source, model_tag, step, **kwargs)
