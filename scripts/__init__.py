"""`python -m scripts.<stage>` from a checkout: each module here runs the stage in nanochat_jax/cli/ (installed, the
same stages are `nanochat-jax <stage>`)."""
