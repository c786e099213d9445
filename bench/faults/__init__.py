"""The fault suite of issue 10: hostile inputs and failing parts (`python -m bench.faults.corpus` builds the corpus)."""
