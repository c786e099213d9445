"""Benchmarks for cxr-triage (run from the repository root, e.g. `python -m bench.ingest`)."""
