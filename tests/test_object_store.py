"""The object-store spool and results backend (CXR_SPOOL_URL=s3://...) against a real S3 API server (moto, server mode).

Unit level: create-only writes, concurrent sends, reads and deletes through infra/objectstore.py and the listener's
ObjectSpool. End to end: dcmtk storescu -> listener (its own home) -> S3 -> a worker on another home (no shared disk)
-> prediction in PostgreSQL and the SR delivered to Orthanc, read back from the bucket and validated with dciodvfy.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import threading
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import select

from cxr_triage.settings import Settings
from db.models import Instance, Prediction, ResultObject
from db.session import session_scope
from infra import objectstore
from infra.objectstore import ObjectStoreError, S3Location
from listener.spool import ObjectSpool, open_spool
from tests.conftest import CHEST_FILES, DICOM_DIR, NON_CHEST_FILES, S3Server, free_port, wait_until


def _settings(server: S3Server, tmp_path: Path) -> Settings:
    return Settings(home=tmp_path, spool_url=f"s3://{server.bucket}/site-a", s3_endpoint_url=server.endpoint)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_spool_url_must_be_an_s3_url() -> None:
    with pytest.raises(ValueError):
        Settings(spool_url="/var/spool")
    with pytest.raises(ValueError):
        Settings(spool_url="s3://")
    assert Settings(spool_url="s3://bucket-1/a/b").spool_url == "s3://bucket-1/a/b"


def test_object_spool_keeps_the_first_content_and_reports_a_conflict(s3_server: S3Server, tmp_path: Path) -> None:
    settings = _settings(s3_server, tmp_path)
    spool = open_spool(settings)
    assert isinstance(spool, ObjectSpool)
    uids = {"study_instance_uid": "1.2.3", "sop_instance_uid": "1.2.3.4"}
    first = spool.store(**uids, source=None, data=b"first")
    assert not first.already_present and first.ref == f"s3://{s3_server.bucket}/site-a/instances/1.2.3/1.2.3.4.dcm"
    same = spool.store(**uids, source=None, data=b"first")
    assert same.already_present and not same.conflict
    other = spool.store(**uids, source=None, data=b"second")
    assert other.already_present and other.conflict and other.sha256 == _sha(b"first")
    assert objectstore.read_object(settings, first.ref) == b"first"
    replaced = spool.replace(other, source=None, data=b"second")
    assert replaced.sha256 == _sha(b"second") and objectstore.read_object(settings, first.ref) == b"second"
    assert s3_server.keys() == ["site-a/instances/1.2.3/1.2.3.4.dcm"]


def test_object_spool_stores_a_received_file_without_reading_it_into_the_request(
    s3_server: S3Server, tmp_path: Path
) -> None:
    settings = _settings(s3_server, tmp_path)
    source = DICOM_DIR / CHEST_FILES[0]
    stored = open_spool(settings).store(
        study_instance_uid="1.2.3", sop_instance_uid="1.2.3.5", source=source, data=None
    )
    assert stored.sha256 == _sha(source.read_bytes()) and stored.size_bytes == source.stat().st_size
    assert objectstore.read_object(settings, stored.ref) == source.read_bytes()
    meta = s3_server.client().head_object(Bucket=s3_server.bucket, Key="site-a/instances/1.2.3/1.2.3.5.dcm")
    assert meta["Metadata"]["sha256"] == stored.sha256


def test_concurrent_sends_of_different_content_store_exactly_one(s3_server: S3Server, tmp_path: Path) -> None:
    settings = _settings(s3_server, tmp_path)
    spool = open_spool(settings)
    bodies = [f"content {i}".encode() * 1000 for i in range(8)]
    results: list[object] = [None] * len(bodies)
    start = threading.Barrier(len(bodies))

    def send(i: int) -> None:
        start.wait()
        results[i] = spool.store(study_instance_uid="1.2", sop_instance_uid="1.2.9", source=None, data=bodies[i])

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    created = [r for r in results if not getattr(r, "already_present", True)]
    assert len(created) == 1, "exactly one send may create the object"
    stored = objectstore.read_object(settings, f"s3://{s3_server.bucket}/site-a/instances/1.2/1.2.9.dcm")
    assert _sha(stored) == getattr(created[0], "sha256", None), "the object must hold what the winner recorded"
    assert all(getattr(r, "sha256", None) == _sha(stored) for r in results), "every loser sees the stored content"


def test_reads_and_deletes_through_refs(s3_server: S3Server, tmp_path: Path) -> None:
    settings = _settings(s3_server, tmp_path)
    location = S3Location.parse(f"s3://{s3_server.bucket}/site-a/results/1.2/1.2.3.dcm")
    ref = objectstore.put(settings, location, b"sr", _sha(b"sr")).ref
    opened = objectstore.open_object(settings, ref)
    assert isinstance(opened, BytesIO) and opened.read() == b"sr"
    assert objectstore.delete_object(settings, ref) == 2
    assert objectstore.delete_object(settings, ref) == 0
    with pytest.raises(FileNotFoundError):
        objectstore.read_object(settings, ref)
    local = tmp_path / "x.dcm"
    local.write_bytes(b"local")
    assert objectstore.open_object(settings, str(local)) == local
    assert objectstore.delete_object(settings, str(local)) == 5 and not local.exists()
    assert "writable" in objectstore.check_bucket(settings)
    assert s3_server.keys() == [], "the health probe leaves nothing behind"


def test_an_unreachable_store_raises_object_store_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "y")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    settings = Settings(home=tmp_path, spool_url="s3://nowhere/p", s3_endpoint_url=f"http://127.0.0.1:{free_port()}")
    with pytest.raises(ObjectStoreError):
        open_spool(settings).store(study_instance_uid="1.2", sop_instance_uid="1.2.3", source=None, data=b"x")
    with pytest.raises(ObjectStoreError):
        objectstore.read_object(settings, "s3://nowhere/p/instances/1.2/1.2.3.dcm")


def _s3_service(service_factory, s3_server: S3Server, **overrides: str):
    service = service_factory(spool_url=f"s3://{s3_server.bucket}/site-a", s3_endpoint_url=s3_server.endpoint,
                              **overrides)  # fmt: skip
    service.env.update(s3_server.env)
    return service


def test_storescu_to_listener_and_worker_on_separate_hosts_through_the_object_store(
    pg_url, redis_url, tiny_registry, service_factory, s3_server: S3Server, tmp_path: Path
) -> None:
    from tests.orthanc import Orthanc

    dicom_port = free_port()
    common = {
        "database_url": pg_url,
        "broker_url": redis_url,
        "models_dir": tiny_registry.root,
        "results_destination_aet": "ORTHANC",
        "results_destination_port": str(dicom_port),
        "results_retry_base_s": "1",
    }
    listener = _s3_service(service_factory, s3_server, **common)
    worker = _s3_service(service_factory, s3_server, **common)  # another home: the two share no directory
    listener.start_listener()
    worker.start_worker()
    orthanc = Orthanc(
        tmp_path / "orthanc", dicom_port=dicom_port, http_port=free_port(), triage_aet="CXRTRIAGE",
        triage_port=listener.port,
    )  # fmt: skip
    orthanc.start()
    try:
        files = [DICOM_DIR / name for name in (*CHEST_FILES, NON_CHEST_FILES[0])]
        result = listener.storescu(*files)
        assert result.returncode == 0, result.stderr

        def delivered() -> bool:
            with session_scope(pg_url) as session:
                rows = session.scalars(select(ResultObject.status)).all()
                return len(rows) == 2 * len(CHEST_FILES) and set(rows) == {"delivered"}

        wait_until(delivered, 240, "every SR and heatmap to be delivered to Orthanc", interval=1)
        again = listener.storescu(*files)  # a re-send is idempotent: no new objects, predictions or results
        assert again.returncode == 0, again.stderr

        with session_scope(pg_url) as session:
            instances = session.scalars(select(Instance)).all()
            assert len(instances) == len(files)
            assert all(i.path.startswith(f"s3://{s3_server.bucket}/site-a/instances/") for i in instances)
            assert sorted(i.status for i in instances) == ["done", "done", "done", "skipped"]
            assert len(session.scalars(select(Prediction)).all()) == len(CHEST_FILES)
            results = session.scalars(select(ResultObject)).all()
            assert all(r.path.startswith(f"s3://{s3_server.bucket}/site-a/results/") for r in results)
            sr_refs = [r.path for r in results if r.kind == "sr"]
        keys = s3_server.keys("site-a/")
        assert len([k for k in keys if k.startswith("site-a/instances/")]) == len(files)
        assert len([k for k in keys if k.startswith("site-a/results/")]) == 2 * len(CHEST_FILES)
        for home in (listener.home, worker.home):
            assert list(home.rglob("*.dcm")) == [], f"no instance or result may be kept on {home}'s disk"

        settings = Settings(spool_url=f"s3://{s3_server.bucket}/site-a", s3_endpoint_url=s3_server.endpoint)
        for ref in sr_refs:
            sr_file = tmp_path / "sr.dcm"
            sr_file.write_bytes(objectstore.read_object(settings, ref))
            check = subprocess.run(["dciodvfy", str(sr_file)], capture_output=True, text=True)
            errors = [x for x in (check.stdout + check.stderr).splitlines() if x.startswith("Error")]
            assert errors == [], errors
            sop = str(pydicom.dcmread(sr_file, stop_before_pixels=True).SOPInstanceUID)
            found = orthanc.post(
                "/tools/find", json.dumps({"Level": "Instance", "Query": {"SOPInstanceUID": sop}}).encode()
            )
            assert len(found) == 1, f"SR {sop} must be in Orthanc"
    finally:
        orthanc.stop()


def test_listener_answers_out_of_resources_while_the_store_is_unreachable(
    pg_url, redis_url, tiny_registry, service_factory, s3_server: S3Server
) -> None:
    service = service_factory(
        database_url=pg_url, broker_url=redis_url, models_dir=tiny_registry.root,
        spool_url=f"s3://{s3_server.bucket}/site-a", s3_endpoint_url=f"http://127.0.0.1:{free_port()}",
    )  # fmt: skip
    service.env.update(s3_server.env)
    service.start_listener()
    result = service.storescu(DICOM_DIR / CHEST_FILES[0], extra=("-v",))
    assert "Refused: OutOfResources" in result.stderr, result.stderr  # 0xA700: the sender keeps it and retries
    with session_scope(pg_url) as session:
        assert session.scalars(select(Instance)).all() == [], "nothing is recorded that is not stored"
    assert "store.spool_failed" in service.log_text()
