"""Celery workers: the triage task, the ensemble runner, the results sent back to the PACS and retraining."""
