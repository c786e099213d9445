"""The C-STORE handler: validate, spool durably, record, queue, and only then answer Success."""

from __future__ import annotations

import socket
import time
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom import evt
from sqlalchemy.exc import SQLAlchemyError

from cxr_triage import dicom_status as status
from cxr_triage.logs import get_logger
from cxr_triage.settings import Settings
from cxr_triage.uids import is_valid_uid
from db import repo
from db.models import InstanceStatus
from db.session import session_scope
from listener.dispatch import Dispatcher
from listener.intake import decide
from listener.spool import write_instance

log = get_logger(__name__)


def _column_value(ds: Dataset, keyword: str, limit: int) -> str | None:
    """The attribute as stored in a database column: None when absent or empty, else cut to the column width."""
    value = ds.get(keyword)
    if value is None or str(value) == "":
        return None
    return str(value)[:limit]


class StoreHandler:
    """Handles EVT_C_STORE. Runs in the association's thread; must not decode pixels or run models."""

    def __init__(self, settings: Settings, dispatcher: Dispatcher) -> None:
        self.settings = settings
        self.dispatcher = dispatcher

    def __call__(self, event: evt.Event) -> int:
        started = time.perf_counter()
        calling_aet = event.assoc.requestor.ae_title
        request: Any = event.request
        request_sop_uid = str(request.AffectedSOPInstanceUID or "")
        bound = log.bind(calling_aet=calling_aet)
        try:
            ds = event.dataset
            ds.file_meta = event.file_meta
            sop_class_uid = str(ds.get("SOPClassUID", ""))
            sop_uid = ds.get("SOPInstanceUID")
            study_uid = ds.get("StudyInstanceUID")
        except Exception as exc:
            bound.warning("store.rejected", reason="unparseable data set", error=type(exc).__name__)
            return status.CANNOT_UNDERSTAND
        if not is_valid_uid(sop_uid) or not is_valid_uid(study_uid):
            bound.warning("store.rejected", reason="invalid SOP Instance or Study Instance UID")
            return status.CANNOT_UNDERSTAND
        sop_uid, study_uid = str(sop_uid), str(study_uid)
        bound = bound.bind(sop_instance_uid=sop_uid, study_instance_uid=study_uid)
        if sop_uid != request_sop_uid or sop_class_uid != str(request.AffectedSOPClassUID):
            bound.warning("store.rejected", reason="data set UIDs differ from the C-STORE request")
            return status.DATASET_DOES_NOT_MATCH_SOP_CLASS
        if "PixelData" not in ds:
            bound.warning("store.rejected", reason="no pixel data in an image storage instance")
            return status.DATASET_DOES_NOT_MATCH_SOP_CLASS

        try:
            spooled = write_instance(
                self.settings.effective_spool_dir,
                study_instance_uid=study_uid,
                sop_instance_uid=sop_uid,
                data=event.encoded_dataset(include_meta=True),
            )
        except OSError as exc:
            bound.error("store.spool_failed", error=f"{type(exc).__name__}: {exc.strerror or exc}")
            return status.OUT_OF_RESOURCES

        decision = decide(ds, self.settings)
        record = repo.ReceivedInstance(
            sop_instance_uid=sop_uid,
            sop_class_uid=sop_class_uid,
            study_instance_uid=study_uid,
            series_instance_uid=_column_value(ds, "SeriesInstanceUID", 64),
            transfer_syntax_uid=str(event.context.transfer_syntax),
            calling_aet=calling_aet,
            modality=_column_value(ds, "Modality", 16),
            body_part=_column_value(ds, "BodyPartExamined", 64),
            view_position=_column_value(ds, "ViewPosition", 16),
            path=str(spooled.path.resolve()),
            size_bytes=spooled.size_bytes,
            sha256=spooled.sha256,
            status=InstanceStatus.RECEIVED if decision.triage else InstanceStatus.SKIPPED,
            status_reason=decision.reason,
            patient_name=_column_value(ds, "PatientName", 200),
            patient_id=_column_value(ds, "PatientID", 64),
            accession_number=_column_value(ds, "AccessionNumber", 64),
            study_date=_column_value(ds, "StudyDate", 8),
            study_description=_column_value(ds, "StudyDescription", 200),
            requested_priority=_column_value(ds, "RequestedProcedurePriority", 16),
        )
        try:
            with session_scope(self.settings.effective_database_url) as session:
                instance, created = repo.record_received(session, record)
                instance_id = instance.id
        except SQLAlchemyError as exc:
            bound.error("store.db_failed", error=type(exc).__name__)
            return status.OUT_OF_RESOURCES

        queued = False
        if created and decision.triage:
            queued = self.dispatcher.dispatch(instance_id, sop_instance_uid=sop_uid)
        bound.info(
            "store.accepted",
            bytes=spooled.size_bytes,
            transfer_syntax=record.transfer_syntax_uid,
            duplicate=not created,
            triage=decision.triage,
            skip_reason=decision.reason,
            queued=queued,
            ms=round((time.perf_counter() - started) * 1000, 1),
        )
        return status.SUCCESS


def set_tcp_nodelay(event: evt.Event) -> None:
    """EVT_CONN_OPEN: disable Nagle so small C-STORE responses are not held back by delayed ACKs."""
    sock: Any = getattr(event.assoc.dul.socket, "socket", None)
    if sock is not None:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            log.warning("socket.nodelay_failed")


def log_association(event: evt.Event) -> None:
    requestor = event.assoc.requestor
    log.info(f"association.{event.event.name.lower()}", calling_aet=requestor.ae_title, peer=requestor.address)
