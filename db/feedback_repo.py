"""Radiologist feedback: record a study's read finding, the AI's agreement with confirmed reads, and the confirmed
instances for retraining (`cxr-triage training export-feedback`) and the shadow report's calibration."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime, timedelta

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from db.feedback_models import READ_FINDINGS, TRAINABLE, StudyFinding
from db.models import Instance, InstanceStatus, Prediction, PredictionRole, Study, as_utc, utcnow
from db.worklist_models import WorklistEntry


class UnknownFinding(ValueError):
    """Not one of the read findings the study page offers."""


def record_finding(session: Session, study: Study, finding: str, username: str) -> StudyFinding:
    """Record (or change) the study's read finding; the previous one stays, superseded, with its user and time."""
    if finding not in READ_FINDINGS:
        raise UnknownFinding(f"finding must be one of {', '.join(READ_FINDINGS)}; got {finding!r}")
    entry = session.scalar(select(WorklistEntry).where(WorklistEntry.study_id == study.id))
    ai_label = entry.label if entry is not None else None
    model_set = None
    if entry is not None and entry.deciding_instance_id is not None:
        model_set = session.scalar(
            select(Prediction.model_set)
            .where(
                Prediction.instance_id == entry.deciding_instance_id,
                Prediction.role == PredictionRole.LIVE,
                Prediction.superseded_at.is_(None),
            )
            .order_by(Prediction.id.desc())
        )
    now = utcnow()
    previous = session.scalar(
        select(StudyFinding)
        .where(StudyFinding.study_id == study.id, StudyFinding.superseded_at.is_(None))
        .with_for_update()
    )
    if previous is not None:
        previous.superseded_at = now
        session.flush()  # the partial unique index allows one current row per study
    row = StudyFinding(
        study_id=study.id, finding=finding, username=username, ai_label=ai_label, ai_model_set=model_set, created_at=now
    )
    session.add(row)
    session.flush()
    return row


def current_finding(session: Session, study_id: int) -> StudyFinding | None:
    return session.scalar(
        select(StudyFinding).where(StudyFinding.study_id == study_id, StudyFinding.superseded_at.is_(None))
    )


def finding_history(session: Session, study_id: int) -> list[StudyFinding]:
    return list(
        session.scalars(select(StudyFinding).where(StudyFinding.study_id == study_id).order_by(StudyFinding.id)).all()
    )


@dataclass(frozen=True)
class Agreement:
    """Confirmed reads of one AI label in one ISO week, and how many the AI got right."""

    week: str  # ISO week, e.g. "2026-W49"
    ai_label: str
    confirmed: int
    agreed: int

    @property
    def rate(self) -> float:
        return self.agreed / self.confirmed if self.confirmed else 0.0


def _week(at: datetime) -> str:
    year, week, _ = as_utc(at).isocalendar()
    return f"{year}-W{week:02d}"


def agreement(session: Session, *, weeks: int = 12) -> list[Agreement]:
    """Per ISO week and AI label: current confirmed reads that are one of the model's classes, and agreement."""
    since = utcnow() - timedelta(weeks=weeks)
    rows = session.execute(
        select(StudyFinding.created_at, StudyFinding.ai_label, StudyFinding.finding).where(
            StudyFinding.superseded_at.is_(None),
            StudyFinding.created_at >= since,
            StudyFinding.ai_label.is_not(None),
            StudyFinding.finding.in_(TRAINABLE),
        )
    ).all()
    counts: dict[tuple[str, str], list[int]] = {}
    for at, ai_label, finding in rows:
        cell = counts.setdefault((_week(at), str(ai_label)), [0, 0])
        cell[0] += 1
        cell[1] += ai_label == finding
    return [Agreement(week, label, n, agreed) for (week, label), (n, agreed) in sorted(counts.items())]


def finding_counts(session: Session) -> dict[str, int]:
    """Current read findings (not superseded) by finding, every finding the study page offers (zero included)."""
    rows = session.execute(
        select(StudyFinding.finding, func.count())
        .where(StudyFinding.superseded_at.is_(None))
        .group_by(StudyFinding.finding)
    ).all()
    counts = dict.fromkeys(READ_FINDINGS, 0)
    counts.update({str(finding): int(n) for finding, n in rows})
    return counts


def confirmed_by_instance(session: Session) -> dict[int, str]:
    """Instance id -> the current confirmed finding of its study, for findings that are one of the model's classes."""
    rows = session.execute(
        select(Instance.id, StudyFinding.finding)
        .join(StudyFinding, StudyFinding.study_id == Instance.study_id)
        .where(StudyFinding.superseded_at.is_(None), StudyFinding.finding.in_(TRAINABLE))
    ).all()
    return {int(instance_id): str(finding) for instance_id, finding in rows}


@dataclass(frozen=True)
class ConfirmedInstance:
    sop_instance_uid: str
    study_instance_uid: str
    ref: str  # the spooled file's path or s3:// URL
    finding: str
    confirmed_at: date


def confirmed_instances(session: Session) -> tuple[list[ConfirmedInstance], dict[str, int]]:
    """The triaged instances of studies with a confirmed finding that the model can learn, and what was left out
    (by reason: a finding outside the model's classes, an instance not triaged, its spool file removed)."""
    rows = session.execute(
        select(Instance, Study.study_instance_uid, StudyFinding.finding, StudyFinding.created_at)
        .join(Study, Study.id == Instance.study_id)
        .join(StudyFinding, StudyFinding.study_id == Instance.study_id)
        .where(StudyFinding.superseded_at.is_(None))
        .order_by(Instance.id)
    ).all()
    kept: list[ConfirmedInstance] = []
    left_out: dict[str, int] = {}
    for instance, study_uid, finding, at in rows:
        reason = None
        if finding not in TRAINABLE:
            reason = f"finding {finding}"
        elif instance.status != InstanceStatus.DONE:
            reason = f"instance {instance.status} (not triaged)"
        elif instance.spool_removed_at is not None:
            reason = "spool file removed by retention"
        if reason:
            left_out[reason] = left_out.get(reason, 0) + 1
            continue
        kept.append(ConfirmedInstance(instance.sop_instance_uid, study_uid, instance.path, finding, as_utc(at).date()))
    return kept, left_out
