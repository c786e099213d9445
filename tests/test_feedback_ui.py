"""Radiologist feedback on the worklist (issue 12): the read finding on the study page (keys 1-5, history, audit), the
shadow prediction for its viewers only, the AI's agreement with confirmed reads (API, page, metrics), the drift
warning in the header, and the way back: export-feedback, merge with the public data, retrain, gate, site-only report.
"""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import pydicom
import pytest
from fastapi.testclient import TestClient
from pydicom.uid import UID
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import WebDriverWait
from sqlalchemy import select
from typer.testing import CliRunner

from cxr_triage.labels import CLASS_LABELS, COVID19, NO_FINDING, PNEUMONIA
from cxr_triage.settings import Settings
from db import repo
from db.audit_models import AuditAction
from db.audit_repo import export_events
from db.feedback_models import READ_FINDINGS, StudyFinding
from db.feedback_repo import record_finding
from db.migrate import upgrade
from db.models import Instance, Prediction, PredictionRole, Study, as_utc, utcnow
from db.session import session_scope
from tests.conftest import DICOM_DIR, ROOT
from tests.test_worklist_api import (
    COVID,
    NORMAL,
    add_study,
    fast_password_hashes,  # noqa: F401 (autouse: scrypt at a test cost here too)
    make_settings,
)
from tests.test_worklist_browser import ARTIFACTS, browser, serving  # noqa: F401 (browser: the fixture)
from worklist.app import create_app
from worklist.auth import create_user, issue_token
from worklist.quality import QualityMonitor

PNEUMONIA_SCORES = {COVID19: 0.05, PNEUMONIA: 0.85, NO_FINDING: 0.10}
AI_SCORES = {COVID19: COVID, PNEUMONIA: PNEUMONIA_SCORES, NO_FINDING: NORMAL}
PASSWORD = "reading room 4"


def _settings(pg_url: str, tmp_path: Path, **update: object) -> Settings:
    upgrade(pg_url)
    return make_settings(pg_url, tmp_path / "var").model_copy(update={"drift_refresh_s": 0, **update})


def _user(settings: Settings, username: str) -> str:
    """A user and an API token for them."""
    with session_scope(settings.effective_database_url) as session:
        user = create_user(session, username, PASSWORD)
        return issue_token(session, user.id, kind="api")


def _client(settings: Settings, token: str | None) -> TestClient:
    return TestClient(create_app(settings), headers={"Authorization": f"Bearer {token}"} if token else {})


def _study_id(settings: Settings, uid: str) -> int:
    with session_scope(settings.effective_database_url) as session:
        return session.scalars(select(Study.id).where(Study.study_instance_uid == uid)).one()


def _metric(text: str, name: str, **labels: str) -> float | None:
    """The value of one sample in Prometheus text (labels in any order), or None."""
    for line in text.splitlines():
        if not line.startswith(name + ("{" if labels else " ")):
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', line.split("}")[0])) if labels else {}
        if found == labels:
            return float(line.rsplit(" ", 1)[1])
    return None


# --- the read finding through the API ------------------------------------------------------------------------------


def test_a_finding_is_recorded_with_the_ai_label_superseded_on_edit_audited_and_refused_when_unknown(
    pg_url: str, tmp_path: Path
) -> None:
    settings = _settings(pg_url, tmp_path)
    token = _user(settings, "dr.a")
    uid = add_study(settings, probabilities=COVID)
    with _client(settings, token) as client:
        assert client.get(f"/api/studies/{uid}").json()["finding"] is None
        first = client.put(f"/api/studies/{uid}/finding", json={"finding": PNEUMONIA})
        assert first.status_code == 200, first.text
        assert first.json()["finding"]["finding"] == PNEUMONIA and first.json()["finding"]["ai_label"] == COVID19
        edited = client.put(f"/api/studies/{uid}/finding", json={"finding": "Other abnormality"}).json()
        assert edited["finding"]["finding"] == "Other abnormality" and edited["finding"]["username"] == "dr.a"
        history = client.get(f"/api/studies/{uid}").json()["finding_history"]
        assert [(h["finding"], h["superseded_at"] is None) for h in history] == [
            (PNEUMONIA, False),
            ("Other abnormality", True),
        ], "an edit supersedes the earlier finding, which stays in the history"
        assert client.put(f"/api/studies/{uid}/finding", json={"finding": "Cancer"}).status_code == 422
        assert client.put("/api/studies/9.9.9/finding", json={"finding": PNEUMONIA}).status_code == 404
        page = client.get(f"/studies/{uid}").text
        assert "Other abnormality by dr.a" in page and "(superseded)" in page
        assert all(f"<kbd>{n}</kbd> {f}" in page for n, f in enumerate(READ_FINDINGS, start=1))
    with _client(settings, None) as anonymous:
        assert anonymous.put(f"/api/studies/{uid}/finding", json={"finding": NO_FINDING}).status_code == 401
    changes = [
        (e.username, e.study_instance_uid, e.details, e.http_status)
        for e in export_events(settings.effective_database_url)
        if e.action == AuditAction.SET_FINDING
    ]
    assert changes == [
        ("dr.a", uid, f"finding={PNEUMONIA}", 200),
        ("dr.a", uid, "finding=Other abnormality", 200),
        ("dr.a", uid, None, 422),
        ("dr.a", "9.9.9", None, 404),
    ], "each recording is audited with its finding; the refusals too, without one"
    with session_scope(settings.effective_database_url) as session:
        assert len(session.scalars(select(StudyFinding)).all()) == 2, "the refused requests stored nothing"


def test_the_shadow_prediction_is_shown_marked_to_its_viewers_only_and_never_in_the_list(
    pg_url: str, tmp_path: Path
) -> None:
    settings = _settings(pg_url, tmp_path, worklist_shadow_users=["admin"])
    viewer, reader = _user(settings, "admin"), _user(settings, "reader")
    uid = add_study(settings, probabilities=NORMAL)
    with session_scope(settings.effective_database_url) as session:
        instance = session.scalars(select(Instance).join(Study).where(Study.study_instance_uid == uid)).one()
        shadow = repo.PredictionRecord(
            model_set="candidate", model_versions=["c1"], label=COVID19, probabilities=COVID,
            member_probabilities={"c1": COVID}, queue_wait_ms=None, decode_ms=1.0, inference_ms=1.0,
            not_for_clinical_use=True, role=PredictionRole.SHADOW,
        )  # fmt: skip
        repo.save_prediction(session, instance, shadow)
    with _client(settings, viewer) as client:
        detail = client.get(f"/api/studies/{uid}").json()
        seen = detail["instances"][0]["shadow"]
        assert seen["note"] == "shadow (not used)" and seen["label"] == COVID19 and seen["model_set"] == "candidate"
        assert detail["priority"] == "routine" and detail["label"] == NO_FINDING, "the shadow set decides nothing"
        assert "shadow (not used)" in client.get(f"/studies/{uid}").text
        listed = client.get("/api/worklist").json()["items"]
        assert [i["label"] for i in listed] == [NO_FINDING] and "shadow" not in json.dumps(listed)
        assert "candidate" not in client.get("/").text
    with _client(settings, reader) as client:
        assert client.get(f"/api/studies/{uid}").json()["instances"][0]["shadow"] is None
        assert "shadow (not used)" not in client.get(f"/studies/{uid}").text
    with _client(settings.model_copy(update={"worklist_shadow_users": []}), viewer) as client:
        assert client.get(f"/api/studies/{uid}").json()["instances"][0]["shadow"] is None, "nobody by default"


# --- agreement with confirmed reads --------------------------------------------------------------------------------


def test_agreement_per_label_and_week_matches_the_seeded_reads_in_the_api_the_page_and_the_metrics(
    pg_url: str, tmp_path: Path
) -> None:
    settings = _settings(pg_url, tmp_path)
    token = _user(settings, "dr.a")
    now = utcnow()
    # (AI label, findings recorded in order, days ago): the last finding is the current one
    seeded = [
        (COVID19, [COVID19], 0),
        (COVID19, [PNEUMONIA], 0),
        (NO_FINDING, [PNEUMONIA, NO_FINDING], 0),  # edited: the superseded read does not count
        (NO_FINDING, ["Not assessable"], 0),  # outside the model's classes: counted as a finding, not in agreement
        (PNEUMONIA, [PNEUMONIA], 14),
        (PNEUMONIA, [COVID19], 14),
        (PNEUMONIA, [NO_FINDING], 14),
        (COVID19, [COVID19], 120),  # older than 12 weeks: not in the report
    ]
    with _client(settings, token) as client:
        for ai_label, findings, days in seeded:
            uid = add_study(settings, probabilities=AI_SCORES[ai_label])
            for finding in findings:
                assert client.put(f"/api/studies/{uid}/finding", json={"finding": finding}).status_code == 200
            with session_scope(settings.effective_database_url) as session:
                for row in session.scalars(
                    select(StudyFinding).where(StudyFinding.study_id == _study_id(settings, uid))
                ):
                    row.created_at = now - timedelta(days=days, minutes=5)
        report = client.get("/api/agreement").json()
        page = client.get("/agreement").text
        header = client.get("/").text
        metrics = client.get("/metrics").text

    def week(days: int) -> str:
        year, number, _ = as_utc(now - timedelta(days=days, minutes=5)).isocalendar()
        return f"{year}-W{number:02d}"

    cells = {(c["ai_label"], c["week"]): (c["agreed"], c["confirmed"], c["rate"]) for c in report["cells"]}
    assert cells == {
        (COVID19, week(0)): (1, 2, 0.5),
        (NO_FINDING, week(0)): (1, 1, 1.0),
        (PNEUMONIA, week(14)): (1, 3, pytest.approx(1 / 3)),
    }
    totals = {t["ai_label"]: (t["agreed"], t["confirmed"]) for t in report["per_label"]}
    assert totals == {COVID19: (1, 2), PNEUMONIA: (1, 3), NO_FINDING: (1, 1)}
    assert (report["overall"]["agreed"], report["overall"]["confirmed"]) == (3, 6)
    assert report["findings"] == {COVID19: 3, PNEUMONIA: 2, NO_FINDING: 2, "Other abnormality": 0, "Not assessable": 1}
    assert "1/2 (50%)" in page and "1/3 (33%)" in page and "3/6 (50%)" in page
    assert "<strong>50%</strong> of 6 confirmed reads" in header, "the worklist header shows the agreement"
    assert _metric(metrics, "cxr_ai_agreement_ratio", label=COVID19, week=week(0)) == 0.5
    assert _metric(metrics, "cxr_ai_agreement_reads", label=PNEUMONIA, week=week(14)) == 3.0
    assert _metric(metrics, "cxr_ai_agreement_ratio", label=NO_FINDING, week=week(0)) == 1.0
    assert _metric(metrics, "cxr_confirmed_reads", finding="Not assessable") == 1.0
    assert _metric(metrics, "cxr_confirmed_reads", finding=COVID19) == 3.0, "all time, not only the 12 weeks"


# --- drift -----------------------------------------------------------------------------------------------------------


def _seed_drift(settings: Settings) -> None:
    """Seven baseline days of two routine cases each, then a last day of two STAT COVID-19 cases."""
    now = utcnow()
    for days_ago in range(1, 8):
        for _ in range(2):
            uid = add_study(settings, probabilities=NORMAL)
            _age_prediction(settings, uid, now - timedelta(days=days_ago, hours=1))
    for _ in range(2):
        add_study(settings, probabilities=COVID)


def _age_prediction(settings: Settings, uid: str, at: datetime) -> None:
    with session_scope(settings.effective_database_url) as session:
        prediction = session.scalars(
            select(Prediction).join(Instance).join(Study).where(Study.study_instance_uid == uid)
        ).one()
        prediction.created_at = at


def test_a_last_day_outside_the_range_warns_in_the_header_the_api_and_the_metrics(pg_url: str, tmp_path: Path) -> None:
    settings = _settings(pg_url, tmp_path, drift_baseline_days=7, drift_min_cases=2, drift_tolerance=0.05)
    token = _user(settings, "dr.a")
    with _client(settings, token) as client:
        assert client.get("/api/worklist").json()["warnings"] == [], "no history: no warning"
        _seed_drift(settings)
        warnings = client.get("/api/worklist").json()["warnings"]
        drift = client.get("/api/drift").json()
        header = client.get("/").text
        metrics = client.get("/metrics").text
    assert len(warnings) == 1 and warnings[0].startswith("Drift: STAT rate 100% in the last day (2 cases), outside")
    checks = {c["check"]: c for c in drift["checks"]}
    assert checks["stat"]["outside"] and checks["stat"]["high"] == pytest.approx(0.05) and checks["stat"]["last"] == 1
    assert not checks["ood"]["outside"] and checks["stat"]["baseline_days"] == 7
    assert drift["cases_24h"] == 2 and drift["label_share_24h"] == {COVID19: 1.0, PNEUMONIA: 0.0, NO_FINDING: 0.0}
    assert drift["mean_probability_24h"][COVID19] == pytest.approx(0.91)
    assert 'id="drift-warning"' in header and warnings[0] in header and 'role="alert" hidden' not in header
    assert _metric(metrics, "cxr_drift_warning", check="stat") == 1.0
    assert _metric(metrics, "cxr_drift_warning", check="ood") == 0.0
    assert _metric(metrics, "cxr_stat_rate_24h") == 1.0 and _metric(metrics, "cxr_ood_rate_24h") == 0.0
    assert _metric(metrics, "cxr_predictions_24h") == 2.0
    assert _metric(metrics, "cxr_label_share_24h", label=COVID19) == 1.0
    assert _metric(metrics, "cxr_mean_probability_24h", label=COVID19) == pytest.approx(0.91)
    assert _metric(metrics, "cxr_drift_range_high", check="stat") == pytest.approx(0.05)


def test_the_quality_reading_is_reused_until_the_refresh_interval_passes(pg_url: str, tmp_path: Path) -> None:
    settings = _settings(pg_url, tmp_path, drift_refresh_s=300)
    now = [0.0]
    monitor = QualityMonitor(settings, clock=lambda: now[0])
    assert monitor.current().last_day is not None and monitor.current().last_day.cases == 0  # type: ignore[union-attr]
    add_study(settings, probabilities=COVID)
    assert monitor.current().last_day.cases == 0, "within CXR_DRIFT_REFRESH_S: no database read"  # type: ignore[union-attr]
    now[0] += 301
    assert monitor.current().last_day.cases == 1  # type: ignore[union-attr]


# --- in the browser, and back into training ------------------------------------------------------------------------


def _hospital_dicom(out: Path, *, sop: str, study: str, patient: str, seed: int | None) -> None:
    """A chest radiograph as the PACS sent it: the real SIIM film (seed None), else a small 8-bit image with a
    distinct low-frequency pattern (so that deduplication keeps it), with the instance's UIDs."""
    if seed is None:
        ds = pydicom.dcmread(DICOM_DIR / "cr_chest_siim_jpeg_baseline_8bit.dcm")
    else:
        ds = pydicom.dcmread(DICOM_DIR / "dx_chest_nih_cxr14_implicit_le_label-no-finding.dcm")
        rng = np.random.default_rng(seed)
        pattern = np.kron(rng.random((8, 8)), np.ones((16, 16))) * 0.7 + np.linspace(0, 0.3, 128)[None, :]
        ds.Rows = ds.Columns = 128
        ds.PixelData = (pattern * 255).astype(np.uint8).tobytes()
        ds.ViewPosition = "PA"
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = UID(sop)
    ds.StudyInstanceUID, ds.PatientID = study, patient
    out.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(out)


def _hospital_studies(settings: Settings, folder: Path) -> dict[str, str]:
    """Four triaged studies per class, each with its DICOM file in the spool; returns study UID -> true class."""
    truth: dict[str, str] = {}
    for n, label in enumerate(CLASS_LABELS * 4):
        uid = add_study(settings, probabilities=AI_SCORES[label], patient_name=f"Site^Patient{n}")
        with session_scope(settings.effective_database_url) as session:
            instance = session.scalars(select(Instance).join(Study).where(Study.study_instance_uid == uid)).one()
            path = folder / f"{instance.sop_instance_uid}.dcm"
            seed = None if n == 1 else n  # study 1 (AI: Pneumonia) is the real film, read in the browser
            _hospital_dicom(path, sop=instance.sop_instance_uid, study=uid, patient=f"SITE-{n}", seed=seed)
            instance.path = str(path)
        truth[uid] = label
    return truth


def _sign_in(driver: WebDriver, base: str, path: str) -> None:
    driver.get(base + path)
    driver.find_element(By.ID, "username").send_keys("radiologist")
    driver.find_element(By.ID, "password").send_keys(PASSWORD, Keys.ENTER)


def _train(args: list[str]) -> str:
    from training.cli import app as training_app

    result = CliRunner().invoke(training_app, args)
    failed = result.exception is not None and not isinstance(result.exception, SystemExit)
    assert not failed and result.exit_code in (0, 1), result.output + repr(result.exception)  # gate: 1 = rejected
    return result.output


@pytest.mark.timeout(600)
def test_a_finding_recorded_with_the_keyboard_is_exported_retrained_and_gated_with_site_only_metrics(
    pg_url: str,
    tmp_path: Path,
    browser: WebDriver,  # noqa: F811 (the fixture)
) -> None:
    settings = _settings(pg_url, tmp_path)
    url = settings.effective_database_url
    with session_scope(url) as session:
        create_user(session, "radiologist", PASSWORD)
    truth = _hospital_studies(settings, tmp_path / "spool")
    browser_uid = list(truth)[1]
    with session_scope(url) as session:  # the other studies were read before
        for uid, label in truth.items():
            if uid != browser_uid:
                study = session.scalars(select(Study).where(Study.study_instance_uid == uid)).one()
                record_finding(session, study, label, "dr.b")
    wait = WebDriverWait(browser, 15)

    with serving(settings) as base:
        _sign_in(browser, base, f"/studies/{browser_uid}")
        wait.until(lambda d: d.find_element(By.ID, "finding-current").text == "none recorded")
        ActionChains(browser).send_keys("1").perform()  # COVID-19 first ...
        wait.until(lambda d: d.find_element(By.ID, "finding-current").text == COVID19)
        ActionChains(browser).send_keys("2").perform()  # ... then corrected to Pneumonia
        wait.until(lambda d: d.find_element(By.ID, "finding-current").text == PNEUMONIA)
        items = [li.text for li in browser.find_elements(By.CSS_SELECTOR, "#finding-history li")]
        assert len(items) == 2 and items[0].startswith("Pneumonia by radiologist") and "(superseded)" in items[1]
        pressed = browser.find_elements(By.CSS_SELECTOR, '.finding-choice[aria-pressed="true"]')
        assert [b.get_attribute("data-finding") for b in pressed] == [PNEUMONIA]
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        browser.save_screenshot(str(ARTIFACTS / "study-finding.png"))
        browser.refresh()  # the page shows it from the server too
        wait.until(lambda d: d.find_element(By.ID, "finding-current").text == PNEUMONIA)
        assert "radiologist" in browser.find_element(By.ID, "finding-meta").text
        browser.get(base + "/agreement")
        assert "12/12 (100%)" in browser.find_element(By.ID, "agreement-overall").text
        browser.save_screenshot(str(ARTIFACTS / "agreement.png"))

    export = tmp_path / "export"
    env = {k: v for k, v in os.environ.items() if not k.startswith("CXR_")}
    env.update({"CXR_DATABASE_URL": url, "CXR_HOME": str(settings.home)})
    result = subprocess.run([sys.executable, "-m", "service", "training", "export-feedback", "--out", str(export)],
                            env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "exported 12 confirmed instance(s)" in result.stdout
    with (export / "labels.csv").open() as fh:
        labels = {row["sop_instance_uid"]: row["label"] for row in csv.DictReader(fh)}
    with session_scope(url) as session:
        browser_sop = session.scalars(
            select(Instance.sop_instance_uid).join(Study).where(Study.study_instance_uid == browser_uid)
        ).one()
    assert labels[browser_sop] == PNEUMONIA, "the finding recorded in the browser is in the export"

    work, models = tmp_path / "work", tmp_path / "models"
    merged, split = work / "merged.csv", work / "split.csv"
    public = ROOT / "tests" / "data" / "cxr" / "manifest.csv"
    output = _train(["merge", "--out", str(merged), "--manifest", str(public), "--dicom-folder",
                     str(export / "dicom"), "--dicom-labels", str(export / "labels.csv")])  # fmt: skip
    assert "dicom: 12 images kept" in output and "manifest: 4 images kept" in output
    _train(["prepare", "--manifest", str(merged), "--out", str(split), "--no-lock",
            "--train", "0.5", "--valid", "0.2", "--test", "0.3"])  # fmt: skip
    output = _train(["fit", "--split-csv", str(split), "--arch", "mobilenetv2_100", "--epochs", "1", "--size", "32",
                     "--batch", "4", "--threads", "2", "--lr", "1e-3", "--out", str(models),
                     "--version", "site-retrain"])  # fmt: skip
    _train(["ensemble", "site-candidate", "site-retrain", "--out", str(models)])
    output = _train(["gate", "site-candidate", "--split-csv", str(split), "--out", str(models),
                     "--bootstrap", "100", "--threads", "2"])  # fmt: skip
    assert re.search(r"^(ACCEPTED|REJECTED): site-candidate$", output, flags=re.M), output
    decision = json.loads((models / "gate" / "decisions.jsonl").read_text().splitlines()[-1])
    assert decision["candidate"] == "site-candidate" and decision["reasons"]
    _train(["evaluate", "--ensemble", "site-candidate", "--split-csv", str(split), "--out", str(models),
            "--bootstrap", "20", "--threads", "2"])  # fmt: skip
    report = (models / "reports" / "site-candidate-test" / "report.md").read_text()
    assert "| site only (the hospital's confirmed reads) | 3 |" in report, report
    assert "| public sources only | 2 |" in report and "| source = nih_cxr14 | 2 |" in report
    metrics = json.loads((models / "reports" / "site-candidate-test" / "metrics.json").read_text())
    assert metrics["site_vs_public"]["site"]["n_images"] == 3 and metrics["site_vs_public"]["public"]["n_images"] == 2


@pytest.mark.timeout(120)
def test_the_drift_warning_is_in_the_header_of_the_worklist_page(
    pg_url: str,
    tmp_path: Path,
    browser: WebDriver,  # noqa: F811 (the fixture)
) -> None:
    settings = _settings(pg_url, tmp_path, drift_baseline_days=7, drift_min_cases=2)
    with session_scope(settings.effective_database_url) as session:
        create_user(session, "radiologist", PASSWORD)
    _seed_drift(settings)
    with serving(settings) as base:
        _sign_in(browser, base, "/")
        warning = WebDriverWait(browser, 15).until(lambda d: d.find_element(By.ID, "drift-warning"))
        assert warning.is_displayed() and "STAT rate 100% in the last day" in warning.text
        assert "outside the range of the previous 7 days" in warning.text
        WebDriverWait(browser, 15).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#rows tr")) == 16)
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        browser.save_screenshot(str(ARTIFACTS / "drift-warning.png"))
