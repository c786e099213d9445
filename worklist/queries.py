"""Worklist queries: the ordered, filtered list of studies and one study with its instances and results.

The ranking in SQL uses the domain's priority rules (cxr_triage/priority.py); the links to result objects are built
here, from the result kinds registry, because the API serves them.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, and_, case, func, select
from sqlalchemy.orm import Session, aliased

from cxr_triage.labels import DEMO_DISCLAIMER
from cxr_triage.priority import (
    DICOM_PRIORITIES,
    FAILED_TRIAGE_FLOOR,
    FAILED_TRIAGE_RULE,
    PRIORITIES,
    RANK,
    ROUTINE,
    Source,
    dicom_priority,
)
from cxr_triage.result_kinds import RESULT_KINDS
from db.feedback_models import StudyFinding
from db.feedback_repo import finding_history
from db.models import Instance, InstanceStatus, Prediction, PredictionRole, ResultObject, Study, as_utc, utcnow
from db.worklist_models import PriorityAssignment, User, WorklistEntry
from worklist.schemas import (
    FindingRecord,
    InstanceDetail,
    PredictionDetail,
    ResultLink,
    ShadowPredictionDetail,
    StudyDetail,
    WorklistItem,
    WorklistPage,
)

PENDING = (InstanceStatus.RECEIVED, InstanceStatus.QUEUED, InstanceStatus.PROCESSING, InstanceStatus.AWAITING_MODEL)


@dataclass(frozen=True)
class Filters:
    status: str | None = None
    priority: str | None = None
    label: str | None = None
    read: bool | None = None
    since: datetime | None = None
    until: datetime | None = None
    limit: int = 50
    offset: int = 0


def _counts() -> Any:
    def n(statuses: tuple[str, ...]) -> Any:
        return func.sum(case((Instance.status.in_(statuses), 1), else_=0))

    return (
        select(
            Instance.study_id.label("study_id"),
            func.count().label("n"),
            n(PENDING).label("n_pending"),
            n((InstanceStatus.FAILED,)).label("n_failed"),
            n((InstanceStatus.DONE,)).label("n_done"),
        )
        .group_by(Instance.study_id)
        .subquery()
    )


def _expressions(counts: Any) -> tuple[ColumnElement[Any], ColumnElement[Any]]:
    """(status, rank): a study without a result ranks by its DICOM priority; a failed triage is at least
    FAILED_TRIAGE_FLOOR."""
    status = case(
        (counts.c.n_pending > 0, "pending"),
        (counts.c.n_failed > 0, "failed"),
        (counts.c.n_done > 0, "done"),
        else_="skipped",
    )
    requested = func.upper(func.trim(Study.requested_priority))
    requested_rank = case(
        *[(requested == word, RANK[priority]) for word, priority in DICOM_PRIORITIES.items()], else_=RANK[ROUTINE]
    )
    base = func.coalesce(WorklistEntry.rank, requested_rank)
    floor = RANK[FAILED_TRIAGE_FLOOR]
    rank = case((and_(counts.c.n_failed > 0, base < floor), floor), else_=base)
    return status, rank


def list_worklist(session: Session, filters: Filters) -> WorklistPage:
    """Studies, most urgent first, then longest waiting; nothing is hidden unless a filter asks."""
    counts = _counts()
    status, rank = _expressions(counts)
    reader = aliased(User)
    query = (
        select(
            Study, counts.c.n, status.label("status"), rank.label("rank"), WorklistEntry, PriorityAssignment, Prediction
        )
        .join(counts, counts.c.study_id == Study.id)
        .outerjoin(WorklistEntry, WorklistEntry.study_id == Study.id)
        .outerjoin(PriorityAssignment, PriorityAssignment.instance_id == WorklistEntry.deciding_instance_id)
        .outerjoin(Prediction, Prediction.id == PriorityAssignment.prediction_id)
        .add_columns(reader.username)
        .outerjoin(reader, reader.id == WorklistEntry.read_by)
    )
    conditions: list[ColumnElement[bool]] = []
    if filters.status is not None:
        conditions.append(status == filters.status)
    if filters.priority is not None:
        conditions.append(rank == RANK[filters.priority])
    if filters.label is not None:
        conditions.append(WorklistEntry.label == filters.label)
    if filters.read is True:
        conditions.append(WorklistEntry.read_at.is_not(None))
    elif filters.read is False:
        conditions.append(WorklistEntry.read_at.is_(None))
    if filters.since is not None:
        conditions.append(Study.created_at >= filters.since)
    if filters.until is not None:
        conditions.append(Study.created_at < filters.until)
    if conditions:
        query = query.where(*conditions)
    total = session.scalar(select(func.count()).select_from(query.subquery())) or 0
    rows = session.execute(
        query.order_by(rank.desc(), Study.created_at, Study.id).limit(filters.limit).offset(filters.offset)
    ).all()
    links = result_links(session, [row[6].id for row in rows if row[6] is not None])
    items = [_item(*row, links=links) for row in rows]
    demo = any(item.not_for_clinical_use for item in items)
    return WorklistPage(
        items=items,
        total=total,
        limit=filters.limit,
        offset=filters.offset,
        disclaimer=DEMO_DISCLAIMER if demo else None,
    )


def _item(
    study: Study,
    n: int,
    status: str,
    rank: int,
    entry: WorklistEntry | None,
    assignment: PriorityAssignment | None,
    prediction: Prediction | None,
    reader: str | None,
    *,
    links: dict[int, list[ResultLink]],
) -> WorklistItem:
    arrived = as_utc(study.created_at)
    source: Source
    rule: str | None
    if entry is not None and entry.rank == rank:
        source, rule = entry.source, entry.rule  # type: ignore[assignment]
    elif status == "failed" and rank == RANK[FAILED_TRIAGE_FLOOR]:
        source, rule = "failed", FAILED_TRIAGE_RULE
    elif dicom_priority(study.requested_priority) is not None:
        source, rule = "dicom", f"dicom-requested-{PRIORITIES[rank]}"
    else:
        source, rule = "none", None
    return WorklistItem(
        study_instance_uid=study.study_instance_uid,
        accession_number=study.accession_number,
        patient_name=study.patient_name,
        patient_id=study.patient_id,
        study_description=study.study_description,
        study_date=study.study_date,
        arrived_at=arrived,
        waiting_s=max(0.0, (utcnow() - arrived).total_seconds()),
        status=status,  # type: ignore[arg-type]
        instance_count=int(n),
        priority=PRIORITIES[int(rank)],  # type: ignore[arg-type]
        priority_rank=int(rank),
        priority_source=source,
        rule=rule,
        ai_priority=entry.ai_priority if entry is not None else None,  # type: ignore[arg-type]
        label=entry.label if entry is not None else None,
        probabilities=prediction.probabilities if prediction is not None else None,
        not_for_clinical_use=prediction.not_for_clinical_use if prediction is not None else None,
        heatmap_url=_first_image(links.get(prediction.id, []) if prediction is not None else []),
        read=entry is not None and entry.read_at is not None,
        read_at=as_utc(entry.read_at) if entry is not None and entry.read_at is not None else None,
        read_by=reader,
    )


def study_detail(session: Session, study_instance_uid: str, *, shadow: bool = False) -> StudyDetail | None:
    """One study with its instances, each one's live prediction (and, with `shadow`, the shadow set's, marked as not
    used), and the read finding with its history."""
    page_row = _study_row(session, study_instance_uid)
    if page_row is None:
        return None
    item, study, entry = page_row
    instances = session.scalars(
        select(Instance).where(Instance.study_id == study.id).order_by(Instance.received_at, Instance.id)
    ).all()
    details = []
    for instance in instances:
        prediction = session.scalars(
            select(Prediction)
            .where(Prediction.instance_id == instance.id, Prediction.role == PredictionRole.LIVE)
            .order_by(Prediction.created_at.desc(), Prediction.id.desc())
        ).first()
        assignment = session.scalar(select(PriorityAssignment).where(PriorityAssignment.instance_id == instance.id))
        details.append(
            InstanceDetail(
                sop_instance_uid=instance.sop_instance_uid,
                series_instance_uid=instance.series_instance_uid,
                modality=instance.modality,
                body_part=instance.body_part,
                view_position=instance.view_position,
                status=instance.status,
                status_reason=instance.status_reason,
                received_at=as_utc(instance.received_at),
                prediction=_prediction(instance, prediction, assignment, result_links(session, [prediction.id]))
                if prediction is not None
                else None,
                shadow=_shadow(session, instance.id) if shadow else None,
            )
        )
    history = [_finding(row) for row in finding_history(session, study.id)]
    return StudyDetail(
        **item.model_dump(),
        requested_priority=study.requested_priority,
        user_priority=entry.user_priority if entry is not None else None,  # type: ignore[arg-type]
        instances=details,
        finding=next((h for h in history if h.superseded_at is None), None),
        finding_history=history,
    )


def _finding(row: StudyFinding) -> FindingRecord:
    return FindingRecord(
        finding=row.finding,  # type: ignore[arg-type]
        username=row.username,
        recorded_at=as_utc(row.created_at),
        superseded_at=as_utc(row.superseded_at) if row.superseded_at is not None else None,
        ai_label=row.ai_label,
        ai_model_set=row.ai_model_set,
    )


def _shadow(session: Session, instance_id: int) -> ShadowPredictionDetail | None:
    """The instance's current shadow prediction (the latest, when several sets ran in shadow mode)."""
    row = session.scalars(
        select(Prediction)
        .where(
            Prediction.instance_id == instance_id,
            Prediction.role == PredictionRole.SHADOW,
            Prediction.superseded_at.is_(None),
        )
        .order_by(Prediction.created_at.desc(), Prediction.id.desc())
    ).first()
    if row is None:
        return None
    return ShadowPredictionDetail(
        label=row.label,
        probabilities=row.probabilities,
        model_set=row.model_set,
        model_versions=list(row.model_versions),
        out_of_distribution=row.out_of_distribution,
        created_at=as_utc(row.created_at),
    )


def _study_row(session: Session, study_instance_uid: str) -> tuple[WorklistItem, Study, WorklistEntry | None] | None:
    counts = _counts()
    status, rank = _expressions(counts)
    reader = aliased(User)
    row = session.execute(
        select(Study, counts.c.n, status, rank, WorklistEntry, PriorityAssignment, Prediction, reader.username)
        .join(counts, counts.c.study_id == Study.id)
        .outerjoin(WorklistEntry, WorklistEntry.study_id == Study.id)
        .outerjoin(PriorityAssignment, PriorityAssignment.instance_id == WorklistEntry.deciding_instance_id)
        .outerjoin(Prediction, Prediction.id == PriorityAssignment.prediction_id)
        .outerjoin(reader, reader.id == WorklistEntry.read_by)
        .where(Study.study_instance_uid == study_instance_uid)
    ).first()
    if row is None:
        return None
    links = result_links(session, [row[6].id] if row[6] is not None else [])
    return _item(*row, links=links), row[0], row[4]


def result_links(session: Session, prediction_ids: list[int]) -> dict[int, list[ResultLink]]:
    """The result objects of each prediction, in registry order, with the API path that serves each."""
    if not prediction_ids:
        return {}
    order = {name: i for i, name in enumerate(RESULT_KINDS)}
    rows = session.scalars(
        select(ResultObject).where(ResultObject.prediction_id.in_(prediction_ids)).order_by(ResultObject.id)
    ).all()
    links: dict[int, list[ResultLink]] = {}
    for row in sorted(rows, key=lambda r: (order.get(r.kind, len(order)), r.id)):
        kind = RESULT_KINDS.get(row.kind)
        if kind is None:  # a kind this version no longer produces: its file stays, unlinked
            continue
        # HL7 and FHIR messages have no SOP Instance UID and are not served: status and destination only.
        path = f"/api/results/{row.sop_instance_uid}" if row.sop_instance_uid else ""
        links.setdefault(row.prediction_id, []).append(
            ResultLink(
                kind=kind.name,
                title=kind.title,
                url=f"{path}/preview.png" if kind.image and path else path,
                image=kind.image and bool(path),
                status=row.status,
                transport=str(kind.transport),
                destination=row.destination,
            )
        )
    return links


def _first_image(links: list[ResultLink]) -> str | None:
    return next((link.url for link in links if link.image), None)


def _link_of(links: list[ResultLink], kind: str) -> str | None:
    return next((link.url for link in links if link.kind == kind), None)


def _prediction(
    instance: Instance,
    prediction: Prediction,
    assignment: PriorityAssignment | None,
    links: dict[int, list[ResultLink]],
) -> PredictionDetail:
    own = links.get(prediction.id, [])
    return PredictionDetail(
        label=prediction.label,
        probabilities=prediction.probabilities,
        member_probabilities=prediction.member_probabilities,
        model_set=prediction.model_set,
        model_versions=list(prediction.model_versions),
        not_for_clinical_use=prediction.not_for_clinical_use,
        created_at=as_utc(prediction.created_at),
        turnaround_s=(as_utc(prediction.created_at) - as_utc(instance.received_at)).total_seconds(),
        priority=assignment.priority if assignment is not None else None,  # type: ignore[arg-type]
        rule=assignment.rule if assignment is not None else None,
        rule_detail=assignment.detail if assignment is not None else None,
        results=own,
        sr_url=_link_of(own, "sr"),
        heatmap_url=_link_of(own, "heatmap"),
    )
