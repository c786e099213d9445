"""The access audit trail (issue 14, item 4): every route that shows patient data or changes it is audited (found from
the app's routes), each access leaves exactly one record, the table is append-only in the database, the export is
complete, and each event reaches a syslog receiver as an IHE ATNA message."""

from __future__ import annotations

import base64
import csv
import io
import json
import re
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

import numpy as np
import pytest
import structlog
from fastapi import APIRouter
from fastapi.testclient import TestClient
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid
from sqlalchemy import exc as sa_exc
from sqlalchemy import select, text
from typer.testing import CliRunner

from cxr_triage.settings import Settings
from db.audit_models import AuditAction, AuditEvent, AuditOutcome
from db.audit_repo import EXPORT_COLUMNS, NewAuditEvent, append, export_events
from db.migrate import downgrade, upgrade
from db.models import Instance, Prediction, ResultObject, ResultStatus, Study
from db.session import session_scope
from db.worklist_models import User, WorklistEntry
from tests.conftest import free_port, self_signed_cert
from tests.test_stow_rs import encode, instance, stow_body
from tests.test_worklist_api import (
    COVID,
    PATIENT,
    add_study,
    fast_password_hashes,  # noqa: F401 (autouse: scrypt at a test cost)
)
from worklist.app import create_app
from worklist.atna import EVENTS
from worklist.audit import EXEMPT, audited_routes, unaudited_routes
from worklist.auth import create_user, issue_token

PASSWORD = "correct horse battery"
STOW_INSTANCE = instance()  # what the STOW-RS case stores
STOW_BODY, STOW_CONTENT_TYPE = stow_body(encode(STOW_INSTANCE))
CLIENT = ("10.1.2.3", 50000)
SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.22"


@dataclass
class World:
    """A study with an SR and a heatmap result, a user, and the app."""

    settings: Settings
    study: str
    sr: str
    heatmap: str

    @property
    def url(self) -> str:
        return self.settings.effective_database_url

    def token(self) -> str:
        with session_scope(self.url) as session:
            user = session.scalars(select(User).where(User.username == "reader")).one()
            return issue_token(session, user.id, kind="api")

    def client(self, *, token: str | None = None, **settings: Any) -> TestClient:
        app = create_app(self.settings.model_copy(update=settings) if settings else self.settings)
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return TestClient(app, client=CLIENT, headers=headers)


def _result_file(folder: Path, sop_class: str) -> tuple[str, Path]:
    """A small DICOM object with pixels (the preview renders it), as the worker would have stored it."""
    uid = generate_uid()
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = UID(sop_class)
    ds.file_meta.MediaStorageSOPInstanceUID = uid
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, uid
    ds.Rows = ds.Columns = 8
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit, ds.PixelRepresentation = 7, 0
    ds.PixelData = np.arange(64, dtype=np.uint8).tobytes()
    path = folder / f"{uid}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return uid, path


def make_world(url: str, home: Path) -> World:
    upgrade(url)
    settings = Settings(home=home / "var", database_url=url, stow_users=["reader"], min_free_bytes=0)
    with session_scope(url) as session:
        create_user(session, "reader", PASSWORD)
    study = add_study(settings, probabilities=COVID)
    uids = {}
    with session_scope(url) as session:
        instance = session.scalars(select(Instance).join(Study).where(Study.study_instance_uid == study)).one()
        prediction = session.scalars(select(Prediction).where(Prediction.instance_id == instance.id)).one()
        for kind, sop_class in (("sr", SR_CLASS), ("heatmap", str(SecondaryCaptureImageStorage))):
            uid, path = _result_file(home, sop_class)
            session.add(
                ResultObject(
                    instance_id=instance.id,
                    prediction_id=prediction.id,
                    kind=kind,
                    sop_class_uid=sop_class,
                    sop_instance_uid=uid,
                    series_instance_uid=generate_uid(),
                    path=str(path),
                    status=ResultStatus.STORED,
                )
            )
            uids[kind] = uid
    return World(settings, study, uids["sr"], uids["heatmap"])


@pytest.fixture
def world(db_url: str, tmp_path: Path) -> World:
    return make_world(db_url, tmp_path)


@pytest.fixture
def sqlite_world(tmp_path: Path) -> World:
    return make_world(f"sqlite:///{tmp_path / 'audit.sqlite3'}", tmp_path)


def events(url: str) -> list[AuditEvent]:
    return list(export_events(url))


# --- every route is audited or exempt ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Access:
    """How to call one audited route, and what its record says."""

    call: Callable[[TestClient, World], Any]  # the response
    action: AuditAction
    study: Callable[[World], str | None] = lambda w: w.study
    obj: Callable[[World], str | None] = lambda w: None
    status: int = 200
    signed_in: bool = True  # the client carries a bearer token


# One entry per audited route: a route added with an audit action and no entry here fails
# test_each_access_path_leaves_exactly_one_record; a route added without an action fails create_app.
ACCESS: dict[str, Access] = {
    "GET /api/worklist": Access(lambda c, w: c.get("/api/worklist"), AuditAction.VIEW_WORKLIST, lambda w: None),
    "GET /": Access(lambda c, w: c.get("/"), AuditAction.VIEW_WORKLIST, lambda w: None),
    "GET /api/studies/{study_instance_uid}": Access(
        lambda c, w: c.get(f"/api/studies/{w.study}"), AuditAction.VIEW_STUDY
    ),
    "GET /studies/{study_instance_uid}": Access(lambda c, w: c.get(f"/studies/{w.study}"), AuditAction.VIEW_STUDY),
    "PUT /api/studies/{study_instance_uid}/read": Access(
        lambda c, w: c.put(f"/api/studies/{w.study}/read", json={"read": True}), AuditAction.SET_READ
    ),
    "PUT /api/studies/{study_instance_uid}/priority": Access(
        lambda c, w: c.put(f"/api/studies/{w.study}/priority", json={"priority": "high"}), AuditAction.SET_PRIORITY
    ),
    "PUT /api/studies/{study_instance_uid}/finding": Access(
        lambda c, w: c.put(f"/api/studies/{w.study}/finding", json={"finding": "Pneumonia"}), AuditAction.SET_FINDING
    ),
    "GET /api/results/{sop_instance_uid}": Access(
        lambda c, w: c.get(f"/api/results/{w.sr}"), AuditAction.DOWNLOAD_RESULT, obj=lambda w: w.sr
    ),
    "GET /api/results/{sop_instance_uid}/preview.png": Access(
        lambda c, w: c.get(f"/api/results/{w.heatmap}/preview.png"),
        AuditAction.DOWNLOAD_RESULT,
        obj=lambda w: w.heatmap,
    ),
    "POST /dicomweb/studies": Access(
        lambda c, w: c.post("/dicomweb/studies", content=STOW_BODY, headers={"Content-Type": STOW_CONTENT_TYPE}),
        AuditAction.STORE_INSTANCES,
        lambda w: str(STOW_INSTANCE.StudyInstanceUID),
    ),
    "POST /api/login": Access(
        lambda c, w: c.post("/api/login", json={"username": "reader", "password": PASSWORD}),
        AuditAction.LOGIN,
        lambda w: None,
        signed_in=False,
    ),
    "POST /login": Access(
        lambda c, w: c.post("/login", data={"username": "reader", "password": PASSWORD}, follow_redirects=False),
        AuditAction.LOGIN,
        lambda w: None,
        status=303,
        signed_in=False,
    ),
    "POST /api/logout": Access(lambda c, w: c.post("/api/logout"), AuditAction.LOGOUT, lambda w: None, status=204),
    "POST /logout": Access(
        lambda c, w: c.post("/logout", follow_redirects=False), AuditAction.LOGOUT, lambda w: None, status=303
    ),
}


def test_every_route_is_audited_or_exempt_and_a_new_route_without_an_action_is_found(sqlite_world: World) -> None:
    app = create_app(sqlite_world.settings)
    assert unaudited_routes(app) == []
    assert set(audited_routes(app)) == set(ACCESS), "each audited route has a case in ACCESS"

    def new_patient_list() -> list[str]:
        return [PATIENT]

    app.get("/api/patients")(new_patient_list)
    router = APIRouter(prefix="/api/v2")
    router.get("/studies")(new_patient_list)
    app.include_router(router)
    assert unaudited_routes(app) == ["GET /api/patients", "GET /api/v2/studies"]


def test_the_exempt_routes_return_no_patient_data(sqlite_world: World) -> None:
    with sqlite_world.client(token=sqlite_world.token()) as client:
        for key in EXEMPT:
            method, path = key.split(" ", 1)
            if method != "GET":
                continue
            response = client.get(path)
            assert response.status_code == 200, key
            assert PATIENT not in response.text and "PID-" not in response.text, key
    assert events(sqlite_world.url) == [], "nothing exempt is recorded"


def test_every_action_has_an_atna_event() -> None:
    assert set(EVENTS) == set(AuditAction)
    assert all(len(action) <= 32 for action in AuditAction)  # audit_events.action is String(32)


# --- each access leaves one record ---------------------------------------------------------------------------------


def test_each_access_path_leaves_exactly_one_record(world: World) -> None:
    with structlog.testing.capture_logs() as logs:
        for key, access in ACCESS.items():
            before = len(events(world.url))
            with world.client(token=world.token() if access.signed_in else None) as client:
                response = access.call(client, world)
            assert response.status_code == access.status, (key, response.text)
            new = events(world.url)[before:]
            assert len(new) == 1, (key, [(e.action, e.via) for e in new])
            event = new[0]
            assert (event.username, event.action, event.client_address) == ("reader", access.action, CLIENT[0]), key
            assert event.study_instance_uid == access.study(world), key
            assert event.object_id == access.obj(world), key
            assert (event.http_status, event.outcome) == (access.status, AuditOutcome.SUCCESS), key
            assert event.via == key
    recorded = {e.via: e for e in events(world.url)}
    assert recorded["GET /api/results/{sop_instance_uid}"].study_instance_uid == world.study
    assert recorded["GET /api/results/{sop_instance_uid}"].sop_class_uid == SR_CLASS
    assert recorded["PUT /api/studies/{study_instance_uid}/read"].details == "read=true"
    assert recorded["PUT /api/studies/{study_instance_uid}/priority"].details == "priority=high"
    assert recorded["PUT /api/studies/{study_instance_uid}/finding"].details == "finding=Pneumonia"
    assert recorded["GET /api/worklist"].details == "1 of 1 studies; query (none)"
    assert recorded["POST /dicomweb/studies"].details == "1 stored, 0 failed"
    assert PATIENT not in repr(logs) and "PID-" not in repr(logs), "no patient name or ID in any log line"
    exported = [json.dumps(e.__dict__, default=str) for e in events(world.url)]
    assert not any(PATIENT in line or "PID-" in line for line in exported), "the trail names studies, not patients"


def test_refusals_are_recorded_as_failures_and_anonymous_requests_not_at_all(sqlite_world: World) -> None:
    world = sqlite_world
    with world.client() as anonymous:
        assert anonymous.get("/api/worklist").status_code == 401
        assert anonymous.get(f"/studies/{world.study}").status_code == 401
        assert (
            anonymous.post("/api/login", json={"username": "reader", "password": "wrong password"}).status_code == 401
        )
    with world.client(token=world.token()) as client:
        assert client.get("/api/studies/9.9.9").status_code == 404
        assert client.get("/api/results/1.2.3/preview.png").status_code == 404
        assert client.get("/studies/not-a-uid").status_code == 404
        assert client.get("/api/worklist", params={"limit": 0}).status_code == 422
    found = [
        (e.action, e.username, e.study_instance_uid, e.object_id, e.http_status, e.outcome) for e in events(world.url)
    ]
    assert found == [
        ("login", "reader", None, None, 401, AuditOutcome.MINOR_FAILURE),
        ("view-study", "reader", "9.9.9", None, 404, AuditOutcome.MINOR_FAILURE),
        ("download-result", "reader", None, "1.2.3", 404, AuditOutcome.MINOR_FAILURE),
        ("view-study", "reader", None, None, 404, AuditOutcome.MINOR_FAILURE),
        ("view-worklist", "reader", None, None, 422, AuditOutcome.MINOR_FAILURE),
    ], "an anonymous request sees nothing and is not recorded; a login attempt is"
    assert events(world.url)[3].details == "not a UID"


def test_a_read_that_cannot_be_recorded_is_refused_and_a_change_is_not_made(
    sqlite_world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    world = sqlite_world
    token = world.token()

    def broken(*_: Any, **__: Any) -> AuditEvent:
        raise sa_exc.OperationalError("INSERT INTO audit_events", {}, Exception("disk I/O error"))

    monkeypatch.setattr("worklist.audit.append", broken)
    app = create_app(world.settings)
    with TestClient(
        app, client=CLIENT, headers={"Authorization": f"Bearer {token}"}, raise_server_exceptions=False
    ) as c:
        listed = c.get("/api/worklist")
        assert listed.status_code == 503 and listed.json() == {"detail": "audit trail unavailable"}
        assert PATIENT not in listed.text
        assert c.get(f"/studies/{world.study}").status_code == 503
        assert c.put(f"/api/studies/{world.study}/read", json={"read": True}).status_code == 500
    with session_scope(world.url) as session:
        entry = session.scalars(select(WorklistEntry)).one()
        assert entry.read_at is None, "the change rolled back with its record"


# --- append-only ---------------------------------------------------------------------------------------------------


def _one_event() -> NewAuditEvent:
    return NewAuditEvent(
        username="reader",
        action=AuditAction.VIEW_STUDY,
        client_address="10.0.0.9",
        via="GET /api/studies/{study_instance_uid}",
        outcome=AuditOutcome.SUCCESS,
        http_status=200,
        study_instance_uid="1.2.3",
    )


def test_the_database_refuses_to_update_or_delete_an_audit_event(db_url: str) -> None:
    upgrade(db_url)
    downgrade(db_url, "0006")  # the triggers (and PostgreSQL's function) go and come back with the table
    upgrade(db_url)
    with session_scope(db_url) as session:
        append(session, _one_event())
    statements = ["UPDATE audit_events SET username = 'someone else'", "DELETE FROM audit_events"]
    if db_url.startswith("postgresql"):
        statements.append("TRUNCATE audit_events")
    for statement in statements:
        with pytest.raises(sa_exc.DBAPIError, match="audit_events is append-only"), session_scope(db_url) as session:
            session.execute(text(statement))
    with pytest.raises(PermissionError), session_scope(db_url) as session:
        session.scalars(select(AuditEvent)).one().details = "edited"
    with pytest.raises(PermissionError), session_scope(db_url) as session:
        session.delete(session.scalars(select(AuditEvent)).one())
    [event] = events(db_url)
    assert (event.username, event.details) == ("reader", None)


def test_an_event_is_valid_once_built() -> None:
    with pytest.raises(ValueError, match="not a UID"):
        NewAuditEvent(**{**_one_event().__dict__, "study_instance_uid": "Doe^Jane"})
    long = NewAuditEvent(**{**_one_event().__dict__, "details": "x" * 900})
    assert long.details is not None and len(long.details) == 500


# --- export --------------------------------------------------------------------------------------------------------


@pytest.fixture
def cli_env(world: World, monkeypatch: pytest.MonkeyPatch) -> Iterator[World]:
    from cxr_triage import settings as settings_module

    monkeypatch.setenv("CXR_DATABASE_URL", world.url)
    monkeypatch.setenv("CXR_HOME", str(world.settings.home))
    settings_module.get_settings.cache_clear()
    yield world
    settings_module.get_settings.cache_clear()


def _cli(*args: str, stdin: str | None = None) -> Any:
    from service.cli import app

    result = CliRunner().invoke(app, list(args), input=stdin)
    assert result.exit_code == 0, result.output
    return result


def test_the_export_is_complete_ordered_and_parses(cli_env: World, tmp_path: Path) -> None:
    url = cli_env.url
    for i in range(25):
        with session_scope(url) as session:
            append(session, NewAuditEvent(**{**_one_event().__dict__, "details": f'n={i}, "quoted"\nline'}))
    middle = datetime.now(UTC)
    time.sleep(0.01)
    for i in range(25, 40):
        with session_scope(url) as session:
            append(session, NewAuditEvent(**{**_one_event().__dict__, "details": f"n={i}"}))
    assert [e.details for e in export_events(url, page_size=7)][-1] == "n=39", "pages follow each other"

    first = _cli("audit", "export", "--until", middle.isoformat(), "--format", "csv")
    rows = list(csv.DictReader(io.StringIO(first.stdout)))
    assert len(rows) == 25 and list(rows[0]) == list(EXPORT_COLUMNS)
    assert [row["details"] for row in rows] == [f'n={i}, "quoted"\nline' for i in range(25)]
    assert [int(row["id"]) for row in rows] == sorted(int(row["id"]) for row in rows)
    assert rows[0]["study_instance_uid"] == "1.2.3" and rows[0]["client_address"] == "10.0.0.9"

    later = _cli("audit", "export", "--since", middle.isoformat(), "--format", "json", "-o", str(tmp_path / "a.json"))
    assert "exported 16 audit events" in later.output, "15 events and the first export"
    records = json.loads((tmp_path / "a.json").read_text())
    details = [r["details"] for r in records]
    assert details[:15] == [f"n={i}" for i in range(25, 40)]
    assert records[-1]["action"] == "export-audit", "the first export is in the trail; this one is not yet"
    assert "25 events csv" in records[-1]["details"] and records[-1]["via"] == "cli audit export"
    everything = _cli("audit", "export", "--since", "2000-01-01")
    assert len(list(csv.DictReader(io.StringIO(everything.stdout)))) == 42


def test_users_changes_from_the_command_line_are_recorded(cli_env: World) -> None:
    _cli("users", "create", "dr.new", "--password-stdin", stdin="a long passphrase\n")
    _cli("users", "passwd", "dr.new", "--password-stdin", stdin="another long passphrase\n")
    _cli("users", "token", "dr.new", "--name", "pacs-bridge")
    _cli("users", "disable", "dr.new")
    _cli("users", "list")
    from service.cli import app

    refused = CliRunner().invoke(app, ["users", "create", "dr.short", "--password-stdin"], input="short\n")
    assert refused.exit_code == 2
    found = [(e.action, e.object_id, e.via, e.http_status) for e in events(cli_env.url)]
    assert found == [
        ("user-create", "dr.new", "cli users create", None),
        ("user-password", "dr.new", "cli users passwd", None),
        ("user-token", "dr.new", "cli users token", None),
        ("user-disable", "dr.new", "cli users disable", None),
    ], "each change once; a list changes nothing and a refused change is not made"
    assert all(e.username and e.client_address == socket.gethostname() for e in events(cli_env.url))
    assert events(cli_env.url)[2].details == "token name pacs-bridge"


# --- syslog --------------------------------------------------------------------------------------------------------

SYSLOG = re.compile(rb"^<(\d+)>1 (\S+) (\S+) cxr-triage (\d+) IHE\+RFC-3881 - \xef\xbb\xbf(<\?xml .*)$", re.S)


def _parse(message: bytes) -> tuple[int, ElementTree.Element]:
    match = SYSLOG.match(message)
    assert match, message[:200]
    return int(match[1]), ElementTree.fromstring(match[5])


def _code(element: ElementTree.Element | None) -> str | None:
    return element.get("csd-code") if element is not None else None


def test_each_event_is_sent_to_syslog_over_udp_as_an_atna_audit_message(sqlite_world: World) -> None:
    world = sqlite_world
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as receiver:
        receiver.bind(("127.0.0.1", 0))
        receiver.settimeout(10)
        target = f"udp://127.0.0.1:{receiver.getsockname()[1]}"
        with world.client(token=world.token(), audit_syslog=target) as client:
            assert client.get(f"/api/studies/{world.study}").status_code == 200
            assert client.get(f"/api/results/{world.sr}").status_code == 200
        messages = [receiver.recv(65536), receiver.recv(65536)]
    assert all(PATIENT.encode() not in m and b"PID-" not in m for m in messages)
    (pri, study), (_, download) = map(_parse, messages)
    assert pri == 10 * 8 + 5, "facility authpriv, severity notice"
    event = study.find("EventIdentification")
    assert event is not None and event.get("EventActionCode") == "R" and event.get("EventOutcomeIndicator") == "0"
    assert _code(event.find("EventID")) == "110111"
    requestor, application = study.findall("ActiveParticipant")
    assert requestor.get("UserID") == "reader" and requestor.get("UserIsRequestor") == "true"
    assert requestor.get("NetworkAccessPointID") == CLIENT[0] and requestor.get("NetworkAccessPointTypeCode") == "2"
    assert application.get("AlternativeUserID") == "GET /api/studies/{study_instance_uid}"
    source = study.find("AuditSourceIdentification")
    assert source is not None and source.get("AuditSourceID") == socket.gethostname()
    [participant] = study.findall("ParticipantObjectIdentification")
    assert participant.get("ParticipantObjectID") == world.study
    assert _code(participant.find("ParticipantObjectIDTypeCode")) == "110180"
    assert _code(download.find("EventIdentification/EventID")) == "110104"
    instance = download.find("ParticipantObjectIdentification/SOPClass/Instance")
    assert instance is not None and instance.get("UID") == world.sr
    assert len(events(world.url)) == 2, "the database has the record too"


class FramedReceiver:
    """A TCP (optionally TLS) syslog receiver that reads octet-counted frames: "LENGTH SP MESSAGE" (RFC 5425)."""

    def __init__(self, context: ssl.SSLContext | None = None) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.context = context
        self.frames: list[bytes] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        conn, _ = self.server.accept()
        if self.context is not None:
            conn = self.context.wrap_socket(conn, server_side=True)
        with conn, conn.makefile("rb") as stream:
            while length := self._length(stream):
                self.frames.append(stream.read(length))

    @staticmethod
    def _length(stream: Any) -> int:
        digits = b""
        while (byte := stream.read(1)) not in (b" ", b""):
            digits += byte
        return int(digits or 0)

    def close(self) -> None:
        self.server.close()


@pytest.mark.parametrize("scheme", ["tcp", "tls"])
def test_syslog_over_tcp_and_tls_frames_each_message(sqlite_world: World, tmp_path: Path, scheme: str) -> None:
    world = sqlite_world
    extra: dict[str, Any] = {}
    context = None
    if scheme == "tls":
        cert, key = self_signed_cert(tmp_path)
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(cert, key)
        extra["audit_syslog_ca"] = cert
    receiver = FramedReceiver(context)
    try:
        with world.client(token=world.token(), audit_syslog=f"{scheme}://127.0.0.1:{receiver.port}", **extra) as c:
            c.get("/api/worklist")
            c.put(f"/api/studies/{world.study}/read", json={"read": True})
        # leaving the client ran the app's shutdown: what was queued has been sent
        deadline = time.monotonic() + 10
        while len(receiver.frames) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        receiver.close()
    (_, listed), (_, changed) = map(_parse, receiver.frames)
    assert _code(listed.find("EventIdentification/EventID")) == "110112"
    query = listed.find("ParticipantObjectIdentification/ParticipantObjectQuery")
    assert query is not None and base64.b64decode(query.text or "").decode() == "1 of 1 studies; query (none)"
    assert changed.find("EventIdentification").get("EventActionCode") == "U"  # type: ignore[union-attr]


def test_a_syslog_receiver_that_is_down_fails_no_request(sqlite_world: World) -> None:
    world = sqlite_world
    with structlog.testing.capture_logs() as logs:
        with world.client(token=world.token(), audit_syslog=f"tcp://127.0.0.1:{free_port()}") as client:
            started = time.monotonic()
            assert client.get("/api/worklist").status_code == 200
            assert time.monotonic() - started < 2, "the request does not wait for syslog"
        failed = [entry for entry in logs if entry["event"] == "audit.syslog_failed"]
    assert failed and failed[0]["error"] == "ConnectionRefusedError"
    assert len(events(world.url)) == 1, "the database row is the record"
