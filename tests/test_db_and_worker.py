"""Schema, idempotent state transitions and the triage function, on SQLite and the real PostgreSQL."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import pytest
import structlog
from sqlalchemy import func, inspect, select

from cxr_triage.logs import configure_logging, get_logger
from cxr_triage.registry import EnsembleSpec, Registry, RegistryError
from cxr_triage.settings import Settings
from db import repo
from db.migrate import downgrade, upgrade
from db.models import Instance, InstanceEvent, InstanceStatus, Prediction
from db.session import engine_for, session_scope
from tests.conftest import DICOM_DIR, make_tiny_registry, received_instance
from workers.ensemble import EnsembleProvider
from workers.triage import triage_instance


def _received(sop: str, path: Path, status: InstanceStatus = InstanceStatus.RECEIVED) -> repo.ReceivedInstance:
    return received_instance(sop, path, status=status, patient_name="Doe^Jane", patient_id="PID-123")


def test_migrations_create_the_same_schema_and_downgrade(db_url: str) -> None:
    upgrade(db_url)
    upgrade(db_url)  # idempotent
    tables = set(inspect(engine_for(db_url)).get_table_names())
    assert {"studies", "instances", "instance_events", "predictions", "alembic_version"} <= tables
    import db.audit_models
    import db.feedback_models  # registers the feedback table on the metadata
    import db.worklist_models  # noqa: F401  (registers the worklist tables on the metadata)
    from db.models import Base

    assert tables == set(Base.metadata.tables) | {"alembic_version"}  # migrations and models agree
    downgrade(db_url, "base")
    assert set(inspect(engine_for(db_url)).get_table_names()) <= {"alembic_version"}


def test_record_received_is_idempotent_on_sop_instance_uid(db_url: str) -> None:
    upgrade(db_url)
    path = DICOM_DIR / "cr_chest_siim_jpeg_baseline_8bit.dcm"
    with session_scope(db_url) as session:
        first, created = repo.record_received(session, _received("1.2.3.4.5.6", path))
        assert created
    with session_scope(db_url) as session:
        again, created_again = repo.record_received(session, _received("1.2.3.4.5.6", path))
        assert not created_again and again.id == first.id
        assert session.scalar(select(func.count()).select_from(Instance)) == 1
        assert session.scalar(select(func.count()).select_from(InstanceEvent)) == 1


def _settings(db_url: str, tmp_path: Path, models: Path) -> Settings:
    return Settings(home=tmp_path / "var", database_url=db_url, models_dir=models)


def test_triage_waits_for_a_model_then_runs_once_and_ignores_duplicates(db_url: str, tmp_path: Path) -> None:
    upgrade(db_url)
    models = tmp_path / "models"
    settings = _settings(db_url, tmp_path, models)
    path = DICOM_DIR / "cr_chest_siim_jpeg_baseline_8bit.dcm"
    with session_scope(db_url) as session:
        instance, _ = repo.record_received(session, _received("1.2.3.4.5.7", path))
        repo.mark_queued(session, instance.id)
        instance_id = instance.id

    provider = EnsembleProvider(Registry(models), device="cpu", poll_s=0)
    assert triage_instance(settings, instance_id, provider).status == InstanceStatus.AWAITING_MODEL
    with session_scope(db_url) as session:
        due = repo.dispatchable(session, stale_before=repo.stale_cutoff(900), model_available=False)
        assert instance_id not in due, "awaiting instances are not re-sent while no model is promoted"

    make_tiny_registry(models)
    with session_scope(db_url) as session:
        due = repo.dispatchable(session, stale_before=repo.stale_cutoff(900), model_available=True)
        assert instance_id in due, "promotion makes awaiting instances due again, without a resend from the PACS"
        repo.mark_queued(session, instance_id)

    outcome = triage_instance(settings, instance_id, provider)
    assert outcome.status == InstanceStatus.DONE
    assert triage_instance(settings, instance_id, provider).status == "duplicate"
    with session_scope(db_url) as session:
        predictions = session.scalars(select(Prediction)).all()
        assert len(predictions) == 1
        prediction = predictions[0]
        assert prediction.label == outcome.detail
        assert abs(sum(prediction.probabilities.values()) - 1.0) < 1e-5
        assert list(prediction.member_probabilities) == ["mobilenetv2_100-test"]
        assert prediction.decode_ms > 0 and prediction.inference_ms > 0 and prediction.queue_wait_ms is not None
        history = [e.status for e in session.scalars(select(InstanceEvent).order_by(InstanceEvent.id))]
        assert history == ["received", "queued", "processing", "awaiting_model", "queued", "processing", "done"]


def test_stale_processing_instances_become_due_again(db_url: str) -> None:
    upgrade(db_url)
    path = DICOM_DIR / "cr_chest_siim_jpeg_baseline_8bit.dcm"
    with session_scope(db_url) as session:
        instance, _ = repo.record_received(session, _received("1.2.3.4.5.8", path))
        repo.mark_queued(session, instance.id)
        repo.claim(session, instance.id, silent_before=repo.stale_cutoff(60))
        instance_id = instance.id
    with session_scope(db_url) as session:
        assert instance_id not in repo.dispatchable(session, stale_before=repo.stale_cutoff(60), model_available=True)
        future = repo.stale_cutoff(0) + timedelta(seconds=5)
        assert instance_id in repo.dispatchable(session, stale_before=future, model_available=True)


def test_worker_switches_to_a_newly_promoted_ensemble_without_restart(tmp_path: Path) -> None:
    registry = make_tiny_registry(tmp_path / "models")
    provider = EnsembleProvider(registry, device="cpu", poll_s=0)
    first = provider.current()
    assert first is not None and first.name == "test"
    assert provider.current() is first, "no reload while promotion is unchanged"
    registry.write_ensemble(EnsembleSpec(name="second", members=("mobilenetv2_100-test",)))
    registry.promote("second")
    second = provider.current()
    assert second is not None and second.name == "second" and second is not first
    assert registry.rollback() == "test"
    rolled = provider.current()
    assert rolled is not None and rolled.name == "test"


def test_registry_refuses_unknown_ensembles_and_empty_rollback(tmp_path: Path) -> None:
    registry = Registry(tmp_path / "models")
    with pytest.raises(RegistryError, match="no ensemble named"):
        registry.promote("missing")
    with pytest.raises(RegistryError, match="nothing to roll back"):
        registry.rollback()


def test_logs_are_json_and_patient_identifiers_are_redacted(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging(fmt="json", component="test")
    get_logger("t").info("store.accepted", sop_instance_uid="1.2.3", patient_name="Doe^Jane", PatientID="PID-9")
    line = capsys.readouterr().err.strip().splitlines()[-1]
    event = json.loads(line)
    assert event["event"] == "store.accepted" and event["sop_instance_uid"] == "1.2.3"
    assert "Doe^Jane" not in line and "PID-9" not in line
    structlog.contextvars.clear_contextvars()


def test_settings_read_lists_and_reject_bad_ae_titles(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CXR_ALLOWED_CALLING_AETS", "modality1, PACS ")
    assert Settings().allowed_calling_aets == ["modality1", "PACS"]  # exact: DICOM AE titles are case-sensitive
    monkeypatch.setenv("CXR_AE_TITLE", "A" * 17)
    with pytest.raises(ValueError, match="AE title"):
        Settings()


def test_empty_path_variables_mean_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CXR_TLS_CERT", "")
    monkeypatch.setenv("CXR_SPOOL_DIR", " ")
    settings = Settings()
    assert settings.tls_cert is None and settings.spool_dir is None


def test_sqlite_default_lives_under_home(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path)
    assert settings.effective_database_url == f"sqlite:///{tmp_path.resolve() / 'cxr-triage.sqlite3'}"
    assert settings.effective_broker_url == "filesystem://"


def test_health_command_reports_each_part_and_fails_when_the_broker_is_down(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    from cxr_triage import settings as settings_module
    from service.cli import app

    monkeypatch.setenv("CXR_HOME", str(tmp_path / "var"))
    monkeypatch.setenv("CXR_MODELS_DIR", str(make_tiny_registry(tmp_path / "models").root))
    settings_module.get_settings.cache_clear()
    runner = CliRunner()
    assert runner.invoke(app, ["db", "upgrade"]).exit_code == 0
    ok = runner.invoke(app, ["health", "--no-listener"])
    assert ok.exit_code == 0, ok.output
    assert json.loads(ok.output)["model"]["detail"] == "test: mobilenetv2_100-test"
    monkeypatch.setenv("CXR_BROKER_URL", "redis://127.0.0.1:1/0")
    settings_module.get_settings.cache_clear()
    down = runner.invoke(app, ["health", "--no-listener"])
    assert down.exit_code == 1
    assert json.loads(down.output)["broker"]["ok"] is False
    settings_module.get_settings.cache_clear()


def test_retraining_schedule_becomes_a_beat_entry_on_the_training_queue() -> None:
    import os
    import subprocess
    import sys

    code = (
        "from workers.celery_app import app\n"
        "entry = app.conf.beat_schedule['retrain']\n"
        "s = entry['schedule']\n"
        "print(entry['task'], entry['options']['queue'], sorted(s.minute), sorted(s.hour), sorted(s.day_of_week))\n"
    )
    env = {**os.environ, "CXR_RETRAIN_SCHEDULE": "30 2 * * 0"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["cxr_triage.retrain", "training", "[30]", "[2]", "[0]"]


def test_an_instance_that_kills_its_worker_every_time_ends_failed(db_url: str) -> None:
    upgrade(db_url)
    path = DICOM_DIR / "cr_chest_siim_jpeg_baseline_8bit.dcm"
    with session_scope(db_url) as session:
        instance, _ = repo.record_received(session, _received("1.2.3.4.5.9", path))
        instance_id = instance.id
    died = repo.stale_cutoff(0) + timedelta(seconds=5)  # every earlier holder's heartbeat is older than this
    for _ in range(3):  # each claim is a delivery whose worker died before finishing
        with session_scope(db_url) as session:
            assert repo.claim(session, instance_id, silent_before=died, max_attempts=3) is not None
    with session_scope(db_url) as session:
        assert repo.claim(session, instance_id, silent_before=died, max_attempts=3) is None
        row = session.get(Instance, instance_id)
        assert row is not None and row.status == InstanceStatus.FAILED
        assert row.status_reason == "gave up after 3 unfinished attempts"


def test_prune_keeps_weights_of_the_promoted_set_and_its_rollback_target_only(tmp_path: Path) -> None:
    registry = make_tiny_registry(tmp_path / "models", architectures=("mobilenetv2_100", "resnet18", "densenet121"))
    a, b, c = registry.ensemble("test").members
    registry.write_ensemble(EnsembleSpec(name="old", members=(a,)))
    registry.write_ensemble(EnsembleSpec(name="older", members=(c,)))
    registry.write_ensemble(EnsembleSpec(name="new", members=(b,)))
    for name in ("older", "old", "new"):
        registry.promote(name)
    assert registry.rollback_target() == "old"
    removed = registry.prune_weights()
    assert sorted(removed) == [c]  # `test` and `older` are neither promoted nor the rollback target
    assert (registry.version_dir(a) / "model.safetensors").is_file()
    assert (registry.version_dir(c) / "card.json").is_file()  # card and records stay
    with pytest.raises(RegistryError):
        registry.promote("older")  # no weights any more: it cannot be promoted by mistake
    assert registry.rollback() == "old"
