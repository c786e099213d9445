"""The promotion gate: a candidate ensemble is promoted only if it is not worse than the promoted one, on the
locked test split, and clears absolute floors; every decision and its reasons are recorded in the registry.

Rules (all on the same locked test split):
1. macro AUROC non-inferiority: the lower bound of the 95 % paired-bootstrap interval (resampling patient groups)
   of candidate - promoted must be above -`max_auroc_drop`. With nothing promoted yet, macro AUROC must be at least
   `min_macro_auroc`.
2. COVID-19 sensitivity at the operating point (the predicted class is the argmax; "COVID-19" when its probability
   is the largest) must be at least `min_covid_sensitivity`.
3. Expected calibration error (10 bins) must be at most `max_ece`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from cxr_triage.labels import COVID19, label_index
from cxr_triage.registry import Registry, write_json_atomic
from cxr_triage.settings import Settings
from training.config import N_BOOT, check_overrides, setting, settings_values
from training.dataset import LOCKED_SPLIT_FILE, extend_lock, read_split_manifest, sha256_file
from training.metrics import expected_calibration_error, group_resamples, macro_auroc


@dataclass(frozen=True)
class GateConfig:
    """Thresholds of the gate; validated so that no meaningless configuration exists.

    The thresholds' defaults and values come from the CXR_GATE_* settings (`from_settings`).
    """

    max_auroc_drop: float = setting("gate_max_auroc_drop")
    min_macro_auroc: float = setting("gate_min_macro_auroc")
    min_covid_sensitivity: float = setting("gate_min_covid_sensitivity")
    max_ece: float = setting("gate_max_ece")
    n_boot: int = N_BOOT
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("max_auroc_drop", "min_macro_auroc", "min_covid_sensitivity", "max_ece"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must lie in [0, 1], got {getattr(self, name)}")
        if self.n_boot < 100:
            raise ValueError("n_boot must be at least 100 for a 95 % interval")

    @classmethod
    def from_settings(cls, settings: Settings, **overrides: Any) -> GateConfig:
        """The gate the settings describe (CXR_GATE_*); `overrides` replace fields (an unknown key: TypeError)."""
        check_overrides(cls, overrides)
        return cls(**{**settings_values(cls, settings), **overrides})


@dataclass(frozen=True)
class GateDecision:
    candidate: str
    promoted_before: str | None
    accepted: bool
    reasons: list[str]
    metrics: dict[str, Any]
    config: dict[str, Any]
    split_manifest_sha256: str = ""
    decided_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))


def covid_sensitivity(y: np.ndarray, probs: np.ndarray, labels: np.ndarray | None = None) -> float | None:
    """Share of COVID-19 images labelled COVID-19 (`labels` at the set's operating point; default the argmax)."""
    covid = label_index(COVID19)
    positives = y == covid
    if not positives.any():
        return None
    predicted = probs.argmax(axis=1) if labels is None else np.asarray(labels)
    return float((predicted[positives] == covid).mean())


def paired_auroc_delta(
    y: np.ndarray, candidate: np.ndarray, promoted: np.ndarray, groups: np.ndarray, *, n_boot: int, seed: int
) -> dict[str, Any]:
    """Candidate - promoted macro AUROC with a 95 % percentile interval, resampling groups (same draws for both)."""
    deltas: list[float] = []
    for idx in group_resamples(groups, n_boot, seed):
        if len(np.unique(y[idx])) < len(np.unique(y)):
            continue
        a, b = macro_auroc(y[idx], candidate[idx]), macro_auroc(y[idx], promoted[idx])
        if a is not None and b is not None:
            deltas.append(a - b)
    point_a, point_b = macro_auroc(y, candidate), macro_auroc(y, promoted)
    return {
        "delta": (point_a - point_b) if point_a is not None and point_b is not None else None,
        "delta_95ci": [float(np.percentile(deltas, 2.5)), float(np.percentile(deltas, 97.5))] if deltas else None,
        "resamples_used": len(deltas),
    }


def decide(
    y: np.ndarray,
    candidate: np.ndarray,
    promoted: np.ndarray | None,
    groups: np.ndarray,
    config: GateConfig,
    *,
    candidate_name: str,
    promoted_name: str | None,
    candidate_labels: np.ndarray | None = None,
) -> GateDecision:
    """Apply the rules to predictions on the locked test split (pure: no files, no registry)."""
    reasons: list[str] = []
    accepted = True
    auroc = macro_auroc(y, candidate)
    sensitivity = covid_sensitivity(y, candidate, candidate_labels)
    ece = expected_calibration_error(y, candidate)
    metrics: dict[str, Any] = {"macro_auroc": auroc, "covid_sensitivity": sensitivity, "ece_10bins": ece}
    if promoted is None:
        ok = auroc is not None and auroc >= config.min_macro_auroc
        accepted &= ok
        reasons.append(
            f"{'pass' if ok else 'FAIL'}: first model, macro AUROC {auroc if auroc is None else round(auroc, 4)} "
            f"{'>=' if ok else '<'} floor {config.min_macro_auroc}"
        )
    else:
        paired = paired_auroc_delta(y, candidate, promoted, groups, n_boot=config.n_boot, seed=config.seed)
        metrics["promoted_macro_auroc"] = macro_auroc(y, promoted)
        metrics["auroc_delta"] = paired
        low = paired["delta_95ci"][0] if paired["delta_95ci"] else None
        ok = low is not None and low > -config.max_auroc_drop
        accepted &= ok
        reasons.append(
            f"{'pass' if ok else 'FAIL'}: macro AUROC vs {promoted_name}: delta {paired['delta']:.4f}, "
            f"95% CI lower bound {low if low is None else round(low, 4)} "
            f"{'>' if ok else '<='} -{config.max_auroc_drop}"
        )
    ok = sensitivity is not None and sensitivity >= config.min_covid_sensitivity
    accepted &= ok
    reasons.append(
        f"{'pass' if ok else 'FAIL'}: COVID-19 sensitivity "
        f"{sensitivity if sensitivity is None else round(sensitivity, 4)} {'>=' if ok else '<'} "
        f"{config.min_covid_sensitivity}"
    )
    ok = ece <= config.max_ece
    accepted &= ok
    reasons.append(f"{'pass' if ok else 'FAIL'}: ECE {ece:.4f} {'<=' if ok else '>'} {config.max_ece}")
    return GateDecision(
        candidate=candidate_name,
        promoted_before=promoted_name,
        accepted=accepted,
        reasons=reasons,
        metrics=metrics,
        config=asdict(config),
    )


def run_gate(
    registry_dir: Path,
    candidate_ensemble: str,
    split_csv: Path,
    config: GateConfig,
    *,
    promote: bool = True,
    threads: int = 2,
    require_shadow: int = 0,
) -> GateDecision:
    """Evaluate candidate and promoted ensembles on the locked test split, decide, record, and promote if accepted.

    With `require_shadow` N, the candidate must also have run in shadow mode on at least N live cases, as the latest
    shadow report in the registry says (`cxr-triage models shadow report`); that report is recorded with the decision.

    Both sets are scored as they run in the service (weights, temperature, operating point). Every test image is
    checked by hash against every member's training and validation split first (`evaluate.check_unseen`).
    """
    from cxr_triage.ensembling import labels_at
    from training.evaluate import ensemble_probabilities
    from training.metrics import within_source

    registry = Registry(registry_dir)
    df = read_split_manifest(Path(split_csv), "test")
    if df.empty:
        raise ValueError(f"the test split of {split_csv} is empty")
    y = np.array([label_index(label) for label in df["label"]])
    paths = list(df["abs_path"])
    groups = df["group"].to_numpy()
    candidate_spec = registry.ensemble(candidate_ensemble)
    candidate = ensemble_probabilities(registry, candidate_spec, paths, threads=threads)
    promoted_spec = registry.promoted()
    promoted = (
        ensemble_probabilities(registry, promoted_spec, paths, threads=threads)
        if promoted_spec is not None and promoted_spec.name != candidate_ensemble
        else None
    )
    decision = decide(
        y,
        candidate,
        promoted,
        groups,
        config,
        candidate_name=candidate_ensemble,
        promoted_name=promoted_spec.name if promoted is not None and promoted_spec is not None else None,
        candidate_labels=labels_at(candidate, candidate_spec.operating()),
    )
    # The shortcut checks travel with every decision (recorded, not gated: see the README for their goals).
    decision.metrics["within_source"] = within_source(
        y, candidate, df["source"].to_numpy(), groups, n_boot=config.n_boot, seed=config.seed
    )
    decision.metrics["operating_point"] = candidate_spec.operating_point or None
    if require_shadow:
        decision = shadow_requirement(registry, decision, require_shadow)
    decision = GateDecision(**{**asdict(decision), "split_manifest_sha256": sha256_file(Path(split_csv))})
    record_decision(registry, decision)
    if decision.accepted and promote:
        registry.promote(candidate_ensemble, reason="gate: " + "; ".join(decision.reasons))
        # The promoted set's images join the registry's locked split (images it already holds keep theirs).
        extend_lock(
            registry.root / LOCKED_SPLIT_FILE, [registry.version_dir(m) / "split.csv" for m in candidate_spec.members]
        )

    in_service = set(promoted_spec.members) if promoted_spec is not None else set()
    for version in candidate_spec.members:
        card = registry.card(version)
        if decision.accepted and promote and card.status != "promoted":
            registry.write_card(replace(card, status="promoted"))  # also a member an earlier, stricter gate refused
        elif not decision.accepted and card.status == "candidate" and version not in in_service:
            registry.write_card(replace(card, status="rejected"))
    return decision


def shadow_requirement(registry: Registry, decision: GateDecision, required: int) -> GateDecision:
    """Refuse a candidate with fewer than `required` live shadow cases; record the shadow report it was judged by."""
    report = registry.shadow_report(decision.candidate)
    cases = int(report.get("cases", 0)) if report and report.get("shadow_set") == decision.candidate else 0
    metrics = {**decision.metrics, "shadow": report, "shadow_required": required}
    if cases >= required:
        reason = (
            f"shadow period: {cases} live cases >= {required} required (report of {report and report['written_at']})"
        )
        return replace(decision, reasons=[*decision.reasons, reason], metrics=metrics)
    reason = f"shadow period: {cases} live cases < {required} required" + (
        "" if report else "; no shadow report (run `cxr-triage models shadow start` then `... shadow report`)"
    )
    return replace(decision, accepted=False, reasons=[*decision.reasons, reason], metrics=metrics)


def record_decision(registry: Registry, decision: GateDecision) -> Path:
    """Append the decision to models/gate/decisions.jsonl and write it next to the ensemble."""
    path = registry.root / "gate" / f"{decision.candidate}-{decision.decided_at.replace(':', '')}.json"
    write_json_atomic(path, asdict(decision))
    log = registry.root / "gate" / "decisions.jsonl"
    with log.open("a") as fh:
        fh.write(json.dumps(asdict(decision), sort_keys=True) + "\n")
    return path
