"""The C-STORE handler: validate, spool durably, record, queue, and only then answer Success."""

from __future__ import annotations

import contextlib
import socket
import time
import zlib
from io import BytesIO
from pathlib import Path
from typing import Any

import pydicom
from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset
from pydicom.uid import DeflatedExplicitVRLittleEndian
from pynetdicom import evt
from sqlalchemy.exc import SQLAlchemyError

from cxr_triage import dicom_status as status
from cxr_triage.logs import get_logger
from cxr_triage.settings import Settings
from cxr_triage.uids import is_valid_uid
from db import repo
from db.models import InstanceStatus
from db.session import session_scope
from infra.disk import spool_space
from listener.dispatch import Dispatcher
from listener.intake import decide
from listener.spool import open_spool

log = get_logger(__name__)


def _column_value(ds: Dataset, keyword: str, limit: int) -> str | None:
    """The attribute as stored in a database column: None when absent or empty, else cut to the column width."""
    value = ds.get(keyword)
    text = "" if value is None else str(value).replace("\x00", "")  # PostgreSQL refuses NUL in text
    return text[:limit] or None


class TooLarge(Exception):
    """The data set is larger than CXR_MAX_DATASET_BYTES (received, or once inflated)."""


def inflate_bounded(data: bytes, limit: int) -> bytes:
    """Inflate a Deflated Explicit VR data set, refusing to produce more than `limit` bytes (a deflate bomb)."""
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    out = inflater.decompress(data, limit + 1)
    if len(out) > limit or inflater.unconsumed_tail:
        raise TooLarge(f"inflated data set larger than {limit} bytes")
    return out


def received_file(event: evt.Event) -> Path | None:
    """pynetdicom's temporary file of the data set when it receives to disk (listener/server.py), else None."""
    try:
        return Path(event.dataset_path)
    except (AttributeError, TypeError):
        return None


def read_request_dataset(event: evt.Event, path: Path | None, limit: int) -> Dataset:
    """The C-STORE data set, parsed within `limit` bytes: checked received size, bounded inflation, large values
    (the pixel data) left on disk until read."""
    deflated = event.context.transfer_syntax == DeflatedExplicitVRLittleEndian
    if path is None:
        request: Any = event.request
        stream = request.DataSet.getvalue()
        if len(stream) > limit:
            raise TooLarge(f"data set of {len(stream)} bytes, larger than {limit}")
        if not deflated:
            return event.dataset
    else:
        size = path.stat().st_size
        if size > limit:
            raise TooLarge(f"data set of {size} bytes, larger than {limit}")
        if not deflated:
            return pydicom.dcmread(path, defer_size="1 MB")
        meta = pydicom.filereader.read_file_meta_info(path)
        offset = 128 + 4 + 12 + int(meta.FileMetaInformationGroupLength)
        with path.open("rb") as fh:
            fh.seek(offset)
            stream = fh.read()
    inflated = inflate_bounded(stream, limit)
    return read_dataset(BytesIO(inflated), is_implicit_VR=False, is_little_endian=True)


class ReceiveLimit:
    """EVT_DATA_RECV: cuts a connection that sends more than twice CXR_MAX_DATASET_BYTES in one message.

    A data set just over the limit is answered with a status (StoreHandler); one that keeps coming would only fill
    the disk before that answer, so the connection is closed instead. StoreHandler resets the count per message.
    """

    def __init__(self, settings: Settings) -> None:
        self.hard_limit = 2 * settings.max_dataset_bytes

    def __call__(self, event: evt.Event) -> None:
        assoc: Any = event.assoc
        received = getattr(assoc, "cxr_received", 0) + len(event.data)
        assoc.cxr_received = received
        if received > self.hard_limit and not getattr(assoc, "cxr_cut", False) and cut_connection(assoc, close=True):
            assoc.cxr_cut = True
            log.warning("association.cut", reason="data set larger than twice the limit", bytes=received)


def cut_connection(assoc: Any, *, close: bool = False) -> bool:
    """Shut an association's socket down: its reader, blocked in recv(), wakes and the association ends. With
    `close` (only from the association's own reader thread) the socket is closed too, so that a peer still sending
    gets a reset at once instead of filling a buffer nobody reads. False when it has no socket (any more)."""
    raw = getattr(getattr(assoc.dul, "socket", None), "socket", None)
    if raw is None:
        return False
    with contextlib.suppress(OSError):
        raw.shutdown(socket.SHUT_RDWR)
    if close:
        with contextlib.suppress(OSError):
            raw.close()
    return True


class StoreHandler:
    """Handles EVT_C_STORE. Runs in the association's thread; must not decode pixels or run models."""

    def __init__(self, settings: Settings, dispatcher: Dispatcher) -> None:
        self.settings = settings
        self.dispatcher = dispatcher
        self.spool = open_spool(settings)

    def __call__(self, event: evt.Event) -> int | Dataset:
        started = time.perf_counter()
        calling_aet = event.assoc.requestor.ae_title
        request: Any = event.request
        request_sop_uid = str(request.AffectedSOPInstanceUID or "")
        bound = log.bind(calling_aet=calling_aet)
        event.assoc.cxr_received = 0  # type: ignore[attr-defined]  # ReceiveLimit counts per message
        path = received_file(event)
        try:
            ds = read_request_dataset(event, path, self.settings.max_dataset_bytes)
            ds.file_meta = event.file_meta
            sop_class_uid = str(ds.get("SOPClassUID", ""))
            sop_uid = ds.get("SOPInstanceUID")
            study_uid = ds.get("StudyInstanceUID")
        except TooLarge as exc:
            bound.warning("store.rejected", reason=str(exc))
            return status.with_comment(status.OUT_OF_RESOURCES, f"refused: {exc}")
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
            space = spool_space(self.settings)
        except OSError as exc:
            bound.error("store.spool_failed", error=f"{type(exc).__name__}: {exc.strerror or exc}")
            return status.OUT_OF_RESOURCES
        if space.below_watermark:
            bound.error("store.refused", reason="spool below free-space watermark", free_bytes=space.free_bytes,
                        watermark_bytes=space.watermark_bytes)  # fmt: skip
            return status.with_comment(status.OUT_OF_RESOURCES, "refused: spool below free-space watermark")

        policy = self.settings.duplicate_policy
        try:
            data = None if path is not None else event.encoded_dataset(include_meta=True)
            spooled = self.spool.store(study_instance_uid=study_uid, sop_instance_uid=sop_uid, source=path, data=data)
            conflict = spooled.conflict
            conflict_reason = (
                f"different content received under this SOP Instance UID from {calling_aet} (sha256 "
                f"{spooled.received_sha256[:12]}..., stored {spooled.sha256[:12]}...): {policy}"
            )
            if conflict and policy == "replace":
                spooled = self.spool.replace(spooled, source=path, data=data)
        except OSError as exc:  # includes ObjectStoreError
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
            path=spooled.ref,
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
        replaced = False
        try:
            with session_scope(self.settings.effective_database_url) as session:
                instance, created = repo.record_received(session, record)
                instance_id = instance.id
                if conflict and not created and policy == "replace":
                    repo.replace_content(session, instance, record, conflict_reason)
                    replaced = True
                elif conflict:  # (also when this send's row came first: the other content's file was on disk)
                    repo.record_conflict(session, instance, conflict_reason)
        except SQLAlchemyError as exc:
            bound.error("store.db_failed", error=type(exc).__name__)
            return status.OUT_OF_RESOURCES
        if conflict:
            bound.warning("store.conflict", policy=policy, calling_aet=calling_aet)
        if conflict and policy == "reject":
            # A failure the sender does not retry (0x0111 Duplicate SOP Instance is not a C-STORE status; dcmtk
            # reports it as unknown), with the reason in the Error Comment.
            return status.with_comment(status.CANNOT_UNDERSTAND, "refused: SOP Instance UID in use, other content")

        queued = False
        if (created or replaced) and decision.triage:
            queued = self.dispatcher.dispatch(instance_id, sop_instance_uid=sop_uid)
        bound.info(
            "store.accepted",
            bytes=spooled.size_bytes,
            transfer_syntax=record.transfer_syntax_uid,
            duplicate=not created,
            replaced=replaced,
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
