"""Deliver one stored result object to the configured destination (queue cpu), every attempt recorded."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from cxr_triage.logs import get_logger
from cxr_triage.settings import Settings
from db import repo
from db.models import ResultObject, ResultStatus
from db.session import session_scope
from infra.objectstore import open_object
from workers.sender import Destination, SendError, c_store

log = get_logger(__name__)


class Delivery(StrEnum):
    """The outcome of one delivery attempt."""

    DELIVERED = "delivered"
    RETRY = "retry"  # failed; the task retries later with backoff
    FAILED = "failed"  # failed for the last time
    NOOP = "noop"  # nothing to do: delivered already, stored only, or no destination


@dataclass(frozen=True)
class DeliveryOutcome:
    status: Delivery
    detail: str = ""


def deliver(settings: Settings, result_id: int, *, attempt: int) -> DeliveryOutcome:
    """One delivery attempt of a result object, recorded in delivery_attempts. Idempotent once delivered."""
    destination = Destination.from_settings(settings)
    url = settings.effective_database_url
    with session_scope(url) as session:
        row = session.get(ResultObject, result_id)
        if row is None or row.status in (ResultStatus.DELIVERED, ResultStatus.STORED):
            return DeliveryOutcome(Delivery.NOOP)
        ref, sop_uid = row.path, row.sop_instance_uid
    bound = log.bind(result_sop_instance_uid=sop_uid, attempt=attempt)
    if destination is None:
        with session_scope(url) as session:
            repo.record_delivery(session, result_id, destination="", dimse_status=None, error="no destination")
        return DeliveryOutcome(Delivery.NOOP, "no destination configured")
    try:
        status = c_store(destination, open_object(settings, ref), calling_aet=settings.ae_title)
    except (SendError, OSError, ValueError) as exc:
        final = attempt >= settings.results_send_max_retries
        with session_scope(url) as session:
            repo.record_delivery(
                session,
                result_id,
                destination=str(destination),
                dimse_status=getattr(exc, "dimse_status", None),
                error=str(exc)[:500],
                final=final,
            )
        bound.warning("results.send_failed", destination=str(destination), error=str(exc)[:200], final=final)
        return DeliveryOutcome(Delivery.FAILED if final else Delivery.RETRY, str(exc))
    with session_scope(url) as session:
        repo.record_delivery(session, result_id, destination=str(destination), dimse_status=status, error=None)
    bound.info("results.delivered", destination=str(destination), dimse_status=status)
    return DeliveryOutcome(Delivery.DELIVERED)
