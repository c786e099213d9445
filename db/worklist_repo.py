"""The worklist's state in the database: an instance's priority assignment and its study's worklist entry.

The rules are pure (cxr_triage/priority.py); this module applies them and stores what they decide.
"""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from cxr_triage.logs import get_logger
from cxr_triage.priority import RANK, ROUTINE, Rules, as_priority, becomes_unread, effective_priority, evaluate
from cxr_triage.settings import Settings, get_settings
from db import repo
from db.models import Instance, Prediction, PredictionRole, Study, utcnow
from db.worklist_models import PriorityAssignment, WorklistEntry

log = get_logger(__name__)


def assign_priority(session: Session, instance_id: int, settings: Settings) -> WorklistEntry | None:
    """Apply the rules to the instance's latest prediction and refresh its study's worklist entry.

    Called by the worker in the transaction that stores the prediction; idempotent.
    """
    instance = session.get(Instance, instance_id)
    if instance is None:
        return None
    study = session.get(Study, instance.study_id, with_for_update=True)  # one study's entries change one at a time
    prediction = session.scalars(
        select(Prediction)
        .where(Prediction.instance_id == instance_id, Prediction.role == PredictionRole.LIVE)
        .order_by(Prediction.created_at.desc(), Prediction.id.desc())
    ).first()
    if study is None or prediction is None:
        return None
    decision = evaluate(
        prediction.probabilities,
        prediction.member_probabilities,
        Rules.from_settings(settings, prediction.operating_point),
        ood_score=prediction.ood_score,
        out_of_distribution=bool(prediction.out_of_distribution),
    )
    assignment = session.scalar(select(PriorityAssignment).where(PriorityAssignment.instance_id == instance_id))
    if assignment is None:
        assignment = PriorityAssignment(
            instance_id=instance_id, prediction_id=prediction.id, priority="", rule="", detail=""
        )
        session.add(assignment)
    assignment.prediction_id = prediction.id
    assignment.priority, assignment.rule, assignment.detail = decision.priority, decision.rule, decision.detail
    session.flush()
    log.info(
        "worklist.assigned", sop_instance_uid=instance.sop_instance_uid, priority=decision.priority, rule=decision.rule
    )
    entry = refresh_entry(session, study)
    # A result is final, and the study's priority may have changed: the messages that calls for (HL7 to the RIS).
    repo.add_study_messages(
        session, settings, study, priority=entry.priority, prediction_id=prediction.id, result_final=True
    )
    return entry


def refresh_entry(session: Session, study: Study) -> WorklistEntry:
    """Recompute the study's effective priority: the highest of the AI results, the DICOM priority and the user's."""
    entry = session.scalar(select(WorklistEntry).where(WorklistEntry.study_id == study.id))
    if entry is None:
        entry = WorklistEntry(study_id=study.id, priority=ROUTINE, rank=-1, source="none", rule="")
        session.add(entry)
    assignments = session.execute(
        select(PriorityAssignment, Prediction.label)
        .join(Instance, Instance.id == PriorityAssignment.instance_id)
        .join(Prediction, Prediction.id == PriorityAssignment.prediction_id)
        .where(Instance.study_id == study.id)
        .order_by(PriorityAssignment.instance_id)
    ).all()
    best_ai: tuple[PriorityAssignment, str] | None = None
    for assignment, label in assignments:
        if best_ai is None or RANK[assignment.priority] > RANK[best_ai[0].priority]:
            best_ai = (assignment, label)
    ai = (as_priority(best_ai[0].priority), best_ai[0].rule) if best_ai is not None else None
    decided = effective_priority(ai, study.requested_priority, entry.user_priority)
    previous_rank = entry.rank
    entry.priority, entry.rank, entry.source, entry.rule = decided.priority, decided.rank, decided.source, decided.rule
    entry.ai_priority = best_ai[0].priority if best_ai else None
    entry.label = best_ai[1] if best_ai else None
    entry.deciding_instance_id = best_ai[0].instance_id if best_ai else None
    if entry.read_at is not None and becomes_unread(previous_rank, entry.rank):
        entry.read_at, entry.read_by = None, None
    entry.updated_at = utcnow()
    session.flush()
    return entry


def set_user_priority(
    session: Session, study: Study, priority: str | None, *, user_id: int, settings: Settings | None = None
) -> WorklistEntry:
    """A user's priority for the study (None clears it); like the DICOM priority, the AI never goes below it.

    When that changes the study's effective priority, records the messages it calls for (HL7 to the RIS) about the
    study's deciding result, with `settings` (default: the process's, cxr_triage.settings.get_settings).
    """
    if priority is not None:
        as_priority(priority)  # raises ValueError for an unknown word
    entry = refresh_entry(session, study)
    entry.user_priority = priority
    entry.user_priority_by = user_id if priority is not None else None
    entry = refresh_entry(session, study)
    deciding = None
    if entry.deciding_instance_id is not None:
        deciding = session.scalar(
            select(Prediction.id)
            .where(Prediction.instance_id == entry.deciding_instance_id, Prediction.role == PredictionRole.LIVE)
            .order_by(Prediction.created_at.desc(), Prediction.id.desc())
            .limit(1)
        )
    repo.add_study_messages(
        session, settings or get_settings(), study, priority=entry.priority, prediction_id=deciding, result_final=False
    )
    return entry


def set_read(session: Session, study: Study, read: bool, *, user_id: int) -> WorklistEntry:
    entry = refresh_entry(session, study)
    entry.read_at = utcnow() if read else None
    entry.read_by = user_id if read else None
    return entry
