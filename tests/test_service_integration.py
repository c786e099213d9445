"""End to end on real peers: dcmtk storescu -> listener -> Redis -> Celery worker -> PostgreSQL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import select

from cxr_triage.registry import Registry
from db.models import InstanceStatus, Prediction
from db.session import session_scope
from tests.conftest import (
    CHEST_FILES,
    DICOM_DIR,
    NON_CHEST_FILES,
    free_port,
    instance_outcomes,
    make_tiny_registry,
    self_signed_cert,
    wait_for_port,
    wait_until,
)

pytestmark = pytest.mark.integration


def _all_terminal(url: str, expected: int) -> bool:
    rows = instance_outcomes(url)
    return len(rows) == expected and all(status in InstanceStatus.TERMINAL for status, _, _ in rows.values())


def _sop_uid(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True, force=True).SOPInstanceUID)


def _undecodable_chest(tmp_path: Path) -> Path:
    """The real 12-bit JPEG Extended hip film, relabelled as a chest PA so that it reaches the decoder."""
    ds = pydicom.dcmread(DICOM_DIR / "cr_hip_mono2_jpeg_extended_lossy_RG2_JPLY.dcm")
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = "PA"
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    out = tmp_path / "chest_jpeg_extended_12bit.dcm"
    ds.save_as(out, enforce_file_format=True)
    return out


def test_every_sample_gets_a_response_and_the_expected_outcome(
    pg_url, redis_url, tiny_registry, service_factory, tmp_path
):
    service = service_factory(database_url=pg_url, broker_url=redis_url, models_dir=tiny_registry.root)
    service.start_listener()
    service.start_worker()
    undecodable = _undecodable_chest(tmp_path)
    files = [DICOM_DIR / f for f in (*CHEST_FILES, *NON_CHEST_FILES)] + [undecodable]

    result = service.storescu(*files)
    assert result.returncode == 0, result.stderr
    assert "Store Failed" not in result.stderr
    wait_until(lambda: _all_terminal(pg_url, len(files)), 180, "every instance to finish")

    rows = instance_outcomes(pg_url)
    for name in CHEST_FILES:
        status, reason, predictions = rows[_sop_uid(DICOM_DIR / name)]
        assert (status, predictions) == (InstanceStatus.DONE, 1), (name, reason)
    for name in NON_CHEST_FILES:
        status, reason, predictions = rows[_sop_uid(DICOM_DIR / name)]
        assert status == InstanceStatus.SKIPPED and predictions == 0
        assert reason and ("body part" in reason or "description names" in reason), reason
    status, reason, predictions = rows[_sop_uid(undecodable)]
    assert status == InstanceStatus.FAILED and predictions == 0
    assert reason and "cannot decode pixel data (1.2.840.10008.1.2.4.51)" in reason

    # A second identical send is a success and creates no new job or prediction.
    again = service.storescu(*files)
    assert again.returncode == 0 and "Store Failed" not in again.stderr
    time.sleep(3)
    assert instance_outcomes(pg_url) == rows

    # Logs are JSON with correlation fields and never carry patient names or IDs.
    logs = service.log_text()
    assert '"sop_instance_uid"' in logs and '"event": "triage.done"' in logs
    for path in files:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        for value in (str(ds.get("PatientName", "")), str(ds.get("PatientID", ""))):
            if len(value) >= 4:
                assert value not in logs, f"patient identifier of {path.name} leaked into the logs"


def test_worker_killed_mid_task_loses_nothing(pg_url, redis_url, tmp_path, service_factory):
    # A heavier model so that a task takes long enough to be killed inside it.
    registry = make_tiny_registry(tmp_path / "models", architectures=("resnet152",), size=224)
    service = service_factory(
        database_url=pg_url,
        broker_url=redis_url,
        models_dir=registry.root,
        visibility_timeout_s="8",
        requeue_after_s="600",
    )
    service.start_listener()
    worker = service.start_worker()
    files = [DICOM_DIR / f for f in CHEST_FILES]
    assert service.storescu(*files).returncode == 0

    def processing() -> bool:
        return any(s == InstanceStatus.PROCESSING for s, _, _ in instance_outcomes(pg_url).values())

    wait_until(processing, 120, "a worker to start a task", interval=0.02)
    os.kill(worker.pid, signal.SIGKILL)
    worker.wait(timeout=10)
    assert any(s == InstanceStatus.PROCESSING for s, _, _ in instance_outcomes(pg_url).values())

    service.start_worker()
    wait_until(lambda: _all_terminal(pg_url, len(files)), 240, "the redelivered tasks to finish")
    rows = instance_outcomes(pg_url)
    assert sorted((s, n) for s, _, n in rows.values()) == [(InstanceStatus.DONE, 1)] * len(files)


def test_broker_outage_does_not_fail_c_store_and_everything_is_triaged_after(
    pg_url, tiny_registry, service_factory, tmp_path
):
    port = free_port()
    broker_url = f"redis://127.0.0.1:{port}/0"
    service = service_factory(database_url=pg_url, broker_url=broker_url, models_dir=tiny_registry.root)
    service.start_listener()
    files = [DICOM_DIR / f for f in CHEST_FILES]

    result = service.storescu(*files)
    assert result.returncode == 0 and "Store Failed" not in result.stderr, result.stderr
    rows = instance_outcomes(pg_url)
    assert len(rows) == len(files)
    assert {status for status, _, _ in rows.values()} == {InstanceStatus.RECEIVED}

    redis_server = subprocess.Popen(
        [
            "redis-server",
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(tmp_path),
        ],
        stdout=subprocess.DEVNULL,
    )
    try:
        wait_for_port(port)
        service.start_worker()
        wait_until(lambda: _all_terminal(pg_url, len(files)), 180, "triage after the broker came back")
        assert sorted((s, n) for s, _, n in instance_outcomes(pg_url).values()) == [(InstanceStatus.DONE, 1)] * len(
            files
        )
    finally:
        redis_server.terminate()
        redis_server.wait(timeout=10)


def test_unknown_calling_ae_title_is_rejected(pg_url, redis_url, tiny_registry, service_factory):
    service = service_factory(
        database_url=pg_url,
        broker_url=redis_url,
        models_dir=tiny_registry.root,
        allowed_calling_aets="MODALITY1",
    )
    service.start_listener()
    echo = ["/usr/bin/echoscu", "-aec", "CXRTRIAGE", "127.0.0.1", str(service.port)]
    rejected = subprocess.run([*echo[:1], "-aet", "INTRUDER", *echo[1:]], capture_output=True, text=True)
    assert rejected.returncode != 0
    assert "Association Rejected" in rejected.stderr
    accepted = subprocess.run([*echo[:1], "-aet", "MODALITY1", *echo[1:]], capture_output=True, text=True)
    assert accepted.returncode == 0, accepted.stderr
    store = service.storescu(DICOM_DIR / CHEST_FILES[0], calling_aet="INTRUDER")
    assert "Association Rejected" in store.stderr
    assert instance_outcomes(pg_url) == {}


def test_hostile_uid_is_refused_and_nothing_is_written_outside_the_spool(
    pg_url, redis_url, tiny_registry, service_factory, tmp_path
):
    from pynetdicom import AE
    from pynetdicom.sop_class import ComputedRadiographyImageStorage  # type: ignore[attr-defined]

    service = service_factory(database_url=pg_url, broker_url=redis_url, models_dir=tiny_registry.root)
    service.start_listener()
    ds = pydicom.dcmread(DICOM_DIR / "cr_chest_siim_jpeg_baseline_8bit.dcm")
    ds.SOPClassUID = ComputedRadiographyImageStorage
    ds.StudyInstanceUID = "../../../../escaped"
    ae = AE(ae_title="HOSTILE")
    ae.add_requested_context(ComputedRadiographyImageStorage, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", service.port, ae_title="CXRTRIAGE")
    assert assoc.is_established
    try:
        status = assoc.send_c_store(ds)
    finally:
        assoc.release()
    assert status.Status == 0xC000
    spool = Path(service.env["CXR_HOME"]) / "spool"
    assert not list(spool.rglob("*.dcm"))
    assert not list(Path(service.home).rglob("escaped*"))
    assert not list(Path("/").glob("escaped*"))
    assert instance_outcomes(pg_url) == {}


def test_embedded_defaults_sqlite_and_filesystem_broker(tiny_registry, service_factory, tmp_path):
    """The embedded run: no Redis or PostgreSQL, the same task code, via `cxr-triage run`."""
    home = tmp_path / "embedded"
    service = service_factory(database_url="", broker_url="", models_dir=tiny_registry.root)
    service.env["CXR_HOME"] = str(home)
    proc = service._spawn("run", [sys.executable, "-m", "service", "run"])
    wait_for_port(service.port, proc=proc, timeout=90)
    echo = subprocess.run(
        ["/usr/bin/echoscu", "-aec", "CXRTRIAGE", "127.0.0.1", str(service.port)],
        capture_output=True,
        text=True,
    )
    assert echo.returncode == 0, echo.stderr
    files = [DICOM_DIR / f for f in (*CHEST_FILES, NON_CHEST_FILES[0])]
    assert service.storescu(*files).returncode == 0
    url = f"sqlite:///{(home / 'cxr-triage.sqlite3').resolve()}"
    wait_until(lambda: _all_terminal(url, len(files)), 180, "embedded triage")
    statuses = sorted(s for s, _, _ in instance_outcomes(url).values())
    assert statuses == [InstanceStatus.DONE] * 3 + [InstanceStatus.SKIPPED]
    assert Registry(tiny_registry.root).promoted_name() == "test"


def test_disk_and_database_errors_answer_out_of_resources_so_the_sender_retries(
    pg_url, redis_url, tiny_registry, service_factory
):
    from sqlalchemy import create_engine, text

    from tests.conftest import PG_ADMIN_URL

    service = service_factory(database_url=pg_url, broker_url=redis_url, models_dir=tiny_registry.root)
    service.start_listener()
    first, second = DICOM_DIR / CHEST_FILES[0], DICOM_DIR / CHEST_FILES[1]

    # Disk: the study's spool directory cannot be created (a file is in the way).
    study_uid = str(pydicom.dcmread(first, stop_before_pixels=True).StudyInstanceUID)
    spool = Path(service.env["CXR_HOME"]) / "spool"
    (spool / study_uid).write_text("in the way")
    result = service.storescu(first, extra=("-v",))
    assert "Refused: OutOfResources" in result.stderr, result.stderr
    assert instance_outcomes(pg_url) == {}
    (spool / study_uid).unlink()
    assert "Store Failed" not in service.storescu(first).stderr
    assert list(instance_outcomes(pg_url)) == [_sop_uid(first)]

    # Database: gone while the listener runs.
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE "{pg_url.rsplit("/", 1)[1]}" WITH (FORCE)'))
    admin.dispose()
    result = service.storescu(second, extra=("-v",))
    assert "Refused: OutOfResources" in result.stderr, result.stderr
    assert '"event": "store.db_failed"' in service.log_text()


def _orthanc(tmp_path: Path, service, *, dicom_port: int | None = None):
    from tests.orthanc import Orthanc

    return Orthanc(
        tmp_path / "orthanc",
        dicom_port=dicom_port or free_port(),
        http_port=free_port(),
        triage_aet="CXRTRIAGE",
        triage_port=service.port,
    )


def _series_by_modality(orthanc, study_uid: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for series in orthanc.study_series(study_uid):
        out.setdefault(series["MainDicomTags"].get("Modality", ""), []).extend(series["Instances"])
    return out


def _service_sending_to_pacs(service_factory, pg_url, redis_url, tiny_registry, dicom_port, **overrides):
    """Listener and worker whose results go to ORTHANC@127.0.0.1:dicom_port, retried after 1 s, 2 s, ..."""
    service = service_factory(
        database_url=pg_url,
        broker_url=redis_url,
        models_dir=tiny_registry.root,
        results_destination_aet="ORTHANC",
        results_destination_port=str(dicom_port),
        results_retry_base_s="1",
        **overrides,
    )
    service.start_listener()
    service.start_worker()
    return service


def test_orthanc_forwards_a_radiograph_and_receives_the_sr_and_heatmap(
    pg_url, redis_url, tiny_registry, service_factory, tmp_path
):
    dicom_port = free_port()
    service = _service_sending_to_pacs(service_factory, pg_url, redis_url, tiny_registry, dicom_port)
    orthanc = _orthanc(tmp_path, service, dicom_port=dicom_port)
    orthanc.start()
    try:
        source = DICOM_DIR / "cr_chest_siim_jpeg_baseline_8bit.dcm"
        study_uid = str(pydicom.dcmread(source, stop_before_pixels=True).StudyInstanceUID)
        orthanc.post("/instances", source.read_bytes())  # the modality stores into the PACS; Lua auto-forwards

        def arrived() -> bool:
            found = _series_by_modality(orthanc, study_uid)
            return bool(found.get("SR")) and bool(found.get("OT") or found.get("SC"))

        wait_until(arrived, 180, "the SR and the heatmap to arrive in Orthanc", interval=1)

        def all_delivered() -> bool:
            from db.models import ResultObject

            with session_scope(pg_url) as session:
                return [r.status for r in session.scalars(select(ResultObject))] == ["delivered", "delivered"]

        wait_until(all_delivered, 30, "both deliveries to be recorded")
        found = _series_by_modality(orthanc, study_uid)
        sr_bytes = orthanc.get(f"/instances/{found['SR'][0]}/file")
        sr = pydicom.dcmread(__import__("io").BytesIO(sr_bytes))
        assert sr.StudyInstanceUID == study_uid
        with session_scope(pg_url) as session:
            from db.models import Prediction, ResultObject

            label = session.scalars(select(Prediction.label)).one()
            results = session.scalars(select(ResultObject)).all()
            assert sorted(r.kind for r in results) == ["heatmap", "sr"]
            assert all(r.status == "delivered" and r.delivered_at is not None for r in results)
            for row in results:
                check = subprocess.run(["dciodvfy", row.path], capture_output=True, text=True)
                errors = [x for x in (check.stdout + check.stderr).splitlines() if x.startswith("Error")]
                assert errors == [], (row.kind, errors)
        from workers.sr import FINDING_CODES

        code = FINDING_CODES[label]
        dump = subprocess.run(["dsrdump", "-"], input=sr_bytes, capture_output=True).stdout.decode()
        assert f'"Finding")=({code.value},{code.scheme_designator},' in dump
    finally:
        orthanc.stop()


def test_results_are_retried_while_the_pacs_is_down_and_delivered_when_it_returns(
    pg_url, redis_url, tiny_registry, service_factory, tmp_path
):
    dicom_port = free_port()
    service = _service_sending_to_pacs(
        service_factory, pg_url, redis_url, tiny_registry, dicom_port, results_heatmap="false"
    )
    source = DICOM_DIR / "dx_chest_nih_cxr14_implicit_le_label-no-finding.dcm"
    assert service.storescu(source).returncode == 0

    from db.models import DeliveryAttempt, ResultObject

    def failed_attempts() -> int:
        with session_scope(pg_url) as session:
            return len(session.scalars(select(DeliveryAttempt).where(DeliveryAttempt.error.is_not(None))).all())

    wait_until(lambda: failed_attempts() >= 2, 120, "two failed delivery attempts while the PACS is down")
    orthanc = _orthanc(tmp_path, service, dicom_port=dicom_port)
    orthanc.start()
    try:
        study_uid = str(pydicom.dcmread(source, stop_before_pixels=True).StudyInstanceUID)
        wait_until(lambda: bool(_series_by_modality(orthanc, study_uid).get("SR")), 120, "the SR after Orthanc started")

        def delivered() -> bool:
            with session_scope(pg_url) as session:
                return session.scalars(select(ResultObject.status)).one() == "delivered"

        wait_until(delivered, 30, "the delivery to be recorded (the C-STORE response precedes the commit)")
        with session_scope(pg_url) as session:
            row = session.scalars(select(ResultObject)).one()
            assert row.status == "delivered" and row.attempts >= 3
            statuses = [a.dimse_status for a in row.attempts_log]
            assert statuses[-1] == 0 and all(a.error for a in row.attempts_log[:-1])
    finally:
        orthanc.stop()


def test_retraining_through_celery_gates_promotes_and_a_running_worker_switches(
    pg_url, redis_url, tiny_registry, service_factory, tmp_path
):
    from cxr_triage.settings import Settings
    from infra.queue import RETRAIN_TASK, producer
    from training.fixtures import make_dataset

    manifest = make_dataset(tmp_path / "data", patients_per_label=6)
    service = service_factory(
        database_url=pg_url,
        broker_url=redis_url,
        models_dir=tiny_registry.root,
        retrain_work_dir=str(tmp_path / "retrain"),
        # Permissive gate: this tests the plumbing (the gate's own rules have unit tests).
        gate_max_auroc_drop="1.0",
        gate_min_macro_auroc="0",
        gate_min_covid_sensitivity="0",
        gate_max_ece="1",
    )
    service.start_listener()
    worker = service.start_worker(queues="gpu,cpu,training")
    first = DICOM_DIR / CHEST_FILES[0]
    assert service.storescu(first).returncode == 0
    wait_until(lambda: _all_terminal(pg_url, 1), 120, "the first triage")

    settings = Settings(broker_url=redis_url, home=tmp_path / "producer")
    producer(settings).send_task(
        RETRAIN_TASK,
        kwargs={"manifest": str(manifest), "epochs": 1, "size": 32, "batch_size": 4, "lr_find_iters": 4, "n_boot": 100},
        queue="training",
    )
    decisions = tiny_registry.root / "gate" / "decisions.jsonl"
    wait_until(decisions.is_file, 300, "the retraining's gate decision")
    import json

    decision = json.loads(decisions.read_text().splitlines()[-1])
    assert decision["accepted"] and decision["promoted_before"] == "test"
    assert all(reason.startswith("pass") for reason in decision["reasons"])
    new_name = decision["candidate"]
    assert Registry(tiny_registry.root).promoted_name() == new_name

    assert service.storescu(DICOM_DIR / CHEST_FILES[1]).returncode == 0
    wait_until(lambda: _all_terminal(pg_url, 2), 120, "the second triage")
    with session_scope(pg_url) as session:
        model_sets = [p.model_set for p in session.scalars(select(Prediction).order_by(Prediction.id))]
    assert model_sets == ["test", new_name], "the same worker process switched ensembles without a restart"
    assert worker.poll() is None


def test_listener_speaks_dicom_tls_and_refuses_plain_associations(
    pg_url, redis_url, tiny_registry, service_factory, tmp_path
):
    import ssl

    from pynetdicom import AE
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    cert, key = self_signed_cert(tmp_path)
    service = service_factory(
        database_url=pg_url, broker_url=redis_url, models_dir=tiny_registry.root, tls_cert=str(cert), tls_key=str(key)
    )
    service.start_listener()
    ae = AE(ae_title="TLSPROBE")
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.network_timeout = 5
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(cert))
    secure = ae.associate("127.0.0.1", service.port, ae_title="CXRTRIAGE", tls_args=(context, "127.0.0.1"))
    assert secure.is_established
    assert secure.send_c_echo().Status == 0
    secure.release()
    plain = ae.associate("127.0.0.1", service.port, ae_title="CXRTRIAGE")
    assert not plain.is_established
