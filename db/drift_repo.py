"""Daily counts of live predictions for drift checks (cxr_triage/drift.py) and the label-mix metrics."""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session

from cxr_triage.drift import Day
from cxr_triage.priority import STAT
from db.models import Prediction, PredictionRole, as_utc, utcnow
from db.worklist_models import PriorityAssignment


def daily(session: Session, days: int, *, now: datetime | None = None) -> list[Day]:
    """`days` + 1 windows of 24 hours ending now, newest first, over current live predictions."""
    now = as_utc(now or utcnow())
    since = now - timedelta(days=days + 1)
    rows = session.execute(
        select(
            Prediction.created_at,
            Prediction.label,
            Prediction.probabilities,
            Prediction.out_of_distribution,
            PriorityAssignment.priority,
        )
        .outerjoin(PriorityAssignment, PriorityAssignment.prediction_id == Prediction.id)
        .where(
            Prediction.role == PredictionRole.LIVE,
            Prediction.superseded_at.is_(None),
            Prediction.created_at >= since,
        )
    ).all()
    buckets: list[list[tuple[str, dict[str, float], bool, str | None]]] = [[] for _ in range(days + 1)]
    for created, label, probabilities, ood, priority in rows:
        index = int((now - as_utc(created)).total_seconds() // 86400)
        if 0 <= index <= days:
            buckets[index].append((label, probabilities, bool(ood), priority))
    out = []
    for index, bucket in enumerate(buckets):
        labels: dict[str, int] = {}
        sums: dict[str, float] = {}
        for label, probabilities, _, _ in bucket:
            labels[label] = labels.get(label, 0) + 1
            for name, p in probabilities.items():
                sums[name] = sums.get(name, 0.0) + float(p)
        out.append(
            Day(
                end=now - timedelta(days=index),
                cases=len(bucket),
                stat=sum(1 for *_, priority in bucket if priority == STAT),
                ood=sum(1 for _, _, ood, _ in bucket if ood),
                labels=labels,
                mean_scores={name: total / len(bucket) for name, total in sums.items()} if bucket else {},
            )
        )
    return out
