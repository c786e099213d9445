"""The shadow report: how a candidate model set, run on live traffic beside the promoted one, would have changed things.

Pure functions over pairs of predictions of one instance (the live one, used for the worklist and the PACS, and the
shadow one, stored only). `db/shadow_repo.py` reads the pairs; `cxr-triage models shadow report` prints the summary,
writes it as JSON to the registry (where `training gate --require-shadow N` reads it) and draws it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

from cxr_triage.labels import CLASS_LABELS
from cxr_triage.priority import STAT, Rules, evaluate


@dataclass(frozen=True)
class PredictionView:
    """What the report needs of one stored prediction."""

    model_set: str
    label: str
    probabilities: dict[str, float]
    member_probabilities: dict[str, dict[str, float]]
    inference_ms: float
    out_of_distribution: bool = False
    ood_score: float | None = None
    operating_point: dict[str, float] | None = None


@dataclass(frozen=True)
class Pair:
    instance_id: int
    live: PredictionView
    shadow: PredictionView
    at: datetime
    confirmed: str | None = None  # the radiologist's read finding, when one is recorded


@dataclass(frozen=True)
class Calibration:
    n: int
    accuracy: float
    brier: float
    ece: float


@dataclass(frozen=True)
class ShadowReport:
    shadow_set: str
    live_sets: list[str]
    cases: int  # instances with both a live and a shadow prediction
    shadow_only: int  # shadow predictions without a live one (the live triage failed or is pending)
    agreement: float | None  # share of cases where both sets gave the same label
    flips: dict[str, int]  # "live label -> shadow label": count, for the labels that differ
    confusion: dict[str, dict[str, int]]  # live label -> shadow label -> count (all cases)
    stat_rate_live: float | None
    stat_rate_shadow: float | None
    priority_flips: dict[str, int]  # "live priority -> shadow priority": count
    latency_ms: dict[str, dict[str, float]]  # {"live"|"shadow": {"p50", "p95"}} of inference time per image
    calibration: dict[str, Calibration] = field(default_factory=dict)  # vs confirmed reads: {"live", "shadow"}
    first_case: str | None = None
    last_case: str | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return math.nan
    rank = (len(ordered) - 1) * q
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def _priority(view: PredictionView, rules_for: Any) -> str:
    rules: Rules = rules_for(view.operating_point)
    return evaluate(
        view.probabilities,
        view.member_probabilities,
        rules,
        ood_score=view.ood_score,
        out_of_distribution=view.out_of_distribution,
    ).priority


def calibration(views: list[tuple[PredictionView, str]], n_bins: int = 10) -> Calibration:
    """Accuracy, multi-class Brier score and expected calibration error (top label, equal-width bins) of predictions
    against confirmed labels."""
    n = len(views)
    correct = 0
    brier = 0.0
    bins: list[list[tuple[float, bool]]] = [[] for _ in range(n_bins)]
    for view, truth in views:
        hit = view.label == truth
        correct += hit
        brier += sum((view.probabilities.get(c, 0.0) - (1.0 if c == truth else 0.0)) ** 2 for c in CLASS_LABELS)
        confidence = max(view.probabilities.values(), default=0.0)
        bins[min(int(confidence * n_bins), n_bins - 1)].append((confidence, hit))
    ece = sum(len(b) / n * abs(sum(c for c, _ in b) / len(b) - sum(h for _, h in b) / len(b)) for b in bins if b)
    return Calibration(n, correct / n, brier / n, ece)


def summarise(shadow_set: str, pairs: list[Pair], rules_for: Any, *, shadow_only: int = 0) -> ShadowReport:
    """The report over `pairs`; `rules_for(operating_point) -> Rules` gives the site's rules for a set (thresholds
    from the settings, else that set's operating point), so each set is judged by the priority it would assign."""
    confusion = {a: dict.fromkeys(CLASS_LABELS, 0) for a in CLASS_LABELS}
    flips: dict[str, int] = {}
    priority_flips: dict[str, int] = {}
    stat_live = stat_shadow = 0
    for pair in pairs:
        confusion.setdefault(pair.live.label, {}).setdefault(pair.shadow.label, 0)
        confusion[pair.live.label][pair.shadow.label] += 1
        if pair.live.label != pair.shadow.label:
            key = f"{pair.live.label} -> {pair.shadow.label}"
            flips[key] = flips.get(key, 0) + 1
        live_priority, shadow_priority = _priority(pair.live, rules_for), _priority(pair.shadow, rules_for)
        stat_live += live_priority == STAT
        stat_shadow += shadow_priority == STAT
        if live_priority != shadow_priority:
            key = f"{live_priority} -> {shadow_priority}"
            priority_flips[key] = priority_flips.get(key, 0) + 1
    n = len(pairs)
    confirmed = [p for p in pairs if p.confirmed in CLASS_LABELS]
    latency = {
        role: {
            "p50": _percentile([getattr(p, role).inference_ms for p in pairs], 0.5),
            "p95": _percentile([getattr(p, role).inference_ms for p in pairs], 0.95),
        }
        for role in ("live", "shadow")
    }
    times = sorted(p.at for p in pairs)
    return ShadowReport(
        shadow_set=shadow_set,
        live_sets=sorted({p.live.model_set for p in pairs}),
        cases=n,
        shadow_only=shadow_only,
        agreement=sum(p.live.label == p.shadow.label for p in pairs) / n if n else None,
        flips=dict(sorted(flips.items(), key=lambda kv: -kv[1])),
        confusion=confusion,
        stat_rate_live=stat_live / n if n else None,
        stat_rate_shadow=stat_shadow / n if n else None,
        priority_flips=dict(sorted(priority_flips.items(), key=lambda kv: -kv[1])),
        latency_ms=latency if n else {},
        calibration={
            role: calibration([(getattr(p, role), str(p.confirmed)) for p in confirmed]) for role in ("live", "shadow")
        }
        if confirmed
        else {},
        first_case=times[0].isoformat(timespec="seconds") if times else None,
        last_case=times[-1].isoformat(timespec="seconds") if times else None,
    )


def render_text(report: ShadowReport) -> str:
    """The report for a terminal."""

    def pct(value: float | None) -> str:
        return "n/a" if value is None else f"{100 * value:.1f}%"

    lines = [
        f"shadow set {report.shadow_set} beside {', '.join(report.live_sets) or 'no live set'}",
        f"cases: {report.cases} with both predictions ({report.shadow_only} shadow-only)"
        + (f", {report.first_case} .. {report.last_case}" if report.first_case else ""),
        f"agreement: {pct(report.agreement)}",
        f"STAT rate: live {pct(report.stat_rate_live)}, shadow {pct(report.stat_rate_shadow)}",
    ]
    if report.flips:
        lines.append("label flips (live -> shadow): " + ", ".join(f"{k}: {v}" for k, v in report.flips.items()))
    if report.priority_flips:
        lines.append("priority flips: " + ", ".join(f"{k}: {v}" for k, v in report.priority_flips.items()))
    if report.latency_ms:
        lines.append(
            "inference ms per image (p50/p95): "
            + ", ".join(f"{role} {v['p50']:.0f}/{v['p95']:.0f}" for role, v in report.latency_ms.items())
        )
    if report.calibration:
        for role, cal in report.calibration.items():
            lines.append(
                f"vs {cal.n} confirmed reads, {role}: accuracy {pct(cal.accuracy)}, Brier {cal.brier:.3f}, "
                f"ECE {cal.ece:.3f}"
            )
    else:
        lines.append("no confirmed reads yet: calibration against the site's findings is not available")
    return "\n".join(lines)
