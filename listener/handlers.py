"""The C-STORE handler: reads the data set pynetdicom received and takes it through the intake path
(listener/accept.py: validate, spool durably, record, queue); only then does it answer, with the outcome's status."""

from __future__ import annotations

import contextlib
import socket
from io import BytesIO
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset
from pydicom.uid import DeflatedExplicitVRLittleEndian
from pynetdicom import evt

from cxr_triage import dicom_status as status
from cxr_triage.logs import get_logger
from cxr_triage.settings import Settings
from listener.accept import Arrival, Intake, Parsed, TooLarge, inflate_bounded, read_file_within
from listener.dispatch import Dispatcher

log = get_logger(__name__)


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
    if path is not None:
        return read_file_within(path, limit, deflated=deflated)
    request: Any = event.request
    stream = request.DataSet.getvalue()
    if len(stream) > limit:
        raise TooLarge(f"data set of {len(stream)} bytes, larger than {limit}")
    if not deflated:
        return event.dataset
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
        self.intake = Intake(settings, dispatcher)

    def __call__(self, event: evt.Event) -> int | Dataset:
        request: Any = event.request
        event.assoc.cxr_received = 0  # type: ignore[attr-defined]  # ReceiveLimit counts per message
        path = received_file(event)

        def read(limit: int) -> Parsed:
            ds = read_request_dataset(event, path, limit)
            ds.file_meta = event.file_meta
            return Parsed(
                ds,
                transfer_syntax_uid=str(event.context.transfer_syntax),
                declared_sop_class_uid=str(request.AffectedSOPClassUID),
                declared_sop_instance_uid=str(request.AffectedSOPInstanceUID or ""),
            )

        def encoded() -> bytes:
            data: bytes = event.encoded_dataset(include_meta=True)
            return data

        outcome = self.intake.accept(
            Arrival(
                read=read,
                source=path,
                encoded=encoded,
                calling_aet=event.assoc.requestor.ae_title,
                declared_by="the C-STORE request",
            )
        )
        if outcome.comment is None:
            return outcome.status
        return status.with_comment(outcome.status, outcome.comment)


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
