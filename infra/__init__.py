"""Infrastructure shared by the service's roles: the broker (Celery configuration, producers, hand-over of work) and
the health checks. Imports the domain (cxr_triage) and db; nothing above them."""
