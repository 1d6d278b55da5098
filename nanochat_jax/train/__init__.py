"""Training: the jitted train step, the host loop (resume, checkpoints, signals, logging), Orbax checkpoints and
metrics."""
