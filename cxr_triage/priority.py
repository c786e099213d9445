"""Priority rules: ensemble output -> priority, and a study's priority that never drops below DICOM or a user."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from sqlalchemy import select
from sqlalchemy.orm import Session

from cxr_triage.labels import COVID19, NO_FINDING, PNEUMONIA
from cxr_triage.logs import get_logger
from cxr_triage.ood import OOD_REASON
from cxr_triage.settings import Settings
from db.models import Instance, Prediction, Study, utcnow
from db.worklist_models import TriageResult, WorklistEntry

log = get_logger(__name__)

# Worklist priorities, least urgent first: the index is the rank the worklist sorts by (highest first).
PRIORITIES: Final[tuple[str, ...]] = ("low", "routine", "medium", "indeterminate", "high", "stat")
RANK: Final[dict[str, int]] = {name: rank for rank, name in enumerate(PRIORITIES)}
STAT, HIGH, INDETERMINATE, ROUTINE = "stat", "high", "indeterminate", "routine"

# RequestedProcedurePriority (0040,1003) and similar DICOM words -> worklist priority.
DICOM_PRIORITIES: Final[dict[str, str]] = {
    "STAT": "stat",
    "ASAP": "high",
    "URGENT": "high",
    "HIGH": "high",
    "MEDIUM": "medium",
    "ROUTINE": "routine",
    "LOW": "low",
}
URGENT_LABELS: Final[tuple[str, ...]] = (COVID19, PNEUMONIA)
DEFAULT_STAT_THRESHOLD: Final = 0.5
DEFAULT_ROUTINE_THRESHOLD: Final = 0.8


@dataclass(frozen=True)
class Rules:
    """The site's thresholds; validated here so that no inconsistent rule set can exist."""

    stat_threshold: float
    routine_threshold: float
    indeterminate_margin: float
    disagreement_threshold: float

    def __post_init__(self) -> None:
        for name in ("stat_threshold", "routine_threshold", "disagreement_threshold"):
            if not 0 < getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in (0, 1], got {getattr(self, name)}")
        if not 0 <= self.indeterminate_margin < 1:
            raise ValueError(f"indeterminate_margin must be in [0, 1), got {self.indeterminate_margin}")

    @classmethod
    def from_settings(cls, settings: Settings, operating_point: dict[str, float] | None = None) -> Rules:
        """The site's settings; thresholds left empty come from the model set's operating point, else defaults."""
        point = operating_point or {}
        stat = settings.stat_threshold or point.get("stat_threshold") or DEFAULT_STAT_THRESHOLD
        routine = settings.routine_threshold or point.get("routine_threshold") or DEFAULT_ROUTINE_THRESHOLD
        return cls(
            stat_threshold=stat,
            routine_threshold=routine,
            indeterminate_margin=settings.indeterminate_margin,
            disagreement_threshold=settings.disagreement_threshold,
        )


@dataclass(frozen=True)
class Decision:
    priority: str
    rule: str
    detail: str


def evaluate(
    probabilities: dict[str, float],
    member_probabilities: dict[str, dict[str, float]],
    rules: Rules,
    *,
    ood_score: float | None = None,
    out_of_distribution: bool = False,
) -> Decision:
    """The first rule that fires, in order: out of distribution, STAT, member disagreement, near a threshold,
    confident routine.

    An input unlike the training radiographs gets no confident label, whatever its probabilities. Nothing that is
    not confidently normal becomes routine: what no rule claims is indeterminate.
    """
    if out_of_distribution:
        score = f" (score {ood_score:.0f})" if ood_score is not None else ""
        return Decision(INDETERMINATE, "indeterminate-out-of-distribution", f"{OOD_REASON}{score}: not like the "
                        "frontal chest radiographs the models were trained on")  # fmt: skip
    for label in URGENT_LABELS:
        p = probabilities.get(label, 0.0)
        if p >= rules.stat_threshold:
            return Decision(STAT, f"stat-{_slug(label)}", f"{label} {p:.2f} >= {rules.stat_threshold:.2f}")
    for label in (*URGENT_LABELS, NO_FINDING):
        values = [member.get(label, 0.0) for member in member_probabilities.values()]
        if len(values) > 1 and max(values) - min(values) >= rules.disagreement_threshold:
            spread = max(values) - min(values)
            return Decision(
                INDETERMINATE,
                "indeterminate-disagreement",
                f"members differ on {label} by {spread:.2f} >= {rules.disagreement_threshold:.2f}",
            )
    margin = rules.indeterminate_margin
    for label in URGENT_LABELS:
        p = probabilities.get(label, 0.0)
        if rules.stat_threshold - margin <= p:
            return Decision(
                INDETERMINATE,
                "indeterminate-near-threshold",
                f"{label} {p:.2f} within {margin:.2f} of {rules.stat_threshold:.2f}",
            )
    normal = probabilities.get(NO_FINDING, 0.0)
    if abs(normal - rules.routine_threshold) < margin:
        return Decision(
            INDETERMINATE,
            "indeterminate-near-threshold",
            f"{NO_FINDING} {normal:.2f} within {margin:.2f} of {rules.routine_threshold:.2f}",
        )
    if normal >= rules.routine_threshold:
        return Decision(ROUTINE, "routine-confident-no-finding", f"{NO_FINDING} {normal:.2f}")
    return Decision(
        INDETERMINATE,
        "indeterminate-low-confidence",
        f"no class confident ({NO_FINDING} {normal:.2f} < {rules.routine_threshold:.2f})",
    )


def dicom_priority(value: str | None) -> str | None:
    """The worklist priority for a DICOM priority word, or None when absent or unknown."""
    if not value:
        return None
    return DICOM_PRIORITIES.get(value.strip().upper())


def assign(session: Session, instance_id: int, settings: Settings) -> WorklistEntry | None:
    """Apply the rules to the instance's latest prediction and refresh its study's worklist entry.

    Called by the worker in the transaction that stores the prediction; idempotent.
    """
    instance = session.get(Instance, instance_id)
    if instance is None:
        return None
    study = session.get(Study, instance.study_id, with_for_update=True)  # one study's entries change one at a time
    prediction = session.scalars(
        select(Prediction)
        .where(Prediction.instance_id == instance_id)
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
    result = session.scalar(select(TriageResult).where(TriageResult.instance_id == instance_id))
    if result is None:
        result = TriageResult(instance_id=instance_id, prediction_id=prediction.id, priority="", rule="", detail="")
        session.add(result)
    result.prediction_id = prediction.id
    result.priority, result.rule, result.detail = decision.priority, decision.rule, decision.detail
    session.flush()
    log.info(
        "worklist.assigned", sop_instance_uid=instance.sop_instance_uid, priority=decision.priority, rule=decision.rule
    )
    return refresh_entry(session, study)


def refresh_entry(session: Session, study: Study) -> WorklistEntry:
    """Recompute the study's effective priority: the highest of the AI results, the DICOM priority and the user's."""
    entry = session.scalar(select(WorklistEntry).where(WorklistEntry.study_id == study.id))
    if entry is None:
        entry = WorklistEntry(study_id=study.id, priority=ROUTINE, rank=-1, source="none", rule="")
        session.add(entry)
    results = session.execute(
        select(TriageResult, Prediction.label)
        .join(Instance, Instance.id == TriageResult.instance_id)
        .join(Prediction, Prediction.id == TriageResult.prediction_id)
        .where(Instance.study_id == study.id)
        .order_by(TriageResult.instance_id)
    ).all()
    best_ai: tuple[TriageResult, str] | None = None
    for result, label in results:
        if best_ai is None or RANK[result.priority] > RANK[best_ai[0].priority]:
            best_ai = (result, label)
    # On a tie the AI's rule is kept as the explanation; DICOM and user priorities only ever raise.
    candidates: list[tuple[str, str, str]] = []
    if best_ai is not None:
        candidates.append((best_ai[0].priority, "ai", best_ai[0].rule))
    requested = dicom_priority(study.requested_priority)
    if requested is not None:
        candidates.append((requested, "dicom", f"dicom-requested-{requested}"))
    if entry.user_priority in RANK:
        candidates.append((entry.user_priority, "user", f"user-set-{entry.user_priority}"))
    if not candidates:
        candidates.append((ROUTINE, "none", "no-result-yet"))
    priority, source, rule = max(candidates, key=lambda c: RANK[c[0]])  # max keeps the first of equals
    previous_rank = entry.rank
    entry.priority, entry.rank, entry.source, entry.rule = priority, RANK[priority], source, rule
    entry.ai_priority = best_ai[0].priority if best_ai else None
    entry.label = best_ai[1] if best_ai else None
    entry.deciding_instance_id = best_ai[0].instance_id if best_ai else None
    if entry.read_at is not None and previous_rank >= 0 and entry.rank > previous_rank:
        entry.read_at, entry.read_by = None, None  # a read study that became more urgent comes back unread
    entry.updated_at = utcnow()
    session.flush()
    return entry


def set_user_priority(session: Session, study: Study, priority: str | None, *, user_id: int) -> WorklistEntry:
    """A user's priority for the study (None clears it); like the DICOM priority, the AI never goes below it."""
    if priority is not None and priority not in RANK:
        raise ValueError(f"unknown priority {priority!r}; expected one of {PRIORITIES}")
    entry = refresh_entry(session, study)
    entry.user_priority = priority
    entry.user_priority_by = user_id if priority is not None else None
    return refresh_entry(session, study)


def set_read(session: Session, study: Study, read: bool, *, user_id: int) -> WorklistEntry:
    entry = refresh_entry(session, study)
    entry.read_at = utcnow() if read else None
    entry.read_by = user_id if read else None
    return entry


def _slug(label: str) -> str:
    return label.lower().replace(" ", "-")


def link_results(session: Session, instance_id: int, sop_instance_uids: dict[str, str]) -> None:
    """Point the instance's worklist result at its SR and heatmap (served by /api/results/...)."""
    result = session.scalar(select(TriageResult).where(TriageResult.instance_id == instance_id))
    if result is None:
        return
    if "sr" in sop_instance_uids:
        result.sr_url = f"/api/results/{sop_instance_uids['sr']}"
    if "heatmap" in sop_instance_uids:
        result.heatmap_url = f"/api/results/{sop_instance_uids['heatmap']}/preview.png"
