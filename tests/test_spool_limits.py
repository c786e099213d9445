"""Issue 10, disk: a free-space watermark the listener refuses below (and /readyz, /metrics show), and a retention
policy that removes only finished instances' spool files."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from fastapi.testclient import TestClient
from sqlalchemy import select

from cxr_triage.settings import Settings
from db import repo
from db.migrate import upgrade
from db.models import Instance, InstanceEvent, InstanceStatus, utcnow
from db.session import session_scope
from listener.retention import prune_spool
from tests.conftest import DICOM_DIR
from worklist.app import create_app

CHEST = DICOM_DIR / "cr_chest_siim_jpeg_baseline_8bit.dcm"


def test_below_the_watermark_the_listener_refuses_and_says_why(pg_url, redis_url, tiny_registry, service_factory):
    service = service_factory(
        database_url=pg_url, broker_url=redis_url, models_dir=tiny_registry.root, min_free_bytes=str(10**18)
    )
    service.start_listener()
    result = service.storescu(CHEST, extra=("-v",))
    assert "Refused: OutOfResources" in result.stderr, result.stderr  # 0xA700: the sender keeps it and retries
    assert "spool below free-space watermark" in service.log_text()
    with session_scope(pg_url) as session:
        assert session.scalars(select(Instance)).all() == []


def test_readiness_and_metrics_show_the_watermark(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'db.sqlite3'}"
    upgrade(url)
    settings = Settings(home=tmp_path, database_url=url)
    with TestClient(create_app(settings)) as client:
        assert client.get("/readyz").json()["checks"]["spool"] == "above free-space watermark"
        assert "cxr_spool_free_bytes" in client.get("/metrics").text
    full = settings.model_copy(update={"min_free_percent": 99.99999})
    with TestClient(create_app(full)) as client:
        response = client.get("/readyz")
    assert response.status_code == 503 and "spool" in response.json()["down"]
    assert response.json()["checks"]["spool"] == "below free-space watermark"


def _instance(session, spool: Path, n: int, status: InstanceStatus, age_days: float, size: int) -> int:
    path = spool / f"{n}.dcm"
    path.write_bytes(b"\0" * size)
    instance, _ = repo.record_received(
        session,
        repo.ReceivedInstance(
            sop_instance_uid=f"1.2.826.0.1.88.{n}", sop_class_uid="1.2.840.10008.5.1.4.1.1.1",
            study_instance_uid="1.2.826.0.1.88", series_instance_uid=None, transfer_syntax_uid="1.2.840.10008.1.2.1",
            calling_aet="M", modality="CR", body_part="CHEST", view_position="PA", path=str(path), size_bytes=size,
            sha256="0" * 64, status=status, status_reason=None,
        ),
    )  # fmt: skip
    instance.received_at = utcnow() - timedelta(days=age_days)
    session.flush()
    return instance.id


def test_retention_removes_only_finished_instances_files_and_records_it(db_url: str, tmp_path: Path) -> None:
    upgrade(db_url)
    spool = tmp_path / "spool"
    spool.mkdir()
    with session_scope(db_url) as session:
        old_done = _instance(session, spool, 1, InstanceStatus.DONE, 40, 1000)
        old_failed = _instance(session, spool, 2, InstanceStatus.FAILED, 35, 1000)
        old_queued = _instance(session, spool, 3, InstanceStatus.QUEUED, 50, 1000)  # unprocessed: never removed
        new_done = _instance(session, spool, 4, InstanceStatus.DONE, 1, 1000)
        newest_done = _instance(session, spool, 5, InstanceStatus.DONE, 0.5, 1000)
    settings = Settings(home=tmp_path, database_url=db_url, spool_dir=spool, spool_retention_days=30)
    assert prune_spool(settings).files == 2
    assert prune_spool(settings).files == 0  # recorded: not again
    assert sorted(p.name for p in spool.iterdir()) == ["3.dcm", "4.dcm", "5.dcm"]
    with session_scope(db_url) as session:
        removed = {i.id for i in session.scalars(select(Instance).where(Instance.spool_removed_at.is_not(None)))}
        assert removed == {old_done, old_failed}
        reasons = session.scalars(select(InstanceEvent.reason).where(InstanceEvent.instance_id == old_done)).all()
        assert "spool file removed: older than 30 days" in reasons
    # By size: the spool holds 3000 bytes; 1500 allowed removes finished files oldest first, never the queued one.
    capped = settings.model_copy(update={"spool_retention_days": 0, "spool_max_bytes": 1500})
    assert prune_spool(capped).files == 2
    assert sorted(p.name for p in spool.iterdir()) == ["3.dcm"]
    with session_scope(db_url) as session:
        row = session.get(Instance, old_queued)
        assert row is not None and row.spool_removed_at is None
        assert {new_done, newest_done} <= {
            i.id for i in session.scalars(select(Instance).where(Instance.spool_removed_at.is_not(None)))
        }
