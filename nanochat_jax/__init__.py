"""nanochat-jax: the whole life of a small ChatGPT-like model, in JAX. The layers are described in
docs/ARCHITECTURE.md. Outside code needs two names to use a trained (or imported) model:

    from nanochat_jax import load_model, Engine
    params, config, tokenizer, meta = load_model("sft", model_tag="d20")   # or load_model(path="~/exports/d20")
    print(Engine(params, config, tokenizer).chat("Why is the sky blue?"))

Both are imported on first use, so `import nanochat_jax` stays free of JAX.
"""

__version__ = "0.1.0"


def load_model(source: str | None = None, model_tag: str | None = None, step: int | None = None, *,
               path=None, **kwargs):
    """(params, config, tokenizer, meta) of stage `source` (base|mid|sft|rl) under the base dir (model_tag None:
    the most recently written; step None: the newest), or of `path` (a run, step or export directory, e.g. what
    scripts.import_nanochat wrote); see `nanochat_jax.train.load`."""
    from nanochat_jax.train import load  # on call: `import nanochat_jax` stays free of JAX
    if path is not None:
        if source is not None or model_tag is not None:
            raise TypeError("load_model: give a stage (source, model_tag) or a path, not both")
        return load.load_model_from_path(path, step, **kwargs)
    if source is None:
        raise TypeError("load_model: give a stage (base|mid|sft|rl) or path=...")
    return load.load_model(source, model_tag, step, **kwargs)


def __getattr__(name):
    if name == "Engine":
        from nanochat_jax.infer.engine import Engine  # on first use: `import nanochat_jax` stays free of JAX
        return Engine
    raise AttributeError(f"module 'nanochat_jax' has no attribute {name!r}")
