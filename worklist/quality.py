"""The site's own quality signals: the last 24 hours of live predictions against the previous weeks (drift, from
cxr_triage/drift.py) and the AI's agreement with the radiologists' confirmed reads (db/feedback_repo.py).

The worklist header, `GET /api/drift`, each poll of the worklist and each `/metrics` scrape read them from
`QualityMonitor`, which re-reads the database at most every CXR_DRIFT_REFRESH_S (weeks of predictions are not read
per request). `/agreement` and `GET /api/agreement` read the agreement afresh.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Final

from sqlalchemy.orm import Session

from cxr_triage.drift import Day, DriftCheck, check
from cxr_triage.labels import CLASS_LABELS
from cxr_triage.settings import Settings
from db.drift_repo import daily
from db.feedback_repo import Agreement, agreement, finding_counts
from db.models import utcnow
from db.session import session_scope
from worklist.schemas import AgreementCell, AgreementReport, DriftCheckDetail, DriftReport

AGREEMENT_WEEKS: Final = 12  # the agreement the header, the page and the metrics show: the last 12 ISO weeks
ALL: Final = "all"


@dataclass(frozen=True)
class Quality:
    """One reading: daily windows (newest first), the drift checks, agreement cells and current read findings."""

    days: list[Day]
    checks: list[DriftCheck]
    agreement: list[Agreement]
    findings: dict[str, int]
    read_at: datetime = field(default_factory=utcnow)

    @property
    def last_day(self) -> Day | None:
        return self.days[0] if self.days else None

    @property
    def warnings(self) -> list[str]:
        """The header's warnings: each check whose last-day rate is outside the range of the previous weeks."""
        return [f"Drift: {c.message}" for c in self.checks if c.outside]

    @property
    def overall(self) -> AgreementCell:
        return _total(ALL, self.agreement)


def read_quality(session: Session, settings: Settings, *, now: datetime | None = None) -> Quality:
    days = daily(session, settings.drift_baseline_days, now=now)
    return Quality(
        days=days,
        checks=check(days, min_cases=settings.drift_min_cases, tolerance=settings.drift_tolerance),
        agreement=agreement(session, weeks=AGREEMENT_WEEKS),
        findings=finding_counts(session),
    )


class QualityMonitor:
    """The last reading, re-read when older than CXR_DRIFT_REFRESH_S (one reader at a time)."""

    def __init__(self, settings: Settings, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self.clock = clock
        self._lock = threading.Lock()
        self._cached: tuple[float, Quality] | None = None

    def current(self) -> Quality:
        with self._lock:
            now = self.clock()
            if self._cached is None or now - self._cached[0] >= self.settings.drift_refresh_s:
                with session_scope(self.settings.effective_database_url) as session:
                    self._cached = (now, read_quality(session, self.settings))
            return self._cached[1]


# --- the API's answers ---------------------------------------------------------------------------------------------


def _rate(agreed: int, confirmed: int) -> float | None:
    return agreed / confirmed if confirmed else None


def _total(ai_label: str, rows: list[Agreement]) -> AgreementCell:
    confirmed = sum(r.confirmed for r in rows)
    agreed = sum(r.agreed for r in rows)
    return AgreementCell(week=ALL, ai_label=ai_label, confirmed=confirmed, agreed=agreed, rate=_rate(agreed, confirmed))


def agreement_report(rows: list[Agreement], findings: dict[str, int]) -> AgreementReport:
    """Cells per week and AI label, totals per label (every class, zero included) and over all."""
    return AgreementReport(
        weeks=AGREEMENT_WEEKS,
        cells=[
            AgreementCell(
                week=r.week,
                ai_label=r.ai_label,
                confirmed=r.confirmed,
                agreed=r.agreed,
                rate=_rate(r.agreed, r.confirmed),
            )
            for r in rows
        ],
        per_label=[_total(label, [r for r in rows if r.ai_label == label]) for label in CLASS_LABELS],
        overall=_total(ALL, rows),
        findings=findings,
    )


def read_agreement(settings: Settings) -> AgreementReport:
    """The agreement as recorded now (not the monitor's cached reading)."""
    with session_scope(settings.effective_database_url) as session:
        return agreement_report(agreement(session, weeks=AGREEMENT_WEEKS), finding_counts(session))


def drift_report(quality: Quality) -> DriftReport:
    day = quality.last_day
    cases = day.cases if day is not None else 0
    return DriftReport(
        read_at=quality.read_at,
        cases_24h=cases,
        label_share_24h={label: day.labels.get(label, 0) / cases for label in CLASS_LABELS}
        if day is not None and cases
        else {},
        mean_probability_24h=dict(day.mean_scores) if day is not None else {},
        stat_rate_24h=day.rate("stat") if day is not None and cases else None,
        ood_rate_24h=day.rate("ood") if day is not None and cases else None,
        checks=[
            DriftCheckDetail(
                check=c.name,  # type: ignore[arg-type]
                last=c.last,
                low=c.low,
                high=c.high,
                cases=c.cases,
                baseline_days=c.baseline_days,
                outside=c.outside,
                message=c.message,
            )
            for c in quality.checks
        ],
        warnings=quality.warnings,
    )
