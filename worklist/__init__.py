"""The radiologists' worklist: priority rules, the API and the live page (FastAPI)."""
