"""Command-line entry points, one per stage, each runnable as `python -m scripts.<stage>` (see its docstring)."""
