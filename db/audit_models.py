"""The access audit trail: one append-only row per read of patient data or change, by whom, from where, with what
outcome (HIPAA, GDPR; exported by `cxr-triage audit export`, sent as IHE ATNA messages by worklist/atna.py)."""

from __future__ import annotations

from datetime import datetime
from enum import IntEnum, StrEnum
from typing import Any, NoReturn

from sqlalchemy import BigInteger, DateTime, Integer, String, event
from sqlalchemy.orm import Mapped, mapped_column

from db.models import Base, utcnow

APPEND_ONLY = "audit_events is append-only"


class AuditAction(StrEnum):
    """What a user did; stored in audit_events.action (at most 32 characters)."""

    VIEW_WORKLIST = "view-worklist"  # a list of studies with patient names (API or page)
    VIEW_STUDY = "view-study"  # one study's detail (API or page)
    DOWNLOAD_RESULT = "download-result"  # a result object we wrote (SR or heatmap), as DICOM or as a PNG
    SET_READ = "set-read"
    SET_PRIORITY = "set-priority"
    STORE_INSTANCES = "store-instances"  # instances sent to us by DICOMweb STOW-RS (by a service account)
    SET_FINDING = "set-finding"  # a radiologist's read finding of a study (an edit supersedes, history kept)
    LOGIN = "login"
    LOGOUT = "logout"
    USER_CREATE = "user-create"
    USER_PASSWORD = "user-password"
    USER_TOKEN = "user-token"
    USER_DISABLE = "user-disable"
    EXPORT_AUDIT = "export-audit"  # someone read the audit trail itself


class AuditOutcome(IntEnum):
    """DICOM PS3.15 A.5 EventOutcomeIndicator."""

    SUCCESS = 0
    MINOR_FAILURE = 4  # refused or not found: nothing disclosed or changed
    SERIOUS_FAILURE = 8  # our error: the request was not completed
    MAJOR_FAILURE = 12

    @classmethod
    def of_http_status(cls, status: int) -> AuditOutcome:
        if status < 400:
            return cls.SUCCESS
        return cls.MINOR_FAILURE if status < 500 else cls.SERIOUS_FAILURE


class AuditEvent(Base):
    """One audited access. Patient names and IDs are not stored here: the study is named by its UID."""

    __tablename__ = "audit_events"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer(), "sqlite"), primary_key=True)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, index=True)
    username: Mapped[str] = mapped_column(String(64), index=True)  # the worklist user, or the OS user of a command
    action: Mapped[str] = mapped_column(String(32))  # an AuditAction
    study_instance_uid: Mapped[str | None] = mapped_column(String(64), index=True)
    # What was acted on besides the study: a result object's SOP Instance UID, or a user account's name.
    object_id: Mapped[str | None] = mapped_column(String(64))
    sop_class_uid: Mapped[str | None] = mapped_column(String(64))  # of the object, when it is a DICOM object
    client_address: Mapped[str] = mapped_column(String(64))  # the peer's IP address, or the host of a command
    outcome: Mapped[int] = mapped_column(Integer)  # an AuditOutcome
    http_status: Mapped[int | None] = mapped_column(Integer)  # None for a command
    via: Mapped[str] = mapped_column(String(100))  # "GET /api/studies/{study_instance_uid}", "cli users create"
    details: Mapped[str | None] = mapped_column(String(500))  # e.g. "read=true", the worklist query


@event.listens_for(AuditEvent, "before_update")
@event.listens_for(AuditEvent, "before_delete")
def _refuse_change(*_: Any) -> NoReturn:
    # The database refuses it too (triggers of migration 0007); this stops the ORM before it asks.
    raise PermissionError(APPEND_ONLY)
