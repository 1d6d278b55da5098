"""Other projects' formats, without torch: nanochat's checkpoints and state_dicts in and out, torch's .pt files, and
a Hugging Face Transformers directory for its NanoChat model."""
