"""Benchmarks: each script answers one question (benchmarks/README.md lists them); `common` holds what they share.
Run them from the repository root as modules: python -m benchmarks.NAME --help."""
