"""cxr-triage: the domain vocabulary shared by listener, workers, training and db."""

__version__ = "0.1.0"
