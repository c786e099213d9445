"""Priority rules, pure: ensemble output -> an instance's priority, and a study's effective priority.

Every rule about urgency lives here; db/worklist_repo.py stores what they decide and worklist/queries.py ranks by the
same constants in SQL. Nothing here touches a database.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Literal, get_args

from cxr_triage.labels import COVID19, NO_FINDING, PNEUMONIA
from cxr_triage.ood import OOD_REASON
from cxr_triage.settings import Settings

# Worklist priorities, least urgent first: the index is the rank the worklist sorts by (highest first).
Priority = Literal["low", "routine", "medium", "indeterminate", "high", "stat"]
PRIORITIES: Final[tuple[Priority, ...]] = get_args(Priority)
RANK: Final[dict[str, int]] = {name: rank for rank, name in enumerate(PRIORITIES)}
STAT: Final = "stat"
HIGH: Final = "high"
INDETERMINATE: Final = "indeterminate"
ROUTINE: Final = "routine"


def as_priority(value: str) -> Priority:
    """A stored priority word as a Priority; raises ValueError for an unknown one."""
    if value not in RANK:
        raise ValueError(f"unknown priority {value!r}; expected one of {PRIORITIES}")
    return PRIORITIES[RANK[value]]


# Who set a study's effective priority.
Source = Literal["ai", "dicom", "user", "failed", "none"]

# RequestedProcedurePriority (0040,1003) and similar DICOM words -> worklist priority.
DICOM_PRIORITIES: Final[dict[str, Priority]] = {
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
    """An instance's priority and the rule that gave it."""

    priority: Priority
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


def dicom_priority(value: str | None) -> Priority | None:
    """The worklist priority for a DICOM priority word, or None when absent or unknown."""
    if not value:
        return None
    return DICOM_PRIORITIES.get(value.strip().upper())


def _slug(label: str) -> str:
    return label.lower().replace(" ", "-")


# A study whose triage failed is at least indeterminate: nobody may take "no result" for "normal".
FAILED_TRIAGE_FLOOR: Final[Priority] = INDETERMINATE
FAILED_TRIAGE_RULE: Final = "indeterminate-triage-failed"
NO_RESULT_RULE: Final = "no-result-yet"


@dataclass(frozen=True)
class Effective:
    """A study's effective priority, who set it and the rule that explains it."""

    priority: Priority
    source: Source
    rule: str

    @property
    def rank(self) -> int:
        return RANK[self.priority]


def effective_priority(ai: tuple[Priority, str] | None, requested: str | None, user: str | None) -> Effective:
    """The highest of the most urgent AI result (priority, rule), the DICOM priority word and the user's priority.

    On a tie the AI's rule is kept as the explanation; DICOM and user priorities only ever raise.
    """
    candidates: list[Effective] = []
    if ai is not None:
        candidates.append(Effective(ai[0], "ai", ai[1]))
    dicom = dicom_priority(requested)
    if dicom is not None:
        candidates.append(Effective(dicom, "dicom", f"dicom-requested-{dicom}"))
    if user in RANK:
        candidates.append(Effective(as_priority(user), "user", f"user-set-{user}"))
    if not candidates:
        return Effective(ROUTINE, "none", NO_RESULT_RULE)
    return max(candidates, key=lambda c: c.rank)  # max keeps the first of equals


def becomes_unread(previous_rank: int, rank: int) -> bool:
    """A study already read comes back unread when it becomes more urgent than when it was read."""
    return previous_rank >= 0 and rank > previous_rank
