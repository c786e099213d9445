"""Deliver one stored result object to its destination (queue cpu), every attempt recorded.

The kind's transport (cxr_triage/result_kinds.py) picks the sender: DICOM C-STORE to the PACS (workers/sender.py),
HL7 v2 over MLLP to the RIS (workers/hl7.py), FHIR over HTTP (workers/fhir.py). All share one record of attempts
(delivery_attempts), one retry with backoff (workers/tasks.py send_result) and one outbox re-send path
(listener/dispatch.py via infra/queue.py hand_over_result). A message made on a study's change (Trigger.STUDY) is
built here from its row on its first attempt and stored, so every retry sends the same bytes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Final

from cxr_triage.logs import get_logger
from cxr_triage.result_kinds import RESULT_KINDS, Transport, Trigger
from cxr_triage.routes import Route
from cxr_triage.settings import Settings
from db import repo
from db.models import ResultObject, ResultStatus
from db.session import session_scope
from infra.objectstore import read_object
from workers import fhir, hl7
from workers.interfaces import DeliveryError, MessageContext, Sender, store_object
from workers.sender import DicomSender

log = get_logger(__name__)

# One sender per transport, from the settings (None: no destination configured).
SENDERS: Final[dict[Transport, Callable[[Settings], Sender | None]]] = {
    Transport.DICOM: DicomSender.from_settings,
    Transport.HL7: hl7.Hl7Sender.from_settings,
    Transport.FHIR: fhir.FhirSender.from_settings,
}
# The builders of the kinds made on a study's change (Trigger.STUDY), run when the object is first sent; the kinds made
# with each result are built by the worker (workers/results.py RESULT_BUILDERS). File name suffix of each.
MESSAGE_BUILDERS: Final[dict[str, Callable[[MessageContext], bytes]]] = {"hl7": hl7.build_message}
MESSAGE_SUFFIXES: Final[dict[str, str]] = {"hl7": ".hl7"}


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


def destination_name(settings: Settings, transport: Transport) -> str | None:
    """How delivery_attempts names the transport's configured destination; None when there is none."""
    sender = SENDERS[transport](settings)
    return str(sender) if sender is not None else None


def sender_for(settings: Settings, transport: Transport, recorded: str | None) -> Sender | None:
    """The sender of a result object: for DICOM, the destination recorded on its row (the route of its instance's
    sender, cxr_triage/routes.py); otherwise, or for a row without one, the transport's configured destination."""
    if transport is Transport.DICOM and recorded:
        try:
            return DicomSender.to(settings, Route.parse(recorded))
        except ValueError:  # a row written before routes existed names the default destination
            pass
    return SENDERS[transport](settings)


def _build(settings: Settings, row: ResultObject, ctx: MessageContext) -> str:
    """Build a message from its row and store it: <results>/<StudyInstanceUID>/<kind>-<id><suffix>; returns the ref."""
    data = MESSAGE_BUILDERS[row.kind](ctx)
    return store_object(settings, ctx.study_instance_uid, f"{row.kind}-{row.id}{MESSAGE_SUFFIXES[row.kind]}", data)


def deliver(settings: Settings, result_id: int, *, attempt: int) -> DeliveryOutcome:
    """One delivery attempt of a result object, recorded in delivery_attempts. Idempotent once delivered."""
    url = settings.effective_database_url
    with session_scope(url) as session:
        row = session.get(ResultObject, result_id)
        if row is None or row.status in (ResultStatus.DELIVERED, ResultStatus.STORED):
            return DeliveryOutcome(Delivery.NOOP)
        kind = RESULT_KINDS.get(row.kind)
        transport = kind.transport if kind is not None else Transport.DICOM
        sender = sender_for(settings, transport, row.destination)
        bound = log.bind(result_id=result_id, kind=row.kind, attempt=attempt)
        if row.sop_instance_uid:
            bound = bound.bind(result_sop_instance_uid=row.sop_instance_uid)
        if sender is None:
            repo.record_delivery(session, result_id, destination="", dimse_status=None, error="no destination")
            return DeliveryOutcome(Delivery.NOOP, "no destination configured")
        not_built: DeliveryError | None = None
        if not row.path and kind is not None and kind.trigger is Trigger.STUDY:
            try:
                row.path = _build(settings, row, MessageContext.load(session, settings, row))
            except (LookupError, ValueError) as exc:  # what it would say is gone or invalid: retrying cannot help
                not_built = DeliveryError(f"not built: {exc}", final=True)
            except OSError as exc:  # the results store is away
                not_built = DeliveryError(f"not stored: {exc}")
        ref = row.path
    try:
        if not_built is not None:
            raise not_built
        sent = sender.send(read_object(settings, ref))
    except (DeliveryError, OSError, ValueError) as exc:
        final = getattr(exc, "final", False) or attempt >= settings.results_send_max_retries
        with session_scope(url) as session:
            repo.record_delivery(
                session,
                result_id,
                destination=str(sender),
                dimse_status=getattr(exc, "dimse_status", None),
                answer=getattr(exc, "answer", None),
                error=str(exc)[:500],
                final=final,
            )
        bound.warning("results.send_failed", destination=str(sender), error=str(exc)[:200], final=final)
        return DeliveryOutcome(Delivery.FAILED if final else Delivery.RETRY, str(exc))
    with session_scope(url) as session:
        repo.record_delivery(
            session, result_id, destination=str(sender), dimse_status=sent.dimse_status, answer=sent.answer, error=None
        )
    bound.info("results.delivered", destination=str(sender), answer=sent.answer, dimse_status=sent.dimse_status)
    return DeliveryOutcome(Delivery.DELIVERED)
