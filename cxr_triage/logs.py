"""Structured JSON logs (structlog) with correlation fields and a guard that drops patient identifiers."""

from __future__ import annotations

import logging
import sys
import warnings
from collections.abc import MutableMapping
from typing import Any

import structlog
from structlog.typing import FilteringBoundLogger

# Keys that must never reach a log line, whatever a caller passes (PHI: PS3.15 Annex E basic profile subset).
PHI_KEYS = frozenset(
    {
        "patient_name",
        "patientname",
        "patient_id",
        "patientid",
        "patient_birth_date",
        "patientbirthdate",
        "birth_date",
        "other_patient_ids",
        "patient_address",
    }
)


def _drop_phi(_: Any, __: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    for key in list(event_dict):
        if key.lower().replace("-", "_") in PHI_KEYS:
            event_dict[key] = "[redacted]"
    return event_dict


class _Stderr:
    """Writes to whatever sys.stderr is at the time of the call (test runners and daemons swap it)."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


def _log_warning(
    message: Warning | str, category: type[Warning], filename: str, lineno: int, *_: Any, **__: Any
) -> None:
    # Library warnings (pydicom, highdicom) quote attribute values, which can be patient names: log where and
    # what kind of warning it was, never its text.
    structlog.get_logger("warnings").warning("library.warning", category=category.__name__, at=f"{filename}:{lineno}")


def configure_logging(*, level: str = "INFO", fmt: str = "json", component: str = "cxr-triage") -> None:
    """Configure structlog and the stdlib root logger once per process; logs go to stderr."""
    renderer: Any = (
        structlog.processors.JSONRenderer() if fmt == "json" else structlog.dev.ConsoleRenderer(colors=False)
    )
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _drop_phi,
    ]
    structlog.configure(
        processors=[*shared, structlog.processors.format_exc_info, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=structlog.PrintLoggerFactory(file=_Stderr()),  # type: ignore[arg-type]
        cache_logger_on_first_use=False,
    )
    structlog.contextvars.bind_contextvars(component=component)
    warnings.showwarning = _log_warning
    # Libraries (pynetdicom, celery, kombu) log through the stdlib: render them as JSON too, at WARNING and above
    # by default so that pynetdicom's per-PDU chatter (which can include patient names) stays out.
    handler = logging.StreamHandler(_Stderr())  # type: ignore[arg-type]
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
            foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)


def get_logger(name: str | None = None) -> FilteringBoundLogger:
    """A structlog logger; bind correlation fields with `.bind(sop_instance_uid=...)`."""
    logger: FilteringBoundLogger = structlog.get_logger(name)
    return logger
