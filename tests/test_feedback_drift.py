"""Radiologist feedback (read findings, agreement, export for retraining) and drift checks, on SQLite and PostgreSQL."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import select

from cxr_triage.drift import Day, check
from cxr_triage.settings import Settings
from db import repo
from db.drift_repo import daily
from db.feedback_repo import (
    UnknownFinding,
    agreement,
    confirmed_by_instance,
    confirmed_instances,
    finding_history,
    record_finding,
)
from db.migrate import upgrade
from db.models import Instance, InstanceStatus, Prediction, Study
from db.session import session_scope
from db.worklist_models import WorklistEntry
from tests.conftest import CHEST_FILES, DICOM_DIR, ROOT, new_copies, received_instance
from workers.ensemble import EnsembleProvider
from workers.triage import triage_instance


def _day(cases: int, stat: int, ood: int = 0, hours_ago: int = 0) -> Day:
    return Day(datetime(2026, 12, 1, tzinfo=UTC) - timedelta(hours=hours_ago), cases, stat, ood, {}, {})


def test_drift_warns_only_outside_the_widened_baseline_range() -> None:
    baseline = [_day(100, stat) for stat in (10, 12, 14, 11, 13, 12, 10)]
    inside = check([_day(50, 8), *baseline], min_cases=20, tolerance=0.05)
    stat = next(c for c in inside if c.name == "stat")
    assert (stat.low, stat.high) == pytest.approx((0.05, 0.19)) and not stat.outside and stat.last == 0.16
    outside = next(c for c in check([_day(50, 15), *baseline], min_cases=20, tolerance=0.05) if c.name == "stat")
    assert outside.outside and "outside the range of the previous 7 days" in outside.message
    short = next(c for c in check([_day(50, 40), *baseline[:6]], min_cases=20, tolerance=0.05) if c.name == "stat")
    assert short.low is None and not short.outside, "fewer than 7 baseline days: no range, no warning"
    quiet = next(c for c in check([_day(5, 5), *baseline], min_cases=20, tolerance=0.05) if c.name == "stat")
    assert quiet.last is None and not quiet.outside, "a quiet day is not judged"
    thin = [_day(10, 9) for _ in range(7)]  # days below min_cases stay out of the baseline
    assert next(c for c in check([_day(50, 8), *thin], min_cases=20, tolerance=0.0) if c.name == "ood").low is None


def _settings(url: str, tmp_path: Path, tiny_registry) -> Settings:
    return Settings(home=tmp_path / "var", database_url=url, models_dir=tiny_registry.root, results_heatmap=False)


def _triaged_study(settings: Settings, provider: EnsembleProvider, tmp_path: Path, *, patient: str) -> str:
    """One study with one chest radiograph, received and triaged by the real worker path; returns the study UID."""
    (path,) = new_copies(DICOM_DIR / CHEST_FILES[0], tmp_path, 1, prefix=patient, PatientID=patient)
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    record = received_instance(
        str(ds.SOPInstanceUID), path, status=InstanceStatus.QUEUED, study_instance_uid=str(ds.StudyInstanceUID)
    )
    with session_scope(settings.effective_database_url) as session:
        instance, _ = repo.record_received(session, record)
        instance_id = instance.id
    assert triage_instance(settings, instance_id, provider).status == InstanceStatus.DONE
    return str(ds.StudyInstanceUID)


def test_findings_are_recorded_with_the_ai_label_superseded_on_edit_and_exported(
    db_url: str, tiny_registry, tmp_path: Path
) -> None:
    upgrade(db_url)
    settings = _settings(db_url, tmp_path, tiny_registry)
    provider = EnsembleProvider(tiny_registry, device="cpu", poll_s=0)
    uids = [_triaged_study(settings, provider, tmp_path, patient=f"P{n}") for n in range(3)]
    with session_scope(db_url) as session:
        studies = {s.study_instance_uid: s for s in session.scalars(select(Study)).all()}
        ai = {uid: session.scalar(select(WorklistEntry.label).where(WorklistEntry.study_id == studies[uid].id))
              for uid in uids}  # fmt: skip
        with pytest.raises(UnknownFinding):
            record_finding(session, studies[uids[0]], "Cancer", "dr.a")
        first = record_finding(session, studies[uids[0]], "Pneumonia", "dr.a")
        assert first.ai_label == ai[uids[0]] and first.ai_model_set == "test"
        record_finding(session, studies[uids[0]], str(ai[uids[0]]), "dr.b")  # edited: now agrees with the AI
        record_finding(session, studies[uids[1]], "Not assessable", "dr.a")
        record_finding(session, studies[uids[2]], "COVID-19" if ai[uids[2]] != "COVID-19" else "No finding", "dr.a")
    with session_scope(db_url) as session:
        history = finding_history(session, studies[uids[0]].id)
        assert [(h.finding, h.username, h.superseded_at is None) for h in history] == [
            ("Pneumonia", "dr.a", False),
            (ai[uids[0]], "dr.b", True),
        ], "an edit keeps the earlier finding, superseded, with its user"
        rows = agreement(session)
        assert sum(r.confirmed for r in rows) == 2, "Not assessable confirms nothing"
        assert sum(r.agreed for r in rows) == 1
        assert len(confirmed_by_instance(session)) == 2
        kept, left_out = confirmed_instances(session)
        assert len(kept) == 2 and left_out == {"finding Not assessable": 1}

    out = tmp_path / "export"
    env = {k: v for k, v in os.environ.items() if not k.startswith("CXR_")}
    env.update({"CXR_DATABASE_URL": db_url, "CXR_HOME": str(settings.home), "CXR_MODELS_DIR": str(tiny_registry.root)})
    result = subprocess.run([sys.executable, "-m", "service", "training", "export-feedback", "--out", str(out)],
                            env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "exported 2 confirmed instance(s)" in result.stdout
    with (out / "labels.csv").open() as fh:
        labels = list(csv.DictReader(fh))
    assert len(labels) == 2 and len(list((out / "dicom").rglob("*.dcm"))) == 2

    from training.adapters import from_dicom_folder

    frame, dropped = from_dicom_folder(out / "dicom", out / "labels.csv")
    assert len(frame) == 2 and not dropped, "the training package's hospital adapter reads the export"
    assert set(frame["patient_id"]) == {f"hospital:{p}" for p in frame["patient_id"].str.split(":").str[1]}
    assert "P0" not in " ".join(frame["patient_id"]), "patient IDs are hashed, never copied"


def test_daily_counts_live_predictions_by_24_hour_window(db_url: str, tiny_registry, tmp_path: Path) -> None:
    upgrade(db_url)
    settings = _settings(db_url, tmp_path, tiny_registry)
    provider = EnsembleProvider(tiny_registry, device="cpu", poll_s=0)
    for n in range(3):
        _triaged_study(settings, provider, tmp_path, patient=f"D{n}")
    now = datetime.now(UTC)
    with session_scope(db_url) as session:
        predictions = session.scalars(select(Prediction).order_by(Prediction.id)).all()
        predictions[0].created_at = now - timedelta(days=2, hours=1)  # in window 2
        labels = [p.label for p in predictions]
        assert all(i.status == InstanceStatus.DONE for i in session.scalars(select(Instance)))
    with session_scope(db_url) as session:
        days = daily(session, 3, now=now + timedelta(seconds=1))
    assert [d.cases for d in days] == [2, 0, 1, 0]
    assert sum(days[0].labels.values()) == 2 and days[2].labels == {labels[0]: 1}
    assert abs(sum(days[0].mean_scores.values()) - 1.0) < 1e-4, "mean class probabilities sum to one"
