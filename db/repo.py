"""The state transitions and queries shared by listener, workers and tools; each one is idempotent."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import case, func, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from cxr_triage.priority import effective_priority
from cxr_triage.result_kinds import Trigger, enabled_kinds
from cxr_triage.settings import Settings
from db.models import (
    DeliveryAttempt,
    Instance,
    InstanceEvent,
    InstanceStatus,
    Prediction,
    PredictionRole,
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


def mark_queued(
    session: Session, instance_id: int, *, queue: str | None = None, results_destination: str | None = None
) -> None:
    """After the broker accepted the task: received/awaiting -> queued; a re-sent queued one is touched. The queue is
    recorded each time (batch mates are claimed fresh ones first); the results destination only the first time (the
    route in force when the instance arrived stays its route).

    Never undoes a terminal state, and never moves `processing` back (a fast worker may already hold it); for a
    `processing` instance keeps its status (its holder's heartbeat decides whether it may be taken over).
    """
    instance = session.get(Instance, instance_id, with_for_update=True)
    if instance is None or instance.status in InstanceStatus.TERMINAL:
        return
    if instance.status in (InstanceStatus.RECEIVED, InstanceStatus.AWAITING_MODEL):
        set_status(session, instance, InstanceStatus.QUEUED)
    instance.queued_at = utcnow()
    instance.updated_at = utcnow()
    if queue is not None:
        instance.triage_queue = queue
    if results_destination is not None and instance.results_destination is None:
        instance.results_destination = results_destination


def _last_sign_of_life() -> Any:
    """When the holder of a `processing` instance last beat (rows from before heartbeats: their last update)."""
    return func.coalesce(Instance.heartbeat_at, Instance.updated_at)


CLAIMABLE = (InstanceStatus.RECEIVED, InstanceStatus.QUEUED, InstanceStatus.AWAITING_MODEL)


def claim(session: Session, instance_id: int, *, silent_before: datetime, max_attempts: int = 5) -> Instance | None:
    """A worker takes the instance, exclusively: None if it is finished, or held by a worker that is alive.

    One conditional UPDATE decides, so two workers can never both hold an instance, on SQLite (where SELECT ... FOR
    UPDATE does nothing) as on PostgreSQL. An instance `processing` is taken over only when its holder's heartbeat
    (`heartbeat`) is older than `silent_before`: its worker died. An instance whose processing was started
    `max_attempts` times without finishing (a worker crashing on it every time) ends `failed` instead.
    """
    takeable = Instance.status.in_(CLAIMABLE) | (
        (Instance.status == InstanceStatus.PROCESSING) & (_last_sign_of_life() < silent_before)
    )
    now = utcnow()
    attempts = session.execute(
        update(Instance)
        .where(Instance.id == instance_id, takeable, func.coalesce(Instance.attempts, 0) < max_attempts)
        .values(
            status=InstanceStatus.PROCESSING,
            attempts=func.coalesce(Instance.attempts, 0) + 1,
            heartbeat_at=now,
            updated_at=now,
        )
        .returning(Instance.attempts)
        .execution_options(synchronize_session=False)
    ).scalar()
    if attempts is None:
        _give_up_if_exhausted(session, instance_id, takeable, max_attempts)
        return None
    instance = session.get(Instance, instance_id, populate_existing=True)
    assert instance is not None
    instance.status_reason = f"attempt {attempts}"
    session.add(InstanceEvent(instance_id=instance_id, status=InstanceStatus.PROCESSING, reason=f"attempt {attempts}"))
    return instance


def claim_queued(
    session: Session, *, limit: int, exclude: int, silent_before: datetime, max_attempts: int = 5
) -> list[Instance]:
    """Claim up to `limit` more instances waiting in the queue for a batch (fresh ones before the backlog, each
    oldest first), each exclusively as `claim` does; rows another worker is claiming right now are skipped, not
    waited for (PostgreSQL)."""
    if limit <= 0:
        return []
    candidates = session.scalars(
        select(Instance.id)
        .where(Instance.status == InstanceStatus.QUEUED, Instance.id != exclude)
        .order_by(case((Instance.triage_queue == "backlog", 1), else_=0), Instance.id)
        .limit(limit)
        .with_for_update(skip_locked=True)
    ).all()
    claimed = []
    for instance_id in candidates:
        instance = claim(session, instance_id, silent_before=silent_before, max_attempts=max_attempts)
        if instance is not None:
            claimed.append(instance)
    return claimed


def _give_up_if_exhausted(session: Session, instance_id: int, takeable: Any, max_attempts: int) -> None:
    """Fail an instance that would be taken but has used up its attempts (conditionally, like the claim)."""
    failed = session.execute(
        update(Instance)
        .where(Instance.id == instance_id, takeable, func.coalesce(Instance.attempts, 0) >= max_attempts)
        .values(status=InstanceStatus.FAILED, updated_at=utcnow())
        .returning(Instance.attempts)
        .execution_options(synchronize_session=False)
    ).scalar()
    if failed is not None:
        reason = f"gave up after {failed} unfinished attempts"
        instance = session.get(Instance, instance_id, populate_existing=True)
        assert instance is not None
        instance.status_reason = reason
        session.add(InstanceEvent(instance_id=instance_id, status=InstanceStatus.FAILED, reason=reason))


def heartbeat(session: Session, *instance_ids: int) -> bool:
    """The holder of `processing` instances is alive: refresh their heartbeat_at so nobody takes them over. False
    when none is processing any more (finished, or taken over after this worker went silent)."""
    result = session.execute(
        update(Instance)
        .where(Instance.id.in_(instance_ids), Instance.status == InstanceStatus.PROCESSING)
        .values(heartbeat_at=utcnow())
        .execution_options(synchronize_session=False)
    )
    return bool(getattr(result, "rowcount", 0))


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
    role: str = PredictionRole.LIVE


def save_prediction(session: Session, instance: Instance, record: PredictionRecord) -> Prediction:
    """Store the prediction (idempotent per instance, model set and role); a live one marks the instance done, a
    shadow one changes nothing else."""
    current = (
        Prediction.instance_id == instance.id,
        Prediction.model_set == record.model_set,
        Prediction.role == record.role,
        Prediction.superseded_at.is_(None),
    )
    existing = session.scalar(select(Prediction).where(*current))
    if existing is None:
        existing = Prediction(instance_id=instance.id, **asdict(record))
        try:
            with session.begin_nested():
                session.add(existing)
        except IntegrityError:
            existing = session.scalars(select(Prediction).where(*current)).one()
    if record.role == PredictionRole.LIVE:
        set_status(session, instance, InstanceStatus.DONE, f"label {record.label}")
    return existing


def record_conflict(session: Session, instance: Instance, reason: str) -> None:
    """Note on the instance's history that different content arrived under its SOP Instance UID (status unchanged)."""
    session.add(InstanceEvent(instance_id=instance.id, status=instance.status, reason=reason))
    instance.status_reason = reason[:500]


def replace_content(session: Session, instance: Instance, rec: ReceivedInstance, reason: str) -> None:
    """The instance's file now holds corrected content: take its new description, supersede its predictions and
    triage it again from the start (status received, attempts reset; the caller dispatches it)."""
    instance.sha256, instance.size_bytes, instance.path = rec.sha256, rec.size_bytes, rec.path
    instance.transfer_syntax_uid = rec.transfer_syntax_uid
    instance.modality, instance.body_part, instance.view_position = rec.modality, rec.body_part, rec.view_position
    instance.attempts, instance.heartbeat_at = 0, None
    session.execute(
        update(Prediction)
        .where(Prediction.instance_id == instance.id, Prediction.superseded_at.is_(None))
        .values(superseded_at=utcnow())
        .execution_options(synchronize_session=False)
    )
    set_status(session, instance, rec.status, f"{reason}; {rec.status_reason}" if rec.status_reason else reason)


def dispatchable(
    session: Session,
    *,
    stale_before: datetime,
    model_available: bool,
    silent_before: datetime | None = None,
    lost_before: datetime | None = None,
    limit: int = 500,
) -> list[int]:
    """Instances the outbox must (re-)send: never queued; queued since before `stale_before` (or `lost_before`, given
    when the broker's queue is empty, so their messages were lost); processing by a worker silent since before
    `silent_before` (default `stale_before`) and not re-sent since; awaiting a model that is now available."""
    silent = silent_before or stale_before
    queued_cutoff = max(stale_before, lost_before) if lost_before is not None else stale_before
    conditions = [
        Instance.status == InstanceStatus.RECEIVED,
        (Instance.status == InstanceStatus.QUEUED) & (Instance.updated_at < queued_cutoff),
        (Instance.status == InstanceStatus.PROCESSING)
        & (_last_sign_of_life() < silent)
        & (Instance.queued_at.is_(None) | (Instance.queued_at < silent)),
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

    Returns the ids of the prediction's rows that still need delivery (messages `add_study_messages` recorded for it
    in the same transaction too).
    """
    if rows:
        exists = session.scalar(
            select(ResultObject.id).where(
                ResultObject.prediction_id == rows[0].prediction_id,
                ResultObject.kind.in_({row.kind for row in rows}),
            )
        )
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
    answer: str | None = None,
) -> None:
    """Record one send attempt; success marks the result delivered, a final failure marks it failed."""
    row = session.get(ResultObject, result_id, with_for_update=True)
    if row is None:
        return
    session.add(
        DeliveryAttempt(
            result_id=result_id, destination=destination, dimse_status=dimse_status, answer=answer, error=error
        )
    )
    row.attempts = (row.attempts or 0) + 1
    if destination and not row.destination:
        row.destination = destination[:200]
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


def results_to_send(
    session: Session, *, stale_before: datetime, lost_before: datetime | None = None, limit: int = 500
) -> list[int]:
    """Result objects the outbox must (re-)send: never queued, or queued since before `stale_before` (or
    `lost_before`, given when the broker's queue is empty: their messages were lost) without an outcome."""
    cutoff = max(stale_before, lost_before) if lost_before is not None else stale_before
    rows = session.scalars(
        select(ResultObject.id)
        .where(
            or_(
                ResultObject.status == ResultStatus.PENDING,
                (ResultObject.status == ResultStatus.QUEUED) & (ResultObject.updated_at < cutoff),
            )
        )
        .order_by(ResultObject.id)
        .limit(limit)
    )
    return list(rows)


def add_study_messages(
    session: Session,
    settings: Settings,
    study: Study,
    *,
    priority: str,
    prediction_id: int | None,
    result_final: bool,
) -> list[int]:
    """Record the messages a change of the study calls for, in the transaction that changed it (which holds the
    study's row): the kinds made on a study's change (cxr_triage/result_kinds.py, Trigger.STUDY; the HL7 message).

    A kind gets one when the study's effective `priority` differs from what its last message for the study reported
    (before the first: the priority the order asked for, or routine), and, for a kind that reports every result
    (`per_result`), when a live result is stored (`result_final`) that has none yet. So a repeated triage, or a
    priority that did not change, records nothing. The message is about `prediction_id` (the result just stored, or the
    study's deciding one): without one nothing is recorded. It is built from these rows when sent. Returns the ids of
    the new rows, pending (the worker hands them over with its results; the outbox sends any left).
    """
    kinds = enabled_kinds(settings, Trigger.STUDY)
    if prediction_id is None or not kinds:
        return []
    instance_id = session.scalar(select(Prediction.instance_id).where(Prediction.id == prediction_id))
    if instance_id is None:
        return []
    added: list[int] = []
    for kind in kinds:
        last = session.scalar(
            select(ResultObject.event)
            .join(Instance, Instance.id == ResultObject.instance_id)
            .where(Instance.study_id == study.id, ResultObject.kind == kind.name)
            .order_by(ResultObject.id.desc())
            .limit(1)
        )
        reported = last or effective_priority(None, study.requested_priority, None).priority
        new_result = (
            result_final
            and kind.per_result(settings)
            and session.scalar(
                select(ResultObject.id).where(
                    ResultObject.kind == kind.name, ResultObject.prediction_id == prediction_id
                )
            )
            is None
        )
        if priority == reported and not new_result:
            continue
        row = ResultObject(
            instance_id=instance_id,
            prediction_id=prediction_id,
            kind=kind.name,
            content_type=kind.content_type,
            event=priority,
            path="",
            status=ResultStatus.PENDING,
        )
        session.add(row)
        session.flush()
        added.append(row.id)
    return added


# A study's delivery state of a kind: the least advanced of its objects' states, the one that needs attention first.
DELIVERY_STATE_ORDER: tuple[str, ...] = (
    ResultStatus.FAILED,
    ResultStatus.PENDING,
    ResultStatus.QUEUED,
    ResultStatus.DELIVERED,
    ResultStatus.STORED,
)


def delivery_states(session: Session, study_ids: list[int]) -> dict[int, dict[str, str]]:
    """For each study, the delivery state of each kind of result object (one per interface and object: SR and heatmap
    to the PACS, the HL7 message to the RIS, the FHIR Bundle) over its current results: failed if any failed, else
    pending or queued if any waits, else delivered (or stored, with no destination)."""
    if not study_ids:
        return {}
    rows = session.execute(
        select(Instance.study_id, ResultObject.kind, ResultObject.status)
        .join(Instance, Instance.id == ResultObject.instance_id)
        .join(Prediction, Prediction.id == ResultObject.prediction_id)
        .where(Instance.study_id.in_(study_ids), Prediction.superseded_at.is_(None))
        .distinct()
    ).all()
    rank = {state: i for i, state in enumerate(DELIVERY_STATE_ORDER)}
    states: dict[int, dict[str, str]] = {}
    for study_id, kind, status in rows:
        kinds = states.setdefault(int(study_id), {})
        if kind not in kinds or rank.get(status, len(rank)) < rank.get(kinds[kind], len(rank)):
            kinds[kind] = status
    return states


def result_counts(session: Session) -> dict[tuple[str, str], int]:
    """(kind, status) -> number of result objects: one GROUP BY over the (kind, status) index, for the metrics."""
    rows = session.execute(
        select(ResultObject.kind, ResultObject.status, func.count()).group_by(ResultObject.kind, ResultObject.status)
    )
    return {(kind, status): int(count) for kind, status, count in rows}
