"""Other projects' formats: nanochat's PyTorch checkpoints and state_dicts in and out."""
