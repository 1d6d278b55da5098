"""The run report: sections written by each stage, the summary and its plots."""
