"""Celery workers: the triage task, the ensemble runner and (later) results sent back to the PACS."""
