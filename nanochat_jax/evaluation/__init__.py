"""Evaluation of models: bits per byte (bpb.py), the DCLM CORE metric (core.py), chat evaluation."""
