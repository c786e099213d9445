"""Worklist API on the real PostgreSQL: ordering, filters, never-lower, indeterminate, read state, authentication."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select
from typer.testing import CliRunner

from cxr_triage.labels import COVID19, DEMO_DISCLAIMER, NO_FINDING, PNEUMONIA
from cxr_triage.priority import Rules, evaluate
from cxr_triage.settings import Settings
from db import repo
from db.migrate import upgrade
from db.models import InstanceStatus, Study, utcnow
from db.session import session_scope
from db.worklist_models import WorklistEntry
from db.worklist_repo import assign_priority as assign
from worklist.app import create_app
from worklist.auth import create_user, issue_token

PATIENT = "Doe^Jane"
_uids = itertools.count(1)
NORMAL = {COVID19: 0.02, PNEUMONIA: 0.03, NO_FINDING: 0.95}
COVID = {COVID19: 0.91, PNEUMONIA: 0.05, NO_FINDING: 0.04}
RULES = Rules(stat_threshold=0.5, routine_threshold=0.8, indeterminate_margin=0.05, disagreement_threshold=0.5)
# Long enough for the password policy (CXR_PASSWORD_MIN_LENGTH, 12) of `users create`.
CLI_PASSWORD = "s3cret passphrase"
# scrypt at N=2^14 here (the default, 2^17, takes ~0.7 s per hash): tests/test_worklist_hardening.py checks the
# default cost itself.
FAST_SCRYPT_N = 2**14


@pytest.fixture(autouse=True)
def fast_password_hashes(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    from cxr_triage import settings as settings_module

    monkeypatch.setenv("CXR_PASSWORD_SCRYPT_N", str(FAST_SCRYPT_N))
    settings_module.get_settings.cache_clear()
    yield
    settings_module.get_settings.cache_clear()


def make_settings(url: str, home: Path) -> Settings:
    return Settings(home=home, database_url=url, worklist_poll_s=0.5)


def add_study(
    settings: Settings,
    *,
    probabilities: dict[str, float] | None = None,
    members: dict[str, dict[str, float]] | None = None,
    requested_priority: str | None = None,
    status: InstanceStatus = InstanceStatus.DONE,
    patient_name: str = PATIENT,
    age_s: float = 0.0,
    study_uid: str | None = None,
) -> str:
    """A study with one instance; with `probabilities`, a prediction and the worker's priority assignment."""
    n = next(_uids)
    study_uid = study_uid or f"1.2.826.0.1.{n}"
    url = settings.effective_database_url
    with session_scope(url) as session:
        instance, _ = repo.record_received(
            session,
            repo.ReceivedInstance(
                sop_instance_uid=f"{study_uid}.1.{n}",
                sop_class_uid="1.2.840.10008.5.1.4.1.1.1",
                study_instance_uid=study_uid,
                series_instance_uid=f"{study_uid}.1",
                transfer_syntax_uid="1.2.840.10008.1.2.1",
                calling_aet="MODALITY",
                modality="CR",
                body_part="CHEST",
                view_position="PA",
                path=f"/nonexistent/{n}.dcm",
                size_bytes=1,
                sha256="0" * 64,
                status=InstanceStatus.QUEUED if probabilities or status != InstanceStatus.DONE else status,
                status_reason=None,
                patient_name=patient_name,
                patient_id=f"PID-{n}",
                accession_number=f"ACC{n}",
                study_description="XR CHEST PA",
                requested_priority=requested_priority,
            ),
        )
        study = session.scalars(select(Study).where(Study.study_instance_uid == study_uid)).one()
        study.created_at = instance.received_at = utcnow() - timedelta(seconds=age_s)
        if probabilities is not None:
            label = max(probabilities, key=lambda k: probabilities[k])
            record = repo.PredictionRecord(
                model_set="test",
                model_versions=list(members or {"m1": probabilities}),
                label=label,
                probabilities=probabilities,
                member_probabilities=members or {"m1": probabilities},
                queue_wait_ms=1.0,
                decode_ms=1.0,
                inference_ms=1.0,
                not_for_clinical_use=True,
            )
            repo.save_prediction(session, instance, record)
            assign(session, instance.id, settings)
        elif status != InstanceStatus.QUEUED:
            repo.set_status(session, instance, status, "test")
    return study_uid


@pytest.fixture
def settings(pg_url: str, tmp_path: Path) -> Settings:
    upgrade(pg_url)
    return make_settings(pg_url, tmp_path / "var")


@pytest.fixture
def token(settings: Settings) -> str:
    with session_scope(settings.effective_database_url) as session:
        user = create_user(session, "reader", "correct horse")
        return issue_token(session, user.id, kind="api")


@pytest.fixture
def client(settings: Settings, token: str) -> Iterator[TestClient]:
    with TestClient(create_app(settings), headers={"Authorization": f"Bearer {token}"}) as c:
        yield c


def uids(client: TestClient, **params: str | int | bool) -> list[str]:
    response = client.get("/api/worklist", params=params)
    assert response.status_code == 200, response.text
    return [item["study_instance_uid"] for item in response.json()["items"]]


def test_worklist_is_ordered_by_priority_then_longest_waiting(settings: Settings, client: TestClient) -> None:
    routine_old = add_study(settings, probabilities=NORMAL, age_s=600)
    stat_new = add_study(settings, probabilities=COVID, age_s=10)
    stat_old = add_study(settings, probabilities={COVID19: 0.1, PNEUMONIA: 0.8, NO_FINDING: 0.1}, age_s=300)
    unsure = add_study(settings, probabilities={COVID19: 0.3, PNEUMONIA: 0.3, NO_FINDING: 0.4}, age_s=100)
    pending = add_study(settings, status=InstanceStatus.QUEUED, age_s=50)
    assert uids(client) == [stat_old, stat_new, unsure, routine_old, pending]
    first = client.get("/api/worklist").json()["items"][0]
    assert first["priority"] == "stat" and first["rule"] == "stat-pneumonia" and first["patient_name"] == PATIENT
    assert first["label"] == PNEUMONIA and first["probabilities"][PNEUMONIA] == 0.8
    assert first["waiting_s"] >= 300


def test_filters_and_pagination(settings: Settings, client: TestClient) -> None:
    stat = add_study(settings, probabilities=COVID, age_s=3600)
    routine = add_study(settings, probabilities=NORMAL, age_s=60)
    failed = add_study(settings, status=InstanceStatus.FAILED, age_s=30)
    assert uids(client, priority="stat") == [stat]
    assert uids(client, label=NO_FINDING) == [routine]
    assert uids(client, status="failed") == [failed]
    assert uids(client, status="done") == [stat, routine]
    since = (utcnow() - timedelta(seconds=600)).isoformat()
    assert uids(client, since=since) == [failed, routine]
    assert uids(client, until=since) == [stat]
    page = client.get("/api/worklist", params={"limit": 1, "offset": 1}).json()
    assert page["total"] == 3 and [i["study_instance_uid"] for i in page["items"]] == [failed]
    assert client.get("/api/worklist", params={"priority": "urgent"}).status_code == 422
    assert client.get("/api/worklist", params={"limit": 0}).status_code == 422


def test_failed_triage_is_flagged_indeterminate_not_hidden(settings: Settings, client: TestClient) -> None:
    routine = add_study(settings, probabilities=NORMAL, age_s=100)
    failed = add_study(settings, status=InstanceStatus.FAILED, age_s=10)
    items = client.get("/api/worklist").json()["items"]
    assert [i["study_instance_uid"] for i in items] == [failed, routine]
    assert items[0]["priority"] == "indeterminate" and items[0]["rule"] == "indeterminate-triage-failed"


@pytest.mark.parametrize(
    ("requested", "expected"), [("STAT", "stat"), ("HIGH", "high"), ("MEDIUM", "medium"), (" low ", "routine")]
)
def test_ai_never_lowers_the_dicom_priority(
    settings: Settings, client: TestClient, requested: str, expected: str
) -> None:
    uid = add_study(settings, probabilities=NORMAL, requested_priority=requested)
    study = client.get(f"/api/studies/{uid}").json()
    assert study["priority"] == expected and study["ai_priority"] == "routine"
    assert study["priority_source"] == ("ai" if expected == "routine" else "dicom")
    assert study["requested_priority"] == requested
    assert study["instances"][0]["prediction"]["rule"] == "routine-confident-no-finding"


def test_dicom_priority_ranks_a_study_before_its_result(settings: Settings, client: TestClient) -> None:
    routine = add_study(settings, probabilities=NORMAL, age_s=100)
    pending_stat = add_study(settings, status=InstanceStatus.QUEUED, requested_priority="STAT", age_s=10)
    assert uids(client) == [pending_stat, routine]


def test_ai_never_lowers_a_user_priority_and_a_user_can_clear_theirs(settings: Settings, client: TestClient) -> None:
    uid = add_study(settings, probabilities=NORMAL)
    response = client.put(f"/api/studies/{uid}/priority", json={"priority": "high"})
    assert response.status_code == 200, response.text
    assert response.json()["priority"] == "high" and response.json()["priority_source"] == "user"
    # a second instance of the same study arrives, confidently normal: the user's priority stays
    add_study(settings, probabilities=NORMAL, study_uid=uid)
    study = client.get(f"/api/studies/{uid}").json()
    assert study["priority"] == "high" and study["user_priority"] == "high" and len(study["instances"]) == 2
    # a more urgent AI result raises it above the user's
    add_study(settings, probabilities=COVID, study_uid=uid)
    assert client.get(f"/api/studies/{uid}").json()["priority"] == "stat"
    cleared = client.put(f"/api/studies/{uid}/priority", json={"priority": None}).json()
    assert cleared["priority"] == "stat" and cleared["user_priority"] is None


def test_disagreement_and_near_threshold_are_indeterminate_never_routine() -> None:
    confident = {COVID19: 0.02, PNEUMONIA: 0.03, NO_FINDING: 0.95}
    doubter = {COVID19: 0.7, PNEUMONIA: 0.1, NO_FINDING: 0.2}
    mean = {k: (confident[k] + doubter[k]) / 2 for k in confident}
    mean[COVID19] = 0.36  # below the STAT threshold on average, members 0.68 apart
    assert evaluate(mean, {"a": confident, "b": doubter}, RULES).rule == "indeterminate-disagreement"
    near = {COVID19: 0.47, PNEUMONIA: 0.03, NO_FINDING: 0.5}
    assert evaluate(near, {"a": near}, RULES).rule == "indeterminate-near-threshold"
    near_normal = {COVID19: 0.1, PNEUMONIA: 0.08, NO_FINDING: 0.82}
    assert evaluate(near_normal, {"a": near_normal}, RULES).rule == "indeterminate-near-threshold"
    unsure = {COVID19: 0.3, PNEUMONIA: 0.3, NO_FINDING: 0.4}
    assert evaluate(unsure, {"a": unsure}, RULES).priority == "indeterminate"
    assert evaluate(NORMAL, {"a": NORMAL, "b": NORMAL}, RULES).priority == "routine"
    # STAT is never lowered by doubt: a high mean probability stays STAT even when members disagree
    assert evaluate(COVID, {"a": COVID, "b": NORMAL}, RULES).priority == "stat"
    with pytest.raises(ValueError, match="stat_threshold"):
        Rules(stat_threshold=0, routine_threshold=0.8, indeterminate_margin=0.05, disagreement_threshold=0.5)


def test_indeterminate_result_is_stored_and_listed_above_routine(settings: Settings, client: TestClient) -> None:
    routine = add_study(settings, probabilities=NORMAL, age_s=100)
    members = {
        "a": {COVID19: 0.05, PNEUMONIA: 0.05, NO_FINDING: 0.9},
        "b": {COVID19: 0.75, PNEUMONIA: 0.05, NO_FINDING: 0.2},
    }
    mean = {COVID19: 0.4, PNEUMONIA: 0.05, NO_FINDING: 0.55}
    unsure = add_study(settings, probabilities=mean, members=members, age_s=10)
    items = client.get("/api/worklist").json()["items"]
    assert [i["study_instance_uid"] for i in items] == [unsure, routine]
    assert items[0]["priority"] == "indeterminate" and items[0]["rule"] == "indeterminate-disagreement"
    prediction = client.get(f"/api/studies/{unsure}").json()["instances"][0]["prediction"]
    assert prediction["member_probabilities"] == members and "members differ on COVID-19" in prediction["rule_detail"]


def test_read_status_round_trip_and_read_filter(settings: Settings, client: TestClient) -> None:
    first = add_study(settings, probabilities=COVID, age_s=20)
    second = add_study(settings, probabilities=NORMAL, age_s=10)
    read = client.put(f"/api/studies/{first}/read", json={"read": True}).json()
    assert read["read"] is True and read["read_by"] == "reader" and read["read_at"] is not None
    assert uids(client, read=False) == [second]
    assert uids(client, read=True) == [first]
    assert uids(client) == [first, second], "a read study stays on the list, in its place"
    unread = client.put(f"/api/studies/{first}/read", json={"read": False}).json()
    assert unread["read"] is False and unread["read_by"] is None
    assert client.put("/api/studies/9.9.9/read", json={"read": True}).status_code == 404


def test_a_read_study_that_becomes_more_urgent_comes_back_unread(settings: Settings, client: TestClient) -> None:
    uid = add_study(settings, probabilities=NORMAL)
    client.put(f"/api/studies/{uid}/read", json={"read": True})
    add_study(settings, probabilities=COVID, study_uid=uid)
    study = client.get(f"/api/studies/{uid}").json()
    assert study["priority"] == "stat" and study["read"] is False


def test_study_detail_has_scores_versions_rule_and_nullable_links(settings: Settings, client: TestClient) -> None:
    uid = add_study(settings, probabilities=COVID, members={"effnet-b4": COVID, "resnet101": COVID})
    study = client.get(f"/api/studies/{uid}").json()
    prediction = study["instances"][0]["prediction"]
    assert prediction["model_versions"] == ["effnet-b4", "resnet101"] and prediction["model_set"] == "test"
    assert set(prediction["member_probabilities"]) == {"effnet-b4", "resnet101"}
    assert prediction["rule"] == "stat-covid-19" and prediction["rule_detail"] == "COVID-19 0.91 >= 0.50"
    assert prediction["sr_url"] is None and prediction["heatmap_url"] is None
    assert prediction["not_for_clinical_use"] is True and prediction["turnaround_s"] >= 0
    assert client.get("/api/worklist").json()["disclaimer"] == DEMO_DISCLAIMER
    assert client.get("/api/studies/1.2.3.999").status_code == 404
    assert client.get("/api/studies/not-a-uid").status_code == 422


def test_anonymous_requests_get_401_and_no_patient_data(settings: Settings) -> None:
    uid = add_study(settings, probabilities=COVID)
    with TestClient(create_app(settings)) as anonymous:
        responses = [
            anonymous.get("/api/worklist"),
            anonymous.get(f"/api/studies/{uid}"),
            anonymous.put(f"/api/studies/{uid}/read", json={"read": True}),
            anonymous.put(f"/api/studies/{uid}/priority", json={"priority": "low"}),
            anonymous.get("/api/me"),
            anonymous.get("/"),
            anonymous.get(f"/studies/{uid}"),
            anonymous.get("/api/worklist", headers={"Authorization": "Bearer not-a-token"}),
        ]
        anonymous.cookies.set("cxr_session", "forged")
        responses.append(anonymous.get("/api/worklist"))
        for response in responses:
            assert response.status_code == 401, (response.request.url, response.status_code)
            assert PATIENT not in response.text and "Doe" not in response.text and "PID-" not in response.text
            if response.request.url.path.startswith("/api/"):
                assert response.json() == {"detail": "authentication required"}
        assert anonymous.get("/healthz").status_code == 200
    with session_scope(settings.effective_database_url) as session:
        entry = session.scalars(select(WorklistEntry)).one()
        assert entry.read_at is None and entry.user_priority is None, "anonymous writes changed nothing"


def test_login_page_session_and_logout(settings: Settings, token: str) -> None:
    add_study(settings, probabilities=COVID)
    with TestClient(create_app(settings)) as browser:
        wrong = browser.post("/login", data={"username": "reader", "password": "nope", "next": "/"})
        assert wrong.status_code == 401 and PATIENT not in wrong.text
        ok = browser.post("/login", data={"username": "reader", "password": "correct horse", "next": "//evil.example/"})
        assert ok.status_code == 200 and ok.url.path == "/", "an off-site next is replaced by /"
        assert "Doe, Jane" in ok.text and "STAT" in ok.text and DEMO_DISCLAIMER in ok.text
        cookie = browser.cookies.get("cxr_session")
        assert cookie and browser.get("/api/me").json() == {"username": "reader"}
        browser.post("/logout")
        browser.cookies.set("cxr_session", cookie)
        assert browser.get("/api/worklist").status_code == 401, "the session was revoked, not only forgotten"
    with TestClient(create_app(settings)) as api_client:
        issued = api_client.post("/api/login", json={"username": "reader", "password": "correct horse"})
        assert issued.status_code == 200
        bearer = {"Authorization": f"Bearer {issued.json()['token']}"}
        assert api_client.get("/api/worklist", headers=bearer).status_code == 200
        assert api_client.post("/api/login", json={"username": "reader", "password": "x"}).status_code == 401


def test_users_cli_creates_a_user_who_can_sign_in(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    from cxr_triage import settings as settings_module
    from service.cli import app

    monkeypatch.setenv("CXR_DATABASE_URL", settings.effective_database_url)
    monkeypatch.setenv("CXR_HOME", str(settings.home))
    settings_module.get_settings.cache_clear()
    try:
        runner = CliRunner()
        created = runner.invoke(app, ["users", "create", "dr.who", "--password-stdin"], input=f"{CLI_PASSWORD}\n")
        assert created.exit_code == 0, created.output
        assert runner.invoke(app, ["users", "create", "dr.who", "--password-stdin"], input="x\n").exit_code != 0
        issued = runner.invoke(app, ["users", "token", "dr.who"])
        assert issued.exit_code == 0, issued.output
        with TestClient(create_app(settings)) as c:
            me = c.get("/api/me", headers={"Authorization": f"Bearer {issued.output.strip()}"})
            assert me.json() == {"username": "dr.who"}
            assert c.post("/api/login", json={"username": "dr.who", "password": CLI_PASSWORD}).status_code == 200
    finally:
        settings_module.get_settings.cache_clear()


def test_health_readiness_and_metrics(settings: Settings, client: TestClient) -> None:
    add_study(settings, probabilities=COVID)
    add_study(settings, status=InstanceStatus.FAILED)
    add_study(settings, status=InstanceStatus.QUEUED)
    assert client.get("/healthz").json()["ok"] is True
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["checks"]["database"].startswith("schema revision 0")
    text = client.get("/metrics").text
    assert "cxr_instances_received_total 3.0" in text
    assert "cxr_instances_triaged_total 1.0" in text and "cxr_instances_failed_total 1.0" in text
    assert 'cxr_queue_depth{status="queued"} 1.0' in text
    assert 'cxr_triage_turnaround_seconds_bucket{le="+Inf"} 1.0' in text
    down = create_app(make_settings("postgresql+psycopg://postgres@127.0.0.1:1/none", settings.home))
    with TestClient(down) as c:
        assert c.get("/readyz").status_code == 503


def test_worker_assigns_the_priority_in_the_prediction_transaction(settings: Settings, tiny_registry, tmp_path) -> None:
    from tests.conftest import DICOM_DIR
    from workers.ensemble import EnsembleProvider
    from workers.triage import triage_instance

    path = DICOM_DIR / "cr_chest_siim_jpeg_baseline_8bit.dcm"
    uid = add_study(settings, status=InstanceStatus.QUEUED, requested_priority="HIGH")
    with session_scope(settings.effective_database_url) as session:
        study = session.scalars(select(Study).where(Study.study_instance_uid == uid)).one()
        instance = study.instances[0]
        instance.path = str(path)
        instance_id = instance.id
    worker_settings = settings.model_copy(update={"models_dir": tiny_registry.root})
    provider = EnsembleProvider(tiny_registry, device="cpu", poll_s=0)
    assert triage_instance(worker_settings, instance_id, provider).status == InstanceStatus.DONE
    with session_scope(settings.effective_database_url) as session:
        entry = session.scalars(select(WorklistEntry)).one()
        assert entry.ai_priority is not None and entry.rank >= 4, "HIGH from DICOM is kept or raised"
        assert entry.deciding_instance_id == instance_id


def test_sr_and_heatmap_written_by_the_worker_are_linked_and_served(
    settings: Settings, client: TestClient, tiny_registry
) -> None:
    from tests.conftest import DICOM_DIR
    from workers.ensemble import EnsembleProvider
    from workers.triage import triage_instance

    uid = add_study(settings, status=InstanceStatus.QUEUED)
    with session_scope(settings.effective_database_url) as session:
        instance = session.scalars(select(Study).where(Study.study_instance_uid == uid)).one().instances[0]
        instance.path = str(DICOM_DIR / "cr_chest_siim_jpeg_baseline_8bit.dcm")
        instance_id = instance.id
    worker_settings = settings.model_copy(update={"models_dir": tiny_registry.root})
    provider = EnsembleProvider(tiny_registry, device="cpu", poll_s=0)
    assert triage_instance(worker_settings, instance_id, provider).status == InstanceStatus.DONE

    detail = client.get(f"/api/studies/{uid}").json()
    prediction = detail["instances"][0]["prediction"]
    assert prediction["sr_url"].startswith("/api/results/") and prediction["heatmap_url"].endswith("/preview.png")
    sr = client.get(prediction["sr_url"])
    assert sr.status_code == 200 and sr.headers["content-type"] == "application/dicom"
    assert b"DICM" in sr.content[:132]
    preview = client.get(prediction["heatmap_url"])
    assert preview.status_code == 200 and preview.content[:8] == b"\x89PNG\r\n\x1a\n"
    assert client.get("/api/results/1.2.3.4/preview.png").status_code == 404
    with TestClient(create_app(settings)) as anonymous:
        assert anonymous.get(prediction["sr_url"]).status_code == 401


def test_out_of_distribution_overrides_every_confident_rule() -> None:
    confident_covid = {COVID19: 0.97, PNEUMONIA: 0.02, NO_FINDING: 0.01}
    decision = evaluate(confident_covid, {}, RULES, ood_score=812.0, out_of_distribution=True)
    assert (decision.priority, decision.rule) == ("indeterminate", "indeterminate-out-of-distribution")
    assert "out of distribution" in decision.detail and "812" in decision.detail
    assert evaluate(confident_covid, {}, RULES, ood_score=40.0, out_of_distribution=False).priority == "stat"


def test_thresholds_come_from_the_model_sets_operating_point_unless_the_site_sets_them(tmp_path: Path) -> None:
    point = {"stat_threshold": 0.3, "routine_threshold": 0.6}
    rules = Rules.from_settings(Settings(home=tmp_path), point)
    assert (rules.stat_threshold, rules.routine_threshold) == (0.3, 0.6)
    site = Rules.from_settings(Settings(home=tmp_path, stat_threshold=0.45), point)
    assert (site.stat_threshold, site.routine_threshold) == (0.45, 0.6)
    assert Rules.from_settings(Settings(home=tmp_path), None).stat_threshold == 0.5
    probs = {COVID19: 0.35, PNEUMONIA: 0.05, NO_FINDING: 0.60}
    assert evaluate(probs, {}, rules).priority == "stat"  # 0.35 >= the set's 0.3
