"""DICOMweb STOW-RS intake (issue 13, item 1): `POST /dicomweb/studies` takes each instance through the C-STORE's
intake path (spool with fsync, database row, queue, then the answer), answers with a Store Instances Response that
lists every instance (a refused one with its Failure Reason), and holds to the same size limits, intake and duplicate
policy. In process (the app under TestClient), with dicomweb-client against `cxr-triage api`, and end to end with
Orthanc's DICOMweb plugin sending a study that is triaged and whose SR returns to Orthanc by C-STORE."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import time
import urllib.error
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
import pytest
from fastapi.testclient import TestClient
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage, DeflatedExplicitVRLittleEndian, generate_uid
from sqlalchemy import select

from cxr_triage.settings import Settings
from db.audit_models import AuditAction, AuditEvent
from db.migrate import upgrade
from db.models import Instance, InstanceStatus
from db.session import session_scope
from infra import objectstore
from listener import accept, server
from listener.dispatch import Dispatcher
from tests.conftest import DICOM_DIR, ROOT, S3Server, Service, free_port, instance_outcomes, wait_for_port, wait_until
from worklist.app import create_app
from worklist.auth import create_user, issue_token
from worklist.dicomweb import SCRATCH_DIR, accepts_dicom_json, sweep_scratch

SENDER = "orthanc"  # the service account STOW-RS senders use ("STOW:orthanc" fits the 16-character calling AE)
CHEST = DICOM_DIR / "cr_chest_siim_jpeg_baseline_8bit.dcm"
HIP = DICOM_DIR / "cr_hip_mono2_jpeg_extended_lossy_RG2_JPLY.dcm"
BOUNDARY = "cxr-stow-test-boundary"
DICOM_JSON = "application/dicom+json"
FAST_SCRYPT_N = 2**14

OUT_OF_RESOURCES, DOES_NOT_MATCH, CANNOT_UNDERSTAND = 0xA700, 0xA900, 0xC000
VERIFICATION = "1.2.840.10008.1.1"


# --- instances and bodies ------------------------------------------------------------------------------------------


def instance(source: Path = CHEST, **changes: Any) -> Dataset:
    """A copy of a sample file as a new instance (new SOP Instance UID; the study kept unless `changes` says)."""
    ds = pydicom.dcmread(source)
    ds.SOPInstanceUID = generate_uid()
    for keyword, value in changes.items():
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    return ds


def encode(ds: Dataset) -> bytes:
    """The PS3.10 file of a data set, as a STOW-RS part carries it."""
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def stow_body(*parts: bytes, boundary: str = BOUNDARY, closed: bool = True) -> tuple[bytes, str]:
    """A multipart/related; type="application/dicom" body of PS3.10 files, and its Content-Type."""
    body = b"".join(
        b"--" + boundary.encode() + b"\r\nContent-Type: application/dicom\r\n\r\n" + part + b"\r\n" for part in parts
    )
    body += b"--" + boundary.encode() + b"--" if closed else b""
    return body, f'multipart/related; type="application/dicom"; boundary={boundary}'


@dataclass(frozen=True)
class Answer:
    """A STOW-RS answer: its HTTP status, headers and Store Instances Response."""

    status: int
    headers: dict[str, str]
    dataset: Dataset

    def sequence(self, keyword: str) -> list[tuple[str, int | None]]:
        """(Referenced SOP Instance UID, Failure Reason) of each item of a sequence; "" for items without UID."""
        items = self.dataset.get(keyword) or []
        return [(str(item.get("ReferencedSOPInstanceUID", "")), item.get("FailureReason")) for item in items]

    @property
    def stored(self) -> list[str]:
        return [uid for uid, _ in self.sequence("ReferencedSOPSequence")]

    @property
    def failed(self) -> dict[str, int | None]:
        return dict(self.sequence("FailedSOPSequence"))


def answer_of(response: Any) -> Answer:
    assert response.headers["content-type"] == DICOM_JSON, response.text
    return Answer(response.status_code, dict(response.headers), Dataset.from_json(response.json()))


# --- the app in process --------------------------------------------------------------------------------------------


@dataclass
class Stow:
    settings: Settings
    token: str

    @property
    def url(self) -> str:
        return self.settings.effective_database_url

    def client(self, **overrides: Any) -> TestClient:
        app = create_app(self.settings.model_copy(update=overrides) if overrides else self.settings)
        return TestClient(app, headers={"Authorization": f"Bearer {self.token}"})

    def post(self, *datasets: Dataset | bytes, client: TestClient | None = None, **overrides: Any) -> Answer:
        body, content_type = stow_body(*(d if isinstance(d, bytes) else encode(d) for d in datasets))
        with client or self.client(**overrides) as c:
            response = c.post("/dicomweb/studies", content=body, headers={"Content-Type": content_type})
        return answer_of(response)

    def rows(self) -> dict[str, Instance]:
        with session_scope(self.url) as session:
            rows = {row.sop_instance_uid: row for row in session.scalars(select(Instance))}
            session.expunge_all()
        return rows

    def audit(self) -> list[AuditEvent]:
        with session_scope(self.url) as session:
            events = list(session.scalars(select(AuditEvent).order_by(AuditEvent.id)))
            session.expunge_all()
        return events

    def scratch_files(self) -> list[Path]:
        return list((self.settings.effective_spool_dir / SCRATCH_DIR).glob("*"))


def make_stow(url: str, home: Path, **settings: Any) -> Stow:
    upgrade(url)
    values: dict[str, Any] = {
        "home": home,
        "database_url": url,
        "stow_users": [SENDER],
        "min_free_bytes": 0,
        "password_scrypt_n": FAST_SCRYPT_N,
        **settings,
    }
    config = Settings(**values)
    with session_scope(url) as session:
        user = create_user(session, SENDER, "a service account password", scrypt_n=FAST_SCRYPT_N)
        token = issue_token(session, user.id, kind="api", name="stow")
    return Stow(config, token)


@pytest.fixture
def stow(tmp_path: Path) -> Stow:
    return make_stow(f"sqlite:///{tmp_path / 'stow.sqlite3'}", tmp_path / "var")


def test_every_instance_is_spooled_recorded_and_queued_and_each_refusal_listed_with_its_reason(stow: Stow) -> None:
    chest = instance()
    hip = instance(HIP, StudyInstanceUID=chest.StudyInstanceUID)  # a study of a chest and a hip film
    no_pixels = instance(PixelData=None)
    ct = instance(SOPClassUID=CTImageStorage)
    answer = stow.post(chest, hip, no_pixels, ct)

    assert answer.status == 202, "some stored, some refused"
    assert answer.stored == [chest.SOPInstanceUID, hip.SOPInstanceUID]
    assert answer.failed == {
        no_pixels.SOPInstanceUID: DOES_NOT_MATCH,
        ct.SOPInstanceUID: accept.SOP_CLASS_NOT_SUPPORTED,
    }
    assert "OtherFailuresSequence" not in answer.dataset
    referenced = answer.dataset.ReferencedSOPSequence[0]
    assert referenced.ReferencedSOPClassUID == chest.SOPClassUID

    rows = stow.rows()
    assert set(rows) == {chest.SOPInstanceUID, hip.SOPInstanceUID}, "a refused instance leaves no row"
    assert rows[chest.SOPInstanceUID].status == InstanceStatus.QUEUED, "queued (filesystem broker) before the answer"
    assert rows[hip.SOPInstanceUID].status == InstanceStatus.SKIPPED
    assert rows[hip.SOPInstanceUID].status_reason == "body part HIP", "the same intake policy as a C-STORE"
    assert {row.calling_aet for row in rows.values()} == {f"STOW:{SENDER}"}
    spooled = Path(rows[chest.SOPInstanceUID].path)
    assert spooled.read_bytes() == encode(chest), "the part as received became the spooled instance"
    assert spooled.is_relative_to(stow.settings.effective_spool_dir / chest.StudyInstanceUID)
    assert stow.scratch_files() == [], "no scratch file is left"

    [event] = stow.audit()
    assert (event.username, event.action, event.http_status) == (SENDER, AuditAction.STORE_INSTANCES, 202)
    assert event.study_instance_uid == chest.StudyInstanceUID
    assert event.details == "2 stored, 2 failed (0122, A900)"
    assert event.via == "POST /dicomweb/studies"


def test_nothing_stored_is_409_and_a_part_that_names_no_instance_is_another_failure(stow: Stow) -> None:
    no_pixels = instance(PixelData=None)
    answer = stow.post(no_pixels, b"not DICOM at all")
    assert answer.status == 409
    assert answer.failed == {no_pixels.SOPInstanceUID: DOES_NOT_MATCH}
    assert answer.sequence("OtherFailuresSequence") == [("", CANNOT_UNDERSTAND)]
    assert "ReferencedSOPSequence" not in answer.dataset
    assert stow.rows() == {}


def test_a_resend_is_a_success_and_other_content_follows_the_duplicate_policy(stow: Stow) -> None:
    chest = instance()
    assert stow.post(chest).status == 200
    assert stow.post(chest).stored == [chest.SOPInstanceUID], "an identical re-send is a success"
    chest.ImageComments = "corrected"
    refused = stow.post(chest, duplicate_policy="reject")
    assert refused.failed == {chest.SOPInstanceUID: CANNOT_UNDERSTAND}
    assert "SOP Instance UID in use" not in json.dumps(refused.dataset.to_json_dict()), "codes, not free text"
    row = stow.rows()[chest.SOPInstanceUID]
    assert row.status_reason and "reject" in row.status_reason
    assert stow.post(chest, duplicate_policy="replace").status == 200
    assert (
        hashlib.sha256(Path(stow.rows()[chest.SOPInstanceUID].path).read_bytes()).hexdigest()
        == hashlib.sha256(encode(chest)).hexdigest()
    )


def test_the_same_size_limit_applies_per_instance_and_the_others_are_stored(stow: Stow) -> None:
    small, large = instance(), instance(HIP)
    limit = len(encode(small)) + 1000
    assert len(encode(large)) > limit
    answer = stow.post(small, large, max_dataset_bytes=limit)
    assert answer.status == 202
    assert answer.stored == [small.SOPInstanceUID]
    assert answer.failed == {large.SOPInstanceUID: OUT_OF_RESOURCES}, "named from its header, refused by its size"
    assert stow.scratch_files() == []


def test_the_request_limits_answer_413_and_list_what_was_stored_before(stow: Stow) -> None:
    first, second, third = instance(), instance(), instance()
    body, content_type = stow_body(*map(encode, (first, second, third)))
    with stow.client(stow_max_request_bytes=len(body) - 1) as client:
        declared = client.post("/dicomweb/studies", content=body, headers={"Content-Type": content_type})
        assert declared.status_code == 413, "a declared Content-Length over the limit: refused before reading"
        chunks = (body[i : i + 65536] for i in range(0, len(body), 65536))
        streamed = client.post("/dicomweb/studies", content=chunks, headers={"Content-Type": content_type})
    answer = answer_of(streamed)
    assert answer.status == 413 and "larger than" in answer.headers["warning"]
    assert set(answer.stored) <= {first.SOPInstanceUID, second.SOPInstanceUID}
    assert set(answer.stored) == set(stow.rows()), "what the answer lists as stored is stored"

    with stow.client(stow_max_instances=2) as client:
        too_many = answer_of(client.post("/dicomweb/studies", content=body, headers={"Content-Type": content_type}))
    assert too_many.status == 413 and "more than 2 instances" in too_many.headers["warning"]
    assert too_many.stored == [first.SOPInstanceUID, second.SOPInstanceUID]
    assert stow.scratch_files() == []


def test_below_the_free_space_watermark_nothing_is_stored_and_the_sender_is_told_to_retry(stow: Stow) -> None:
    answer = stow.post(instance(), min_free_bytes=1 << 62)
    assert answer.status == 503 and answer.headers["retry-after"].isdigit()
    assert list(answer.failed.values()) == [OUT_OF_RESOURCES]
    assert stow.rows() == {}


def test_authentication_is_a_bearer_token_of_a_listed_service_account(stow: Stow) -> None:
    body, content_type = stow_body(encode(instance()))
    app = create_app(stow.settings)
    with session_scope(stow.url) as session:
        reader = create_user(session, "reader", "a reader password", scrypt_n=FAST_SCRYPT_N)
        reader_token = issue_token(session, reader.id, kind="api")
    headers = {"Content-Type": content_type}
    with TestClient(app) as client:
        assert client.post("/dicomweb/studies", content=body, headers=headers).status_code == 401
        bogus = {**headers, "Authorization": "Bearer not-a-token"}
        assert client.post("/dicomweb/studies", content=body, headers=bogus).status_code == 401
        listed_cookie = {**headers, "Cookie": f"cxr_session={stow.token}"}
        assert client.post("/dicomweb/studies", content=body, headers=listed_cookie).status_code == 401, "no cookie"
        reader_headers = {**headers, "Authorization": f"Bearer {reader_token}"}
        assert client.post("/dicomweb/studies", content=body, headers=reader_headers).status_code == 403
    assert stow.rows() == {}
    assert [(e.username, e.http_status) for e in stow.audit()] == [("reader", 403)], "anonymous requests unrecorded"


def test_malformed_requests_are_refused_with_the_status_ps3_18_gives(stow: Stow) -> None:
    part = encode(instance())
    body, content_type = stow_body(part)
    with stow.client() as client:

        def post(content: bytes | Iterable[bytes], content_type: str, **headers: str) -> Any:
            return client.post("/dicomweb/studies", content=content, headers={"Content-Type": content_type, **headers})

        assert post(part, "application/dicom").status_code == 415
        assert post(body, content_type.replace('"application/dicom"', "application/dicom+json")).status_code == 415
        assert post(body, 'multipart/related; type="application/dicom"').status_code == 400, "no boundary"
        assert post(body, content_type, Accept="application/dicom+xml").status_code == 406
        empty = answer_of(post(b"--" + BOUNDARY.encode() + b"--", content_type))
        assert empty.status == 400 and "no instance" in empty.headers["warning"]
        cut = answer_of(post(stow_body(part, closed=False)[0], content_type))
        assert cut.status == 400 and "closing boundary" in cut.headers["warning"]
        assert cut.stored == [], "a part whose end never came is not taken"
        garbage = answer_of(post(b"x" * 70000, content_type))
        assert garbage.status == 400
        preamble = answer_of(post(b"a preamble to skip\r\n" + body + b"\r\nan epilogue", content_type))
        assert preamble.status == 200
        long_boundary = stow_body(part, boundary=str(uuid.uuid4()) + "-" + str(uuid.uuid4()))  # as Orthanc sends
        assert answer_of(post(*long_boundary)).status == 200
    assert stow.scratch_files() == []


def test_a_deflated_part_is_read_within_the_limit_and_stored_as_received(stow: Stow) -> None:
    chest = instance()
    chest.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    part = encode(chest)
    assert stow.post(part).status == 200
    assert Path(stow.rows()[chest.SOPInstanceUID].path).read_bytes() == part
    bomb = instance(PixelData=b"\0" * 4_000_000)  # small deflated, four megabytes inflated
    bomb.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    refused = stow.post(bomb, max_dataset_bytes=1_000_000)
    assert len(encode(bomb)) < 1_000_000 and refused.failed == {bomb.SOPInstanceUID: OUT_OF_RESOURCES}


def test_with_the_object_store_each_part_is_put_there_and_no_scratch_file_stays(
    s3_server: S3Server, tmp_path: Path
) -> None:
    stow = make_stow(
        f"sqlite:///{tmp_path / 'stow.sqlite3'}",
        tmp_path / "var",
        spool_url=f"s3://{s3_server.bucket}/site-a",
        s3_endpoint_url=s3_server.endpoint,
    )
    chest = instance()
    assert stow.post(chest).status == 200
    ref = stow.rows()[chest.SOPInstanceUID].path
    assert ref == f"s3://{s3_server.bucket}/site-a/instances/{chest.StudyInstanceUID}/{chest.SOPInstanceUID}.dcm"
    assert objectstore.read_object(stow.settings, ref) == encode(chest)
    assert stow.scratch_files() == []


def test_scratch_files_left_by_a_dead_process_are_swept_and_fresh_ones_kept(tmp_path: Path) -> None:
    old, fresh = tmp_path / "part-old.dcm", tmp_path / "part-fresh.dcm"
    for path in (old, fresh):
        path.write_bytes(b"x")
    os.utime(old, (time.time() - 2 * 86400, time.time() - 2 * 86400))
    assert sweep_scratch(tmp_path) == 1
    assert [p.name for p in tmp_path.iterdir()] == [fresh.name]


def test_accept_header_negotiation() -> None:
    assert accepts_dicom_json("")
    assert accepts_dicom_json("application/dicom+json")
    assert accepts_dicom_json("application/dicom+xml;q=0.9, */*;q=0.1")
    assert not accepts_dicom_json("application/dicom+xml")
    assert not accepts_dicom_json("application/dicom+json;q=0")


def test_the_intake_checks_the_sop_classes_and_syntaxes_the_listener_negotiates() -> None:
    ae = server.build_ae(Settings())
    storage = {
        str(context.abstract_syntax): set(context.transfer_syntax)
        for context in ae.supported_contexts
        if context.abstract_syntax != VERIFICATION
    }
    assert set(storage) == set(accept.STORAGE_SOP_CLASSES)
    assert all(syntaxes == set(accept.TRANSFER_SYNTAXES) for syntaxes in storage.values())


def test_an_instance_the_broker_did_not_take_is_sent_by_the_listener_outbox(
    tmp_path: Path, redis_url: str, tiny_registry: Any
) -> None:
    down = f"redis://127.0.0.1:{free_port()}/0"
    stow = make_stow(
        f"sqlite:///{tmp_path / 'outbox.sqlite3'}", tmp_path / "var", broker_url=down, models_dir=tiny_registry.root
    )
    chest = instance()
    assert stow.post(chest).status == 200, "durable and recorded: the answer does not wait for the broker"
    assert stow.rows()[chest.SOPInstanceUID].status == InstanceStatus.RECEIVED
    outbox = Dispatcher(stow.settings.model_copy(update={"broker_url": redis_url}))
    assert outbox.flush_outbox() == 1
    assert stow.rows()[chest.SOPInstanceUID].status == InstanceStatus.QUEUED


# --- real peers ----------------------------------------------------------------------------------------------------


def _cli(service: Service, *args: str, stdin: str | None = None) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "service", *args], env=service.env, cwd=service.home, input=stdin, capture_output=True,
        text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def service_account(service: Service) -> str:
    """`cxr-triage users create` and `users token`, as a site makes the STOW-RS sender's account; its token."""
    _cli(service, "users", "create", SENDER, "--password-stdin", stdin="a service account password\n")
    return _cli(service, "users", "token", SENDER, "--name", "stow").strip().splitlines()[-1]


def start_api(service: Service) -> str:
    """`cxr-triage api` (uvicorn) on the service's CXR_API_PORT; its DICOMweb base URL."""
    port = int(service.env["CXR_API_PORT"])
    wait_for_port(port, proc=service._spawn("api", [sys.executable, "-m", "service", "api"]), timeout=90)
    return f"http://127.0.0.1:{port}/dicomweb"


@pytest.fixture
def api_service(service_factory: Callable[..., Service]) -> Iterator[Service]:
    service = service_factory(
        database_url="",
        broker_url="",
        models_dir=ROOT / "models",
        api_port=str(free_port()),
        stow_users=SENDER,
        password_scrypt_n=str(FAST_SCRYPT_N),
        min_free_bytes="0",
    )
    yield service


def test_dicomweb_client_stores_instances_and_reads_each_failure_reason(api_service: Service) -> None:
    from dicomweb_client.api import DICOMwebClient
    from requests import HTTPError

    token = service_account(api_service)
    client = DICOMwebClient(url=start_api(api_service), headers={"Authorization": f"Bearer {token}"})
    chest, hip, no_pixels = instance(), instance(HIP), instance(PixelData=None)
    response = client.store_instances([chest, hip, no_pixels])
    referenced = [item.ReferencedSOPInstanceUID for item in response.ReferencedSOPSequence]
    assert referenced == [chest.SOPInstanceUID, hip.SOPInstanceUID]
    [failed] = response.FailedSOPSequence
    assert (failed.ReferencedSOPInstanceUID, failed.FailureReason) == (no_pixels.SOPInstanceUID, DOES_NOT_MATCH)

    with pytest.raises(HTTPError) as refused:
        client.store_instances([instance(SOPClassUID=CTImageStorage)])
    answer = refused.value.response
    assert answer is not None and answer.status_code == 409, "nothing stored"
    dataset = Dataset.from_json(answer.json())
    assert [item.FailureReason for item in dataset.FailedSOPSequence] == [accept.SOP_CLASS_NOT_SUPPORTED]

    url = f"sqlite:///{(Path(api_service.env['CXR_HOME']) / 'cxr-triage.sqlite3').resolve()}"
    rows = instance_outcomes(url)
    assert set(rows) == {chest.SOPInstanceUID, hip.SOPInstanceUID}
    assert rows[chest.SOPInstanceUID][0] == InstanceStatus.QUEUED
    assert rows[hip.SOPInstanceUID][0] == InstanceStatus.SKIPPED


@pytest.mark.integration
def test_orthanc_sends_a_study_by_stow_rs_it_is_triaged_and_the_sr_returns_by_c_store(
    pg_url: str, redis_url: str, tiny_registry: Any, service_factory: Callable[..., Service], tmp_path: Path
) -> None:
    from tests.orthanc import DICOMWEB_PLUGIN, Orthanc

    if not DICOMWEB_PLUGIN.exists():
        pytest.skip("Orthanc's DICOMweb plugin is not installed: apt-get install orthanc-dicomweb (scripts/setup.sh)")
    dicom_port = free_port()
    service = service_factory(
        database_url=pg_url,
        broker_url=redis_url,
        models_dir=tiny_registry.root,
        api_port=str(free_port()),
        stow_users=SENDER,
        password_scrypt_n=str(FAST_SCRYPT_N),
        results_destination_aet="ORTHANC",
        results_destination_port=str(dicom_port),
        results_heatmap="false",
    )
    token = service_account(service)
    base_url = start_api(service)
    service.start_listener()  # its outbox: what the broker did not take
    service.start_worker()
    orthanc = Orthanc(
        tmp_path / "orthanc",
        dicom_port=dicom_port,
        http_port=free_port(),
        triage_aet="CXRTRIAGE",
        triage_port=service.port,
        autoroute=False,
        dicomweb_servers={"cxr": {"Url": f"{base_url}/", "HttpHeaders": {"Authorization": f"Bearer {token}"}}},
    )
    orthanc.start()
    try:
        study_uid = f"2.25.{uuid.uuid4().int}"
        chest = instance(StudyInstanceUID=study_uid)
        hip = instance(HIP, StudyInstanceUID=study_uid, PatientID=chest.PatientID, PatientName=chest.PatientName)
        for ds in (chest, hip):
            orthanc.post("/instances", encode(ds))
        [study] = [f["ID"] for f in orthanc.post("/tools/lookup", study_uid.encode()) if f["Type"] == "Study"]
        # Synchronous: Orthanc answers once our answer listed every instance, none failed (else an HTTP error).
        orthanc.post("/dicom-web/servers/cxr/stow", json.dumps({"Resources": [study]}).encode())

        def sr_arrived() -> bool:
            series = orthanc.study_series(study_uid)
            return any(s["MainDicomTags"].get("Modality") == "SR" for s in series)

        wait_until(sr_arrived, 180, "the SR of the study Orthanc sent by STOW-RS, back in Orthanc", interval=1)
        rows = instance_outcomes(pg_url)
        status_, _, predictions = rows[chest.SOPInstanceUID]
        assert (status_, predictions) == (InstanceStatus.DONE, 1), "triaged"
        assert rows[hip.SOPInstanceUID][0] == InstanceStatus.SKIPPED
        with session_scope(pg_url) as session:
            senders = set(session.scalars(select(Instance.calling_aet)))
        assert senders == {f"STOW:{SENDER}"}

        # Orthanc reads the answer: an instance we refuse fails its STOW-RS job, and is not stored here.
        refused = instance(PixelData=None, StudyInstanceUID=f"2.25.{uuid.uuid4().int}")
        orthanc.post("/instances", encode(refused))
        lookup = orthanc.post("/tools/lookup", refused.StudyInstanceUID.encode())
        [other] = [f["ID"] for f in lookup if f["Type"] == "Study"]
        with pytest.raises(urllib.error.HTTPError):
            orthanc.post("/dicom-web/servers/cxr/stow", json.dumps({"Resources": [other]}).encode())
        assert refused.SOPInstanceUID not in instance_outcomes(pg_url)
        assert '"event": "stow.answered"' in service.log_text()
    finally:
        orthanc.stop()
