"""Drift: is the last day's STAT rate or out-of-distribution rate outside the range of the weeks before?

Pure functions over daily counts (`db/drift_repo.py` reads them); the worklist header shows the warnings and
`/metrics` exports the rates and the label mix.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

MIN_BASELINE_DAYS = 7  # fewer days with enough cases: no range yet, so no warning


@dataclass(frozen=True)
class Day:
    """Live predictions in one 24-hour window (ending `end`)."""

    end: datetime
    cases: int
    stat: int
    ood: int
    labels: dict[str, int]  # label -> count
    mean_scores: dict[str, float]  # class -> mean probability

    def rate(self, what: str) -> float:
        return (self.stat if what == "stat" else self.ood) / self.cases if self.cases else 0.0


@dataclass(frozen=True)
class DriftCheck:
    name: str  # "stat" or "ood"
    last: float | None  # the last day's rate (None: fewer than min_cases)
    low: float | None  # the baseline range, widened by the tolerance (None: not enough history)
    high: float | None
    cases: int
    baseline_days: int

    @property
    def outside(self) -> bool:
        return (
            self.last is not None
            and self.low is not None
            and self.high is not None
            and not (self.low <= self.last <= self.high)
        )

    @property
    def message(self) -> str:
        title = "STAT rate" if self.name == "stat" else "Out-of-distribution rate"
        if self.last is None:
            return f"{title}: fewer than the minimum cases in the last day ({self.cases})"
        if self.low is None or self.high is None:
            return f"{title} {self.last:.0%} in the last day; not enough history for a range yet"
        where = "outside" if self.outside else "within"
        return (
            f"{title} {self.last:.0%} in the last day ({self.cases} cases), {where} the range of the previous "
            f"{self.baseline_days} days ({self.low:.0%}-{self.high:.0%})"
        )


def check(days: list[Day], *, min_cases: int, tolerance: float) -> list[DriftCheck]:
    """`days` newest first: days[0] is the last 24 hours, the rest the baseline. Days with fewer than `min_cases`
    cases are left out of the baseline; the range is [min, max] of the baseline's daily rates, widened by
    `tolerance` (absolute) on both sides."""
    if not days:
        return []
    last, baseline = days[0], [d for d in days[1:] if d.cases >= min_cases]
    out = []
    for name in ("stat", "ood"):
        rates = [d.rate(name) for d in baseline]
        enough = len(rates) >= MIN_BASELINE_DAYS
        out.append(
            DriftCheck(
                name=name,
                last=last.rate(name) if last.cases >= min_cases else None,
                low=max(0.0, min(rates) - tolerance) if enough else None,
                high=min(1.0, max(rates) + tolerance) if enough else None,
                cases=last.cases,
                baseline_days=len(rates),
            )
        )
    return out
