"""Reading shadow predictions for the shadow report (cxr_triage/shadow.py): each instance's current shadow prediction
of a set beside its current live one."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import and_, func, select
from sqlalchemy.orm import Session, aliased

from cxr_triage.shadow import Pair, PredictionView
from db.models import Prediction, PredictionRole, as_utc


def _view(p: Prediction) -> PredictionView:
    return PredictionView(
        model_set=p.model_set,
        label=p.label,
        probabilities=dict(p.probabilities),
        member_probabilities=dict(p.member_probabilities),
        inference_ms=p.inference_ms,
        out_of_distribution=bool(p.out_of_distribution),
        ood_score=p.ood_score,
        operating_point=p.operating_point,
    )


def shadow_pairs(
    session: Session,
    shadow_set: str,
    *,
    since: datetime | None = None,
    confirmed: dict[int, str] | None = None,
) -> tuple[list[Pair], int]:
    """(pairs of current live and shadow predictions of each instance, count of shadow predictions without a live
    one); `confirmed` maps instance ids to the radiologist's read finding where one exists."""
    shadow = aliased(Prediction)
    live = aliased(Prediction)
    current_shadow = and_(
        shadow.model_set == shadow_set, shadow.role == PredictionRole.SHADOW, shadow.superseded_at.is_(None)
    )
    if since is not None:
        current_shadow = and_(current_shadow, shadow.created_at >= since)
    rows = session.execute(
        select(shadow, live)
        .join(
            live,
            and_(
                live.instance_id == shadow.instance_id,
                live.role == PredictionRole.LIVE,
                live.superseded_at.is_(None),
            ),
        )
        .where(current_shadow)
        .order_by(shadow.created_at, shadow.id)
    ).all()
    confirmed = confirmed or {}
    pairs: list[Pair] = []
    seen: set[int] = set()
    for s, lv in rows:
        if s.instance_id in seen:  # two live sets on one instance (a promotion in between): the first pairs
            continue
        seen.add(s.instance_id)
        pairs.append(Pair(s.instance_id, _view(lv), _view(s), as_utc(s.created_at), confirmed.get(s.instance_id)))
    total = session.scalar(select(func.count()).select_from(shadow).where(current_shadow)) or 0
    return pairs, int(total) - len(pairs)


def shadow_case_count(session: Session, shadow_set: str) -> int:
    """Live cases that the shadow set has seen (instances with both predictions)."""
    return len(shadow_pairs(session, shadow_set)[0])
