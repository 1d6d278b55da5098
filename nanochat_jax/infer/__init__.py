"""Inference: the KV-cached engine, the batch scheduler and the sandbox for model-written code."""
