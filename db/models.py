"""SQLAlchemy 2 models: studies, instances (with status history), predictions, result objects and their delivery."""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum, nonmember

from sqlalchemy import JSON, BigInteger, DateTime, Float, ForeignKey, Index, Integer, String, Text, text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


def utcnow() -> datetime:
    return datetime.now(UTC)


def as_utc(value: datetime) -> datetime:
    """SQLite returns naive datetimes (stored as UTC); PostgreSQL returns aware ones: make both aware."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value


class Base(DeclarativeBase):
    pass


class InstanceStatus(StrEnum):
    """The life of an instance; terminal states are done, failed and skipped."""

    RECEIVED = "received"  # durable on disk and in the database, not yet handed to the broker
    QUEUED = "queued"  # the triage task was sent to the broker
    PROCESSING = "processing"  # a worker holds it
    AWAITING_MODEL = "awaiting_model"  # no promoted model set; re-sent when one is promoted
    DONE = "done"
    FAILED = "failed"
    SKIPPED = "skipped"  # stored, but outside the intake policy (the reason says why)

    TERMINAL = nonmember(frozenset({DONE, FAILED, SKIPPED}))


class Study(Base):
    __tablename__ = "studies"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    accession_number: Mapped[str | None] = mapped_column(String(64))
    # Patient identifiers are stored for the authenticated worklist; they never go to logs.
    patient_name: Mapped[str | None] = mapped_column(String(200))
    patient_id: Mapped[str | None] = mapped_column(String(64))
    study_date: Mapped[str | None] = mapped_column(String(8))
    study_description: Mapped[str | None] = mapped_column(String(200))
    requested_priority: Mapped[str | None] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    instances: Mapped[list[Instance]] = relationship(back_populates="study")


class Instance(Base):
    __tablename__ = "instances"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    series_instance_uid: Mapped[str | None] = mapped_column(String(64))
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    transfer_syntax_uid: Mapped[str] = mapped_column(String(64))
    calling_aet: Mapped[str | None] = mapped_column(String(16))
    modality: Mapped[str | None] = mapped_column(String(16))
    body_part: Mapped[str | None] = mapped_column(String(64))
    view_position: Mapped[str | None] = mapped_column(String(16))
    path: Mapped[str] = mapped_column(Text)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(16), index=True)
    status_reason: Mapped[str | None] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    queued_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # The last sign of life of the worker holding the instance (set by the claim and by its heartbeats).
    heartbeat_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # Set when the retention policy removed the spool file of this finished instance (listener/retention.py).
    spool_removed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # Decided when it is first queued (listener/dispatch.py): its triage queue (gpu, or backlog for one that can wait)
    # and where its DICOM results go (AE@host:port[ (TLS)], cxr_triage/routes.py; None = kept only).
    triage_queue: Mapped[str | None] = mapped_column(String(16))
    results_destination: Mapped[str | None] = mapped_column(String(200))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, onupdate=utcnow)

    study: Mapped[Study] = relationship(back_populates="instances")
    events: Mapped[list[InstanceEvent]] = relationship(
        back_populates="instance", order_by="InstanceEvent.id", cascade="all, delete-orphan"
    )
    predictions: Mapped[list[Prediction]] = relationship(back_populates="instance")


class InstanceEvent(Base):
    """One row per status change: the instance's history."""

    __tablename__ = "instance_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    instance_id: Mapped[int] = mapped_column(ForeignKey("instances.id"), index=True)
    status: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str | None] = mapped_column(Text)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    instance: Mapped[Instance] = relationship(back_populates="events")


class Prediction(Base):
    """The ensemble's output for one instance and one model set; one current (not superseded) per pair."""

    __tablename__ = "predictions"
    # One current prediction per (instance, model set, role); a corrected re-send supersedes the earlier ones.
    __table_args__ = (
        Index(
            "uq_prediction_current",
            "instance_id",
            "model_set",
            "role",
            unique=True,
            sqlite_where=text("superseded_at IS NULL"),
            postgresql_where=text("superseded_at IS NULL"),
        ),
        Index("ix_predictions_role_model_set", "role", "model_set"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    instance_id: Mapped[int] = mapped_column(ForeignKey("instances.id"), index=True)
    model_set: Mapped[str] = mapped_column(String(100))
    # live: the promoted set's (priority, results, worklist); shadow: a candidate's, stored for comparison only.
    role: Mapped[str] = mapped_column(String(8), default="live", server_default="live")
    model_versions: Mapped[list[str]] = mapped_column(JSON)
    label: Mapped[str] = mapped_column(String(32))
    probabilities: Mapped[dict[str, float]] = mapped_column(JSON)
    member_probabilities: Mapped[dict[str, dict[str, float]]] = mapped_column(JSON)
    queue_wait_ms: Mapped[float | None] = mapped_column(Float)
    decode_ms: Mapped[float] = mapped_column(Float)
    inference_ms: Mapped[float] = mapped_column(Float)
    not_for_clinical_use: Mapped[bool] = mapped_column(default=True)
    # Squared Mahalanobis distance of the OOD member's features (None: the set has no detector) and its verdict.
    ood_score: Mapped[float | None] = mapped_column(Float, nullable=True)
    out_of_distribution: Mapped[bool | None] = mapped_column(nullable=True)
    # The set's operating point when the label was decided ({"stat_threshold", "routine_threshold"}).
    operating_point: Mapped[dict[str, float] | None] = mapped_column(JSON, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    # Set when the instance was replaced by different content (listener: CXR_DUPLICATE_POLICY=replace).
    superseded_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)

    instance: Mapped[Instance] = relationship(back_populates="predictions")


class PredictionRole(StrEnum):
    LIVE = "live"
    SHADOW = "shadow"


class ResultStatus(StrEnum):
    """The life of a result object we produced."""

    STORED = "stored"  # written to the results directory; no destination configured
    PENDING = "pending"  # to be sent
    QUEUED = "queued"  # the send task is with the broker
    DELIVERED = "delivered"
    FAILED = "failed"  # retries exhausted; `last_error` says why


class ResultObject(Base):
    """An object we produced for an instance (cxr_triage/result_kinds.py: an SR or heatmap SC for the PACS, an HL7
    message for the RIS, a FHIR Bundle) and its delivery."""

    __tablename__ = "result_objects"
    __table_args__ = (Index("ix_result_objects_kind_status", "kind", "status"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    instance_id: Mapped[int] = mapped_column(ForeignKey("instances.id"), index=True)
    prediction_id: Mapped[int] = mapped_column(ForeignKey("predictions.id"), index=True)
    kind: Mapped[str] = mapped_column(String(16))  # a name of cxr_triage.result_kinds.RESULT_KINDS
    # The DICOM identity of a DICOM object; None for the others (an HL7 message, a FHIR Bundle).
    sop_class_uid: Mapped[str | None] = mapped_column(String(64))
    sop_instance_uid: Mapped[str | None] = mapped_column(String(64), unique=True)
    series_instance_uid: Mapped[str | None] = mapped_column(String(64))
    content_type: Mapped[str] = mapped_column(
        String(64), default="application/dicom", server_default="application/dicom"
    )
    # What a message made when a study's priority changed reports: the study's effective priority then.
    event: Mapped[str | None] = mapped_column(String(64))
    path: Mapped[str] = mapped_column(Text)  # the stored object's ref; "" for a message not built yet
    status: Mapped[str] = mapped_column(String(16), index=True)
    destination: Mapped[str | None] = mapped_column(String(200))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, onupdate=utcnow)
    delivered_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    attempts_log: Mapped[list[DeliveryAttempt]] = relationship(
        back_populates="result", order_by="DeliveryAttempt.id", cascade="all, delete-orphan"
    )


class DeliveryAttempt(Base):
    """One send attempt of a result object: when, where, and the answer (DIMSE status, HL7 ACK code, HTTP status)
    or the error."""

    __tablename__ = "delivery_attempts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    result_id: Mapped[int] = mapped_column(ForeignKey("result_objects.id"), index=True)
    destination: Mapped[str] = mapped_column(String(200))
    dimse_status: Mapped[int | None] = mapped_column(Integer)
    # The destination's answer in its own words: "0x0000" (DIMSE), "AA" (HL7 MSA-1), "201" (HTTP status).
    answer: Mapped[str | None] = mapped_column(String(64))
    error: Mapped[str | None] = mapped_column(Text)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    result: Mapped[ResultObject] = relationship(back_populates="attempts_log")
