"""The state transitions and queries shared by listener, workers and tools; each one is idempotent."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import datetime, timedelta

from sqlalchemy import func, or_, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from db.models import (
    DeliveryAttempt,
    Instance,
    InstanceEvent,
    InstanceStatus,
    Prediction,
    ResultObject,
    ResultStatus,
    Study,
    utcnow,
)


@dataclass(frozen=True)
class ReceivedInstance:
    """What the listener knows about an instance once it is durable on disk."""

    sop_instance_uid: str
    sop_class_uid: str
    study_instance_uid: str
    series_instance_uid: str | None
    transfer_syntax_uid: str
    calling_aet: str | None
    modality: str | None
    body_part: str | None
    view_position: str | None
    path: str
    size_bytes: int
    sha256: str
    status: InstanceStatus
    status_reason: str | None
    patient_name: str | None = None
    patient_id: str | None = None
    accession_number: str | None = None
    study_date: str | None = None
    study_description: str | None = None
    requested_priority: str | None = None


def _get_or_create_study(session: Session, rec: ReceivedInstance) -> Study:
    study = session.scalar(select(Study).where(Study.study_instance_uid == rec.study_instance_uid))
    if study is not None:
        return study
    study = Study(
        study_instance_uid=rec.study_instance_uid,
        accession_number=rec.accession_number,
        patient_name=rec.patient_name,
        patient_id=rec.patient_id,
        study_date=rec.study_date,
        study_description=rec.study_description,
        requested_priority=rec.requested_priority,
    )
    try:
        with session.begin_nested():
            session.add(study)
    except IntegrityError:  # a concurrent association created it
        study = session.scalars(select(Study).where(Study.study_instance_uid == rec.study_instance_uid)).one()
    return study


def record_received(session: Session, rec: ReceivedInstance) -> tuple[Instance, bool]:
    """Insert the instance row (idempotent on SOP Instance UID). Returns (instance, created)."""
    existing = session.scalar(select(Instance).where(Instance.sop_instance_uid == rec.sop_instance_uid))
    if existing is not None:
        return existing, False
    study = _get_or_create_study(session, rec)
    instance = Instance(
        sop_instance_uid=rec.sop_instance_uid,
        sop_class_uid=rec.sop_class_uid,
        series_instance_uid=rec.series_instance_uid,
        study_id=study.id,
        transfer_syntax_uid=rec.transfer_syntax_uid,
        calling_aet=rec.calling_aet,
        modality=rec.modality,
        body_part=rec.body_part,
        view_position=rec.view_position,
        path=rec.path,
        size_bytes=rec.size_bytes,
        sha256=rec.sha256,
        status=rec.status,
        status_reason=rec.status_reason,
    )
    try:
        with session.begin_nested():
            session.add(instance)
            session.flush()
            session.add(InstanceEvent(instance_id=instance.id, status=rec.status, reason=rec.status_reason))
    except IntegrityError:  # the same instance arrived concurrently on another association
        other = session.scalars(select(Instance).where(Instance.sop_instance_uid == rec.sop_instance_uid)).one()
        return other, False
    return instance, True


def set_status(session: Session, instance: Instance, status: InstanceStatus, reason: str | None = None) -> None:
    """Change the status and append to the history."""
    status = InstanceStatus(status)  # raises ValueError for an unknown status
    instance.status = status
    instance.status_reason = reason
    instance.updated_at = utcnow()
    session.add(InstanceEvent(instance_id=instance.id, status=status, reason=reason))


def mark_queued(session: Session, instance_id: int) -> None:
    """After the broker accepted the task: received/awaiting -> queued; a re-sent stale one is only touched.

    Never undoes a terminal state, and never moves `processing` back (a fast worker may already hold it).
    """
    instance = session.get(Instance, instance_id, with_for_update=True)
    if instance is None or instance.status in InstanceStatus.TERMINAL:
        return
    if instance.status in (InstanceStatus.RECEIVED, InstanceStatus.AWAITING_MODEL):
        set_status(session, instance, InstanceStatus.QUEUED)
    instance.queued_at = utcnow()
    instance.updated_at = utcnow()


def claim(session: Session, instance_id: int, *, max_attempts: int = 5) -> Instance | None:
    """A worker takes the instance: returns None if it is already finished (a duplicate delivery).

    An instance whose processing was started `max_attempts` times without finishing (a worker crashing on it every
    time) ends `failed` instead of being re-delivered forever.
    """
    instance = session.get(Instance, instance_id, with_for_update=True)
    if instance is None or instance.status in InstanceStatus.TERMINAL:
        return None
    if (instance.attempts or 0) >= max_attempts:
        set_status(session, instance, InstanceStatus.FAILED, f"gave up after {instance.attempts} unfinished attempts")
        return None
    instance.attempts = (instance.attempts or 0) + 1
    set_status(session, instance, InstanceStatus.PROCESSING, f"attempt {instance.attempts}")
    return instance


@dataclass(frozen=True)
class PredictionRecord:
    """What the worker stores for one instance and one model set (db.models.Prediction without the keys)."""

    model_set: str
    model_versions: list[str]
    label: str
    probabilities: dict[str, float]
    member_probabilities: dict[str, dict[str, float]]
    queue_wait_ms: float | None
    decode_ms: float
    inference_ms: float
    not_for_clinical_use: bool
    ood_score: float | None = None
    out_of_distribution: bool | None = None
    operating_point: dict[str, float] | None = None


def save_prediction(session: Session, instance: Instance, record: PredictionRecord) -> Prediction:
    """Store the prediction (idempotent per instance and model set) and mark the instance done."""
    existing = session.scalar(
        select(Prediction).where(Prediction.instance_id == instance.id, Prediction.model_set == record.model_set)
    )
    if existing is None:
        existing = Prediction(instance_id=instance.id, **asdict(record))
        try:
            with session.begin_nested():
                session.add(existing)
        except IntegrityError:
            existing = session.scalars(
                select(Prediction).where(
                    Prediction.instance_id == instance.id, Prediction.model_set == record.model_set
                )
            ).one()
    set_status(session, instance, InstanceStatus.DONE, f"label {record.label}")
    return existing


def dispatchable(session: Session, *, stale_before: datetime, model_available: bool, limit: int = 500) -> list[int]:
    """Instances the outbox must (re-)send: never queued, queued/processing too long, or awaiting a model."""
    conditions = [
        Instance.status == InstanceStatus.RECEIVED,
        (Instance.status.in_((InstanceStatus.QUEUED, InstanceStatus.PROCESSING)))
        & (Instance.updated_at < stale_before),
    ]
    if model_available:
        conditions.append(Instance.status == InstanceStatus.AWAITING_MODEL)
    rows = session.scalars(select(Instance.id).where(or_(*conditions)).order_by(Instance.id).limit(limit))
    return list(rows)


def stale_cutoff(seconds: float) -> datetime:
    return utcnow() - timedelta(seconds=seconds)


def status_counts(session: Session) -> dict[str, int]:
    rows = session.execute(select(Instance.status, func.count()).group_by(Instance.status))
    return {status: int(count) for status, count in rows}


def add_results(session: Session, rows: list[ResultObject]) -> list[int]:
    """Store result objects of a prediction once (a repeated run for the same prediction adds nothing).

    Returns the ids of the rows that still need delivery.
    """
    if rows:
        exists = session.scalar(select(ResultObject.id).where(ResultObject.prediction_id == rows[0].prediction_id))
        if exists is None:
            session.add_all(rows)
            session.flush()
    if not rows:
        return []
    pending = session.scalars(
        select(ResultObject.id).where(
            ResultObject.prediction_id == rows[0].prediction_id, ResultObject.status == ResultStatus.PENDING
        )
    )
    return list(pending)


def record_delivery(
    session: Session,
    result_id: int,
    *,
    destination: str,
    dimse_status: int | None,
    error: str | None,
    final: bool = False,
) -> None:
    """Record one send attempt; success marks the result delivered, a final failure marks it failed."""
    row = session.get(ResultObject, result_id, with_for_update=True)
    if row is None:
        return
    session.add(DeliveryAttempt(result_id=result_id, destination=destination, dimse_status=dimse_status, error=error))
    row.attempts = (row.attempts or 0) + 1
    row.last_error = error
    if error is None:
        row.status = ResultStatus.DELIVERED
        row.delivered_at = utcnow()
    elif final:
        row.status = ResultStatus.FAILED


def mark_result_queued(session: Session, result_id: int) -> None:
    row = session.get(ResultObject, result_id, with_for_update=True)
    if row is not None and row.status == ResultStatus.PENDING:
        row.status = ResultStatus.QUEUED
    if row is not None:
        row.updated_at = utcnow()


def results_to_send(session: Session, *, stale_before: datetime, limit: int = 500) -> list[int]:
    """Result objects the outbox must (re-)send: never queued, or queued too long without an outcome."""
    rows = session.scalars(
        select(ResultObject.id)
        .where(
            or_(
                ResultObject.status == ResultStatus.PENDING,
                (ResultObject.status == ResultStatus.QUEUED) & (ResultObject.updated_at < stale_before),
            )
        )
        .order_by(ResultObject.id)
        .limit(limit)
    )
    return list(rows)
