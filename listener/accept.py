"""The one way in for an instance, by C-STORE or by STOW-RS: read it within the size limit, check it, make it durable
(the spool), apply the intake policy, record it, queue it, and only then say how it went; each transport turns the
`Outcome` into its own answer (a C-STORE status, an item of a STOW-RS response)."""

from __future__ import annotations

import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Final

import pydicom
from pydicom import uid
from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset, read_file_meta_info
from sqlalchemy.exc import SQLAlchemyError

from cxr_triage import dicom_status as status
from cxr_triage.logs import get_logger
from cxr_triage.settings import Settings
from cxr_triage.uids import is_valid_uid
from db import repo
from db.models import InstanceStatus
from db.session import session_scope
from infra.disk import spool_space
from listener.dispatch import Dispatcher, Routing
from listener.intake import decide
from listener.spool import open_spool

log = get_logger(__name__)

# What we receive: the SOP classes a chest radiograph arrives as, in the transfer syntaxes real CR/DX devices and PACS
# send. Bytes are stored as received (the workers decode), so accepting a syntax costs nothing here. The listener
# negotiates exactly these (listener/server.py); a STOW-RS part, which negotiates nothing, is checked against them.
STORAGE_SOP_CLASSES: Final = (
    uid.ComputedRadiographyImageStorage,
    uid.DigitalXRayImageStorageForPresentation,
    uid.DigitalXRayImageStorageForProcessing,
    uid.SecondaryCaptureImageStorage,
)
TRANSFER_SYNTAXES: Final = (
    uid.ExplicitVRLittleEndian,
    uid.ImplicitVRLittleEndian,
    uid.DeflatedExplicitVRLittleEndian,
    uid.JPEGBaseline8Bit,
    uid.JPEGExtended12Bit,
    uid.JPEGLossless,
    uid.JPEGLosslessSV1,
    uid.JPEGLSLossless,
    uid.JPEGLSNearLossless,
    uid.JPEG2000Lossless,
    uid.JPEG2000,
    uid.RLELossless,
)
# Refused: SOP Class not supported (C-STORE, PS3.4 B.2.3; STOW-RS Failure Reason, PS3.18 I.2.2). A C-STORE never
# gets it: association negotiation already refused the class.
SOP_CLASS_NOT_SUPPORTED: Final = 0x0122
# Error: Referenced Transfer Syntax not supported (STOW-RS Failure Reason, PS3.18 I.2.2); negotiated for a C-STORE.
TRANSFER_SYNTAX_NOT_SUPPORTED: Final = 0xC122


class TooLarge(Exception):
    """The data set is larger than CXR_MAX_DATASET_BYTES (received, or once inflated)."""


def inflate_bounded(data: bytes, limit: int) -> bytes:
    """Inflate a Deflated Explicit VR data set, refusing to produce more than `limit` bytes (a deflate bomb)."""
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    out = inflater.decompress(data, limit + 1)
    if len(out) > limit or inflater.unconsumed_tail:
        raise TooLarge(f"inflated data set larger than {limit} bytes")
    return out


def read_file_within(path: Path, limit: int, *, deflated: bool) -> Dataset:
    """A received PS3.10 file (preamble, file meta information, data set) parsed within `limit` bytes: checked size,
    bounded inflation, large values (the pixel data) left on disk until read. A deflated data set comes back without
    its file meta information."""
    size = path.stat().st_size
    if size > limit:
        raise TooLarge(f"data set of {size} bytes, larger than {limit}")
    if not deflated:
        return pydicom.dcmread(path, defer_size="1 MB")
    meta = read_file_meta_info(path)
    offset = 128 + 4 + 12 + int(meta.FileMetaInformationGroupLength)
    with path.open("rb") as fh:
        fh.seek(offset)
        stream = fh.read()
    inflated = inflate_bounded(stream, limit)
    return read_dataset(BytesIO(inflated), is_implicit_VR=False, is_little_endian=True)


def column_value(ds: Dataset, keyword: str, limit: int) -> str | None:
    """The attribute as stored in a database column: None when absent or empty, else cut to the column width."""
    value = ds.get(keyword)
    text = "" if value is None else str(value).replace("\x00", "")  # PostgreSQL refuses NUL in text
    return text[:limit] or None


@dataclass(frozen=True)
class Parsed:
    """A data set as read, with what its transport declared it to be."""

    dataset: Dataset
    transfer_syntax_uid: str
    # The C-STORE request's Affected SOP Class/Instance UID, or a STOW-RS part's file meta information.
    declared_sop_class_uid: str
    declared_sop_instance_uid: str


@dataclass(frozen=True)
class Arrival:
    """One data set as a transport received it, before any check."""

    # Parses the data set within the given number of bytes; raises TooLarge, or anything at all when unparseable.
    read: Callable[[int], Parsed]
    # The received PS3.10 file, which becomes the spooled instance (a hard link, or an upload to the object store);
    # without it, `encoded` gives the PS3.10 bytes.
    source: Path | None
    encoded: Callable[[], bytes] | None
    calling_aet: str  # the sender: a calling AE title, or "STOW:<username>"
    declared_by: str  # where the declared UIDs come from, for the log: "the C-STORE request", ...


@dataclass(frozen=True)
class Outcome:
    """How an arrival went: stored (SUCCESS, recorded and queued or skipped) or refused with a DICOM status.

    `comment` is the reason a C-STORE response carries in its Error Comment (None: the bare status). The UIDs are
    those read from the data set, empty when it could not be read that far.
    """

    status: int
    comment: str | None = None
    sop_class_uid: str = ""
    sop_instance_uid: str = ""
    study_instance_uid: str = ""

    @property
    def stored(self) -> bool:
        return self.status == status.SUCCESS


class Intake:
    """The intake path shared by the C-STORE handler (listener process) and STOW-RS (API process). Thread-safe: each
    call uses its own database session; the dispatcher backs off after a broker failure (the outbox re-sends)."""

    def __init__(self, settings: Settings, dispatcher: Dispatcher) -> None:
        self.settings = settings
        self.dispatcher = dispatcher
        self.spool = open_spool(settings)

    def accept(self, arrival: Arrival) -> Outcome:
        """Validate, spool durably (duplicate policy), decide, record, dispatch; every early exit logs why."""
        started = time.perf_counter()
        calling_aet = arrival.calling_aet
        bound = log.bind(calling_aet=calling_aet)
        try:
            parsed = arrival.read(self.settings.max_dataset_bytes)
            ds = parsed.dataset
            sop_class_uid = str(ds.get("SOPClassUID", ""))
            sop_uid = ds.get("SOPInstanceUID")
            study_uid = ds.get("StudyInstanceUID")
        except TooLarge as exc:
            bound.warning("store.rejected", reason=str(exc))
            return Outcome(status.OUT_OF_RESOURCES, f"refused: {exc}")
        except Exception as exc:
            bound.warning("store.rejected", reason="unparseable data set", error=type(exc).__name__)
            return Outcome(status.CANNOT_UNDERSTAND)
        if not is_valid_uid(sop_uid) or not is_valid_uid(study_uid):
            bound.warning("store.rejected", reason="invalid SOP Instance or Study Instance UID")
            return Outcome(status.CANNOT_UNDERSTAND, sop_class_uid=sop_class_uid)
        sop_uid, study_uid = str(sop_uid), str(study_uid)
        uids = {"sop_class_uid": sop_class_uid, "sop_instance_uid": sop_uid, "study_instance_uid": study_uid}
        bound = bound.bind(sop_instance_uid=sop_uid, study_instance_uid=study_uid)
        declared = (parsed.declared_sop_instance_uid, parsed.declared_sop_class_uid)
        if declared != (sop_uid, sop_class_uid):
            bound.warning("store.rejected", reason=f"data set UIDs differ from {arrival.declared_by}")
            return Outcome(status.DATASET_DOES_NOT_MATCH_SOP_CLASS, **uids)
        if sop_class_uid not in STORAGE_SOP_CLASSES:
            bound.warning("store.rejected", reason="SOP class not supported", sop_class_uid=sop_class_uid)
            return Outcome(SOP_CLASS_NOT_SUPPORTED, "refused: SOP class not supported", **uids)
        if parsed.transfer_syntax_uid not in TRANSFER_SYNTAXES:
            bound.warning("store.rejected", reason="transfer syntax not supported",
                          transfer_syntax=parsed.transfer_syntax_uid)  # fmt: skip
            return Outcome(TRANSFER_SYNTAX_NOT_SUPPORTED, "refused: transfer syntax not supported", **uids)
        if "PixelData" not in ds:
            bound.warning("store.rejected", reason="no pixel data in an image storage instance")
            return Outcome(status.DATASET_DOES_NOT_MATCH_SOP_CLASS, **uids)
        try:
            space = spool_space(self.settings)
        except OSError as exc:
            bound.error("store.spool_failed", error=f"{type(exc).__name__}: {exc.strerror or exc}")
            return Outcome(status.OUT_OF_RESOURCES, **uids)
        if space.below_watermark:
            bound.error("store.refused", reason="spool below free-space watermark", free_bytes=space.free_bytes,
                        watermark_bytes=space.watermark_bytes)  # fmt: skip
            return Outcome(status.OUT_OF_RESOURCES, "refused: spool below free-space watermark", **uids)

        policy = self.settings.duplicate_policy
        source = arrival.source
        try:
            data = arrival.encoded() if source is None and arrival.encoded is not None else None
            spooled = self.spool.store(study_instance_uid=study_uid, sop_instance_uid=sop_uid, source=source, data=data)
            conflict = spooled.conflict
            conflict_reason = (
                f"different content received under this SOP Instance UID from {calling_aet} (sha256 "
                f"{spooled.received_sha256[:12]}..., stored {spooled.sha256[:12]}...): {policy}"
            )
            if conflict and policy == "replace":
                spooled = self.spool.replace(spooled, source=source, data=data)
        except OSError as exc:  # includes ObjectStoreError
            bound.error("store.spool_failed", error=f"{type(exc).__name__}: {exc.strerror or exc}")
            return Outcome(status.OUT_OF_RESOURCES, **uids)

        decision = decide(ds, self.settings)
        record = repo.ReceivedInstance(
            sop_instance_uid=sop_uid,
            sop_class_uid=sop_class_uid,
            study_instance_uid=study_uid,
            series_instance_uid=column_value(ds, "SeriesInstanceUID", 64),
            transfer_syntax_uid=parsed.transfer_syntax_uid,
            calling_aet=calling_aet[:16],  # instances.calling_aet is String(16)
            modality=column_value(ds, "Modality", 16),
            body_part=column_value(ds, "BodyPartExamined", 64),
            view_position=column_value(ds, "ViewPosition", 16),
            path=spooled.ref,
            size_bytes=spooled.size_bytes,
            sha256=spooled.sha256,
            status=InstanceStatus.RECEIVED if decision.triage else InstanceStatus.SKIPPED,
            status_reason=decision.reason,
            patient_name=column_value(ds, "PatientName", 200),
            patient_id=column_value(ds, "PatientID", 64),
            accession_number=column_value(ds, "AccessionNumber", 64),
            study_date=column_value(ds, "StudyDate", 8),
            study_description=column_value(ds, "StudyDescription", 200),
            requested_priority=column_value(ds, "RequestedProcedurePriority", 16),
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
            return Outcome(status.OUT_OF_RESOURCES, **uids)
        if conflict:
            bound.warning("store.conflict", policy=policy, calling_aet=calling_aet)
        if conflict and policy == "reject":
            # A failure the sender does not retry (0x0111 Duplicate SOP Instance is not a C-STORE status; dcmtk
            # reports it as unknown), with the reason in the Error Comment.
            return Outcome(status.CANNOT_UNDERSTAND, "refused: SOP Instance UID in use, other content", **uids)

        queued = False
        if (created or replaced) and decision.triage:
            # The routing fields as recorded (the outbox reads the same from the row): no second query per instance.
            routing = Routing(record.study_date, record.requested_priority, record.calling_aet)
            queued = self.dispatcher.dispatch(instance_id, sop_instance_uid=sop_uid, routing=routing)
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
        return Outcome(status.SUCCESS, **uids)
