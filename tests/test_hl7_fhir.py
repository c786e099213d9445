"""HL7 v2 to the RIS and FHIR out: built with the libraries, sent to real servers started here, once per change,
retried while the destination is down, every attempt recorded like the DICOM deliveries.

The MLLP listener is a socket server in a thread that checks the framing (0x0B ... 0x1C 0x0D), parses each message
with hl7apy and answers an ACK (AA, or the codes a test scripts); the FHIR server is http.server in a thread that
validates every posted Bundle with fhir.resources and can answer 503 first.
"""

from __future__ import annotations

import json
import socket
import socketserver
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pydicom
import pytest
from fhir.resources.R4B import get_fhir_model_class
from fhir.resources.R4B.bundle import Bundle
from hl7apy.core import Message
from hl7apy.parser import parse_message
from sqlalchemy import create_engine, func, inspect, select, text

from cxr_triage.labels import CLASS_LABELS
from cxr_triage.registry import Registry
from cxr_triage.result_kinds import RESULT_KINDS, Transport, Trigger, enabled_kinds
from cxr_triage.settings import Settings
from db import repo
from db.migrate import downgrade, upgrade
from db.models import DeliveryAttempt, Instance, Prediction, ResultObject, ResultStatus, Study
from db.session import session_scope
from db.worklist_models import User
from db.worklist_repo import assign_priority, set_user_priority
from tests.conftest import DICOM_DIR, free_port, make_tiny_registry, received_instance
from workers.delivery import MESSAGE_BUILDERS, SENDERS, Delivery, deliver
from workers.ensemble import EnsembleProvider
from workers.hl7 import END_BLOCK, START_BLOCK, escape, person_name
from workers.interfaces import AI_DISCLAIMER, MessageContext
from workers.results import BUILDERS, RESULT_BUILDERS
from workers.sr import FINDING_CODES, PROBABILITY_CODES
from workers.triage import triage_instance

CHEST = DICOM_DIR / "cr_chest_siim_jpeg_baseline_8bit.dcm"
ROUTINE_RESULT = {"COVID-19": 0.02, "Pneumonia": 0.03, "No finding": 0.95}
STAT_RESULT = {"COVID-19": 0.9, "Pneumonia": 0.05, "No finding": 0.05}
STUDY = "1.2.826.0.1.3680043.10.1.1"
PATIENT = {"patient_id": "PID-4711", "patient_name": "Doe^Jane", "accession_number": "ACC-17"}


# --- the RIS: an MLLP listener ------------------------------------------------------------------------------------


@dataclass
class MllpListener:
    """A RIS stand-in: checks MLLP framing, parses each message with hl7apy, answers an ACK (scripted codes first)."""

    port: int
    codes: list[str] = field(default_factory=list)  # answered in order, then AA
    messages: list[Message] = field(default_factory=list)
    raw: list[str] = field(default_factory=list)
    framing_errors: list[str] = field(default_factory=list)
    _server: socketserver.ThreadingTCPServer | None = None

    def start(self) -> None:
        listener = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                data = b""
                while not data.endswith(END_BLOCK):
                    chunk = self.request.recv(65536)
                    if not chunk:
                        return
                    data += chunk
                if not data.startswith(START_BLOCK) or data.count(START_BLOCK) != 1:
                    listener.framing_errors.append(repr(data[:20]))
                text = data[1 : -len(END_BLOCK)].decode("utf-8")
                # hl7apy groups an ORU^R01; its v2.5.1 ORM^O01 groups do not parse back, so that one is read by segment
                message = parse_message(text.strip("\r"), find_groups="|ORU^R01^" in text)
                listener.raw.append(text)
                listener.messages.append(message)
                code = listener.codes.pop(0) if listener.codes else "AA"
                ack = Message("ACK", version="2.5.1")
                ack.msh.msh_3 = "RIS"
                ack.msh.msh_9 = "ACK^R01^ACK"
                ack.msh.msh_10 = f"ACK{len(listener.messages)}"
                ack.msh.msh_11 = "P"
                ack.msa.msa_1 = code
                ack.msa.msa_2 = message.msh.msh_10.value
                self.request.sendall(START_BLOCK + ack.to_er7().encode() + END_BLOCK)

        socketserver.ThreadingTCPServer.allow_reuse_address = True
        self._server = socketserver.ThreadingTCPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()


@pytest.fixture
def ris() -> Iterator[MllpListener]:
    listener = MllpListener(free_port())  # not started: a test starts it when the RIS should be up
    yield listener
    listener.stop()


# --- a FHIR server ------------------------------------------------------------------------------------------------


@dataclass
class FhirServer:
    """Validates every POSTed Bundle with fhir.resources (R4B = R4 for these resources); scripted statuses first."""

    port: int
    statuses: list[int] = field(default_factory=list)
    bundles: list[Bundle] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    _server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/fhir"

    def start(self) -> None:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                server.headers.append(dict(self.headers))
                status = server.statuses.pop(0) if server.statuses else 200
                if status == 200:
                    try:
                        bundle = Bundle.model_validate_json(body)
                        for raw in json.loads(body)["entry"]:  # each entry again, as its own resource type
                            get_fhir_model_class(raw["resource"]["resourceType"]).model_validate(raw["resource"])
                        server.bundles.append(bundle)
                    except Exception as exc:
                        server.errors.append(str(exc))
                        status = 422
                answer = json.dumps({"resourceType": "Bundle", "type": "transaction-response"}).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/fhir+json")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()


@pytest.fixture
def fhir_server() -> Iterator[FhirServer]:
    server = FhirServer(free_port())
    yield server
    server.stop()


# --- helpers ------------------------------------------------------------------------------------------------------


def _settings(db_url: str, tmp_path: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "home": tmp_path / "var",
        "database_url": db_url,
        "models_dir": tmp_path / "models",
        "results_heatmap": False,
        "hl7_timeout_s": 5.0,
        "fhir_timeout_s": 5.0,
        **overrides,
    }
    return Settings(**values)


def _receive(url: str, sop: str, *, study: str = STUDY, **fields: Any) -> int:
    with session_scope(url) as session:
        instance, _ = repo.record_received(
            session, received_instance(sop, CHEST, study_instance_uid=study, **{**PATIENT, **fields})
        )
        repo.mark_queued(session, instance.id)
        return instance.id


def _store_result(url: str, settings: Settings, instance_id: int, probabilities: dict[str, float]) -> int:
    """What the worker's transaction does for a live result: the prediction, then the priority (and its messages)."""
    label = max(probabilities, key=lambda k: probabilities[k])
    with session_scope(url) as session:
        instance = session.get(Instance, instance_id)
        assert instance is not None
        record = repo.PredictionRecord(
            model_set="demo",
            model_versions=["mobilenetv2_100-test"],
            label=label,
            probabilities=probabilities,
            member_probabilities={"mobilenetv2_100-test": probabilities},
            queue_wait_ms=None,
            decode_ms=1.0,
            inference_ms=1.0,
            not_for_clinical_use=True,
        )
        prediction = repo.save_prediction(session, instance, record)
        assign_priority(session, instance_id, settings)
        return prediction.id


def _set_user_priority(url: str, settings: Settings, study_uid: str, priority: str | None) -> str:
    with session_scope(url) as session:
        user = session.scalar(select(User).where(User.username == "radiologist"))
        if user is None:
            user = User(username="radiologist", password_hash="x")
            session.add(user)
            session.flush()
        study = session.scalars(select(Study).where(Study.study_instance_uid == study_uid).with_for_update()).one()
        return set_user_priority(session, study, priority, user_id=user.id, settings=settings).priority


def _rows(url: str, kind: str) -> list[ResultObject]:
    with session_scope(url) as session:
        rows = session.scalars(select(ResultObject).where(ResultObject.kind == kind).order_by(ResultObject.id)).all()
        session.expunge_all()
        return list(rows)


def _deliver_pending(settings: Settings, kind: str) -> list[Delivery]:
    url = settings.effective_database_url
    return [
        deliver(settings, row.id, attempt=1).status
        for row in _rows(url, kind)
        if row.status in (ResultStatus.PENDING, ResultStatus.QUEUED)
    ]


def _obx(message: Message) -> dict[str, str]:
    """OBX-3 identifier -> OBX-5 value (as sent, escaped) of a message parsed with or without groups."""
    found = {}
    for segment in _segments(message):
        if segment.name == "OBX":
            found[segment.obx_3.obx_3_1.value] = segment.obx_5.to_er7()
    return found


def _segments(element: Any) -> list[Any]:
    if element.classname == "Segment":
        return [element]
    return [s for child in element.children for s in _segments(child)]


# --- the registry -------------------------------------------------------------------------------------------------


def test_each_kind_names_its_transport_its_settings_and_one_builder() -> None:
    for kind in RESULT_KINDS.values():
        assert set(kind.destination_settings) <= set(Settings.model_fields), kind.name
    assert set(SENDERS) == set(Transport)
    result_kinds = {k.name for k in RESULT_KINDS.values() if k.trigger is Trigger.RESULT}
    study_kinds = {k.name for k in RESULT_KINDS.values() if k.trigger is Trigger.STUDY}
    assert set(RESULT_BUILDERS) == result_kinds and set(MESSAGE_BUILDERS) == study_kinds
    assert set(BUILDERS) == set(RESULT_KINDS)
    assert (RESULT_KINDS["hl7"].transport, RESULT_KINDS["fhir"].transport) == (Transport.HL7, Transport.FHIR)
    # off by default: existing deployments produce and send what they did
    assert [k.name for k in enabled_kinds(Settings())] == ["sr", "heatmap"]
    on = Settings(hl7_host="ris.example", fhir_base_url="https://fhir.example/r4")
    assert [k.name for k in enabled_kinds(on)] == ["sr", "heatmap", "hl7", "fhir"]


def test_hl7_text_is_escaped_and_dicom_names_become_xpn() -> None:
    assert escape("a|b^c&d~e\\f\rg") == "a\\F\\b\\S\\c\\T\\d\\R\\e\\E\\f g"
    assert person_name("Doe^Jane^M^Dr^Jr") == "Doe^Jane^M^Jr^Dr"
    assert person_name("Doe^Jane=ド^ジェーン") == "Doe^Jane"
    assert person_name("O|Brien") == "O\\F\\Brien"


# --- the schema ---------------------------------------------------------------------------------------------------


def test_migration_0009_keeps_dicom_rows_and_agrees_with_the_models(db_url: str) -> None:
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    import db.audit_models
    import db.feedback_models  # noqa: F401
    from db.models import Base

    upgrade(db_url, "0008")
    now = datetime.now(UTC)
    engine = create_engine(db_url)
    with engine.begin() as conn:
        conn.execute(
            text("INSERT INTO studies (id, study_instance_uid, created_at) VALUES (1001, '1.2.3', :now)"), {"now": now}
        )
        conn.execute(
            text(
                "INSERT INTO instances (id, sop_instance_uid, sop_class_uid, study_id, transfer_syntax_uid, path, "
                "size_bytes, sha256, status, attempts, received_at, updated_at) VALUES (1001, '1.2.3.4', '1.2', 1001, "
                "'1.2.840.10008.1.2', '/x', 1, 'x', 'done', 1, :now, :now)"
            ),
            {"now": now},
        )
        conn.execute(
            text(
                "INSERT INTO predictions (id, instance_id, model_set, role, model_versions, label, probabilities, "
                "member_probabilities, decode_ms, inference_ms, not_for_clinical_use, created_at) VALUES (1001, 1001, "
                "'demo', 'live', '[]', 'Pneumonia', '{}', '{}', 1, 1, true, :now)"
            ),
            {"now": now},
        )
        conn.execute(
            text(
                "INSERT INTO result_objects (id, instance_id, prediction_id, kind, sop_class_uid, sop_instance_uid, "
                "series_instance_uid, path, status, attempts, created_at, updated_at) VALUES (1001, 1001, 1001, 'sr', "
                "'1.2.840.10008.5.1.4.1.1.88.34', '1.2.3.4.5', '1.2.3.4.6', '/r.dcm', 'delivered', 1, :now, :now)"
            ),
            {"now": now},
        )
        conn.execute(
            text(
                "INSERT INTO delivery_attempts (id, result_id, destination, dimse_status, at) "
                "VALUES (1001, 1001, 'PACS@h:104', 0, :now)"
            ),
            {"now": now},
        )
    upgrade(db_url)
    with engine.connect() as conn:
        diffs = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    ours = [d for d in diffs if any(t in repr(d) for t in ("result_objects", "delivery_attempts"))]
    assert ours == [], ours
    columns = {c["name"]: c for c in inspect(engine).get_columns("result_objects")}
    assert columns["sop_instance_uid"]["nullable"] and not columns["content_type"]["nullable"]
    with session_scope(db_url) as session:
        sr = session.get(ResultObject, 1001)
        assert sr is not None and (sr.content_type, sr.sop_instance_uid, sr.event) == (
            "application/dicom",
            "1.2.3.4.5",
            None,
        )
        session.add(
            ResultObject(
                instance_id=1001, prediction_id=1001, kind="hl7", content_type="x-application/hl7-v2+er7", event="stat",
                path="", status=ResultStatus.PENDING,
            )
        )  # fmt: skip
    downgrade(db_url, "0008")
    with engine.connect() as conn:
        assert conn.execute(text("SELECT kind FROM result_objects")).scalars().all() == ["sr"]
        assert conn.execute(text("SELECT count(*) FROM delivery_attempts")).scalar() == 1
        assert "content_type" not in {c["name"] for c in inspect(conn).get_columns("result_objects")}
    upgrade(db_url)
    engine.dispose()


# --- HL7 ----------------------------------------------------------------------------------------------------------


def test_hl7_oru_of_a_triage_reaches_the_ris_once_and_is_retried_while_it_is_down(
    db_url: str, tmp_path: Path, ris: MllpListener
) -> None:
    upgrade(db_url)
    make_tiny_registry(tmp_path / "models")
    settings = _settings(db_url, tmp_path, hl7_host="127.0.0.1", hl7_port=ris.port, hl7_receiving_application="RIS")
    instance_id = _receive(db_url, "1.2.826.0.1.3680043.10.1.2")
    provider = EnsembleProvider(Registry(settings.models_dir), device="cpu", poll_s=0)
    assert triage_instance(settings, instance_id, provider).status == "done"

    (row,) = _rows(db_url, "hl7")
    assert (row.path, row.sop_instance_uid, row.content_type) == ("", None, "x-application/hl7-v2+er7")
    # the RIS is down: recorded and retried
    first = deliver(settings, row.id, attempt=1)
    assert first.status is Delivery.RETRY
    ris.start()
    assert deliver(settings, row.id, attempt=2).status is Delivery.DELIVERED
    assert deliver(settings, row.id, attempt=3).status is Delivery.NOOP
    # a repeated triage (the same prediction stored again) and a repeated assignment make no second message
    with session_scope(db_url) as session:
        assign_priority(session, instance_id, settings)
        assign_priority(session, instance_id, settings)
    assert triage_instance(settings, instance_id, provider).status == "duplicate"
    assert len(_rows(db_url, "hl7")) == 1 and _deliver_pending(settings, "hl7") == []

    assert len(ris.messages) == 1 and ris.framing_errors == []
    message = ris.messages[0]
    with session_scope(db_url) as session:
        prediction = session.scalars(select(Prediction)).one()
        attempts = session.scalars(select(DeliveryAttempt).order_by(DeliveryAttempt.id)).all()
        assert [(a.answer, a.error is None) for a in attempts] == [(None, False), ("AA", True)]
        assert attempts[0].destination == f"MLLP 127.0.0.1:{ris.port}"
        stored = session.get(ResultObject, row.id)
        assert stored is not None and stored.status == ResultStatus.DELIVERED and stored.path.endswith(".hl7")
        label, probabilities, model_set = prediction.label, prediction.probabilities, prediction.model_set
        entry_priority = stored.event
    assert message.msh.msh_9.to_er7() == "ORU^R01^ORU_R01"
    assert message.msh.msh_10.value == f"CXR{row.id}" and message.msh.msh_5.to_er7() == "RIS"
    result = message.oru_r01_patient_result
    pid = result.oru_r01_patient.pid
    assert (pid.pid_3.to_er7(), pid.pid_5.to_er7()) == ("PID-4711", "Doe^Jane")
    order = result.oru_r01_order_observation
    assert order.obr.obr_3.to_er7() == "ACC-17" and order.obr.obr_25.value == "P"
    assert order.oru_r01_timing_qty.tq1.tq1_9.to_er7().split("^")[0] in ("S", "A", "R")
    obx = _obx(message)
    finding = FINDING_CODES[label]
    assert obx["121071"] == f"{finding.value}^{finding.meaning}^{finding.scheme_designator}"
    for name in CLASS_LABELS:
        assert float(obx[PROBABILITY_CODES[name].value]) == pytest.approx(probabilities[name], abs=1e-6)
    assert obx["PRIORITY"] == entry_priority
    assert obx["111001"] == f"cxr-triage {model_set}"
    assert obx["121106"] == AI_DISCLAIMER
    assert obx["113014"] == STUDY


@pytest.mark.parametrize("mode", ["oru", "priority"])
def test_hl7_message_once_per_change_of_the_study(db_url: str, tmp_path: Path, ris: MllpListener, mode: str) -> None:
    upgrade(db_url)
    settings = _settings(db_url, tmp_path, hl7_host="127.0.0.1", hl7_port=ris.port, hl7_message=mode)
    ris.start()
    study = "1.2.826.0.1.3680043.10.2.1"
    first = _receive(db_url, "1.2.826.0.1.3680043.10.2.2", study=study)
    second = _receive(db_url, "1.2.826.0.1.3680043.10.2.3", study=study)

    steps: list[tuple[str, int]] = []

    def count(step: str) -> None:
        steps.append((step, len(_rows(db_url, "hl7"))))

    _store_result(db_url, settings, first, ROUTINE_RESULT)  # a result; the study stays routine
    count("routine result")
    _store_result(db_url, settings, first, ROUTINE_RESULT)  # the same result stored again
    count("repeated")
    assert _set_user_priority(db_url, settings, study, "high") == "high"  # a change
    count("user high")
    assert _set_user_priority(db_url, settings, study, "high") == "high"  # no change
    count("user high again")
    _store_result(db_url, settings, second, STAT_RESULT)  # a result that raises it: a change
    count("stat result")
    assert _set_user_priority(db_url, settings, study, None) == "stat"  # cleared, but the AI keeps it stat
    count("user cleared")

    if mode == "oru":  # every result, and every change
        expected = [("routine result", 1), ("repeated", 1), ("user high", 2), ("user high again", 2),
                    ("stat result", 3), ("user cleared", 3)]  # fmt: skip
        reported = ["routine", "high", "stat"]
    else:  # only changes of the priority the RIS has (the order asked for none: routine)
        expected = [("routine result", 0), ("repeated", 0), ("user high", 1), ("user high again", 1),
                    ("stat result", 2), ("user cleared", 2)]  # fmt: skip
        reported = ["high", "stat"]
    assert steps == expected
    rows = _rows(db_url, "hl7")
    assert [r.event for r in rows] == reported
    with session_scope(db_url) as session:  # the outbox would send them too
        due = repo.results_to_send(session, stale_before=repo.stale_cutoff(900))
        assert [r.id for r in rows] == [i for i in due if i in {r.id for r in rows}]
    assert _deliver_pending(settings, "hl7") == [Delivery.DELIVERED] * len(reported)
    assert _deliver_pending(settings, "hl7") == []

    assert len(ris.messages) == len(reported) and ris.framing_errors == []
    assert len({m.msh.msh_10.value for m in ris.messages}) == len(reported)
    codes = {"routine": "R", "high": "A", "stat": "S"}
    for message, priority in zip(ris.messages, reported, strict=True):
        obx = _obx(message)
        assert obx["PRIORITY"] == priority and obx["121106"] == AI_DISCLAIMER
        if mode == "oru":
            assert message.msh.msh_9.to_er7() == "ORU^R01^ORU_R01"
            order = message.oru_r01_patient_result.oru_r01_order_observation
            assert order.oru_r01_timing_qty.tq1.tq1_9.to_er7().startswith(codes[priority] + "^")
            assert "121071" in obx
        else:
            assert message.msh.msh_9.to_er7() == "ORM^O01^ORM_O01"
            assert message.orc.orc_1.value == "XO" and message.orc.orc_3.to_er7() == "ACC-17"
            assert message.orc.orc_7.to_er7() == f"^^^^^{codes[priority]}"
            assert message.obr.obr_27.to_er7() == f"^^^^^{codes[priority]}"
            assert message.nte.nte_3.to_er7() == AI_DISCLAIMER
            assert "121071" not in obx  # an order update carries no finding
    with session_scope(db_url) as session:
        states = repo.delivery_states(session, [session.scalars(select(Study.id)).one()])
        assert next(iter(states.values()))["hl7"] == ResultStatus.DELIVERED
        assert repo.result_counts(session)[("hl7", ResultStatus.DELIVERED)] == len(reported)


def test_hl7_errors_are_retried_and_rejections_are_final(db_url: str, tmp_path: Path, ris: MllpListener) -> None:
    upgrade(db_url)
    settings = _settings(db_url, tmp_path, hl7_host="127.0.0.1", hl7_port=ris.port, results_send_max_retries=5)
    ris.codes = ["AE", "AR"]
    ris.start()
    _store_result(db_url, settings, _receive(db_url, "1.2.826.0.1.3680043.10.3.1"), ROUTINE_RESULT)
    (row,) = _rows(db_url, "hl7")
    assert deliver(settings, row.id, attempt=1).status is Delivery.RETRY  # AE: an error while processing
    assert deliver(settings, row.id, attempt=2).status is Delivery.FAILED  # AR: rejected, final before max retries
    with session_scope(db_url) as session:
        answers = session.scalars(select(DeliveryAttempt.answer).order_by(DeliveryAttempt.id)).all()
        assert answers == ["AE", "AR"]
        failed = session.get(ResultObject, row.id)
        assert failed is not None and failed.status == ResultStatus.FAILED and "AR" in (failed.last_error or "")
    assert ris.messages[0].msh.msh_10.value == ris.messages[1].msh.msh_10.value  # the same message, resent


def test_hl7_settings_off_make_no_message(db_url: str, tmp_path: Path) -> None:
    upgrade(db_url)
    settings = _settings(db_url, tmp_path)
    study = "1.2.826.0.1.3680043.10.4.1"
    _store_result(db_url, settings, _receive(db_url, "1.2.826.0.1.3680043.10.4.2", study=study), STAT_RESULT)
    _set_user_priority(db_url, settings, study, "stat")
    with session_scope(db_url) as session:
        assert session.scalar(select(func.count()).select_from(ResultObject)) == 0


def test_a_message_whose_result_is_gone_fails_without_retrying(tmp_path: Path, ris: MllpListener) -> None:
    url = f"sqlite:///{tmp_path / 'db.sqlite3'}"
    upgrade(url)
    settings = _settings(url, tmp_path, hl7_host="127.0.0.1", hl7_port=ris.port, hl7_message="oru")
    _store_result(url, settings, _receive(url, "1.2.826.0.1.3680043.10.5.1"), ROUTINE_RESULT)
    (row,) = _rows(url, "hl7")
    with session_scope(url) as session:
        stored = session.get(ResultObject, row.id)
        assert stored is not None
        stored.event = "no-such-priority"
    outcome = deliver(settings, row.id, attempt=1)
    assert outcome.status is Delivery.FAILED and "not built" in outcome.detail
    assert ris.messages == []


def test_message_context_builds_the_same_bytes_again(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'db.sqlite3'}"
    upgrade(url)
    settings = _settings(url, tmp_path, hl7_host="127.0.0.1")
    _store_result(url, settings, _receive(url, "1.2.826.0.1.3680043.10.6.1"), ROUTINE_RESULT)
    (row,) = _rows(url, "hl7")
    with session_scope(url) as session:
        stored = session.get(ResultObject, row.id)
        assert stored is not None
        built = [MESSAGE_BUILDERS["hl7"](MessageContext.load(session, settings, stored)) for _ in range(2)]
    assert built[0] == built[1] and AI_DISCLAIMER.encode() in built[0]
    assert b"PID-4711" in built[0]  # to the RIS: allowed


# --- FHIR ---------------------------------------------------------------------------------------------------------


def test_fhir_bundle_of_a_triage_validates_and_is_posted_with_retries(
    db_url: str, tmp_path: Path, fhir_server: FhirServer
) -> None:
    upgrade(db_url)
    make_tiny_registry(tmp_path / "models")
    settings = _settings(db_url, tmp_path, fhir_base_url=fhir_server.url, fhir_token="s3cret")
    instance_id = _receive(db_url, "1.2.826.0.1.3680043.10.7.1")
    provider = EnsembleProvider(Registry(settings.models_dir), device="cpu", poll_s=0)
    assert triage_instance(settings, instance_id, provider).status == "done"
    (row,) = _rows(db_url, "fhir")
    assert row.content_type == "application/fhir+json" and row.sop_instance_uid is None
    assert row.destination == f"FHIR http://127.0.0.1:{fhir_server.port}/fhir"

    assert deliver(settings, row.id, attempt=1).status is Delivery.RETRY  # nobody listening
    fhir_server.statuses = [503]
    fhir_server.start()
    assert deliver(settings, row.id, attempt=2).status is Delivery.RETRY  # 503: retried
    assert deliver(settings, row.id, attempt=3).status is Delivery.DELIVERED
    assert deliver(settings, row.id, attempt=4).status is Delivery.NOOP
    with session_scope(db_url) as session:
        answers = session.scalars(select(DeliveryAttempt.answer).order_by(DeliveryAttempt.id)).all()
        assert answers == [None, "503", "200"]
        prediction = session.scalars(select(Prediction)).one()
        label, probabilities, model_set = prediction.label, prediction.probabilities, prediction.model_set
        states = repo.delivery_states(session, [session.scalars(select(Study.id)).one()])
        assert next(iter(states.values())) == {"sr": "stored", "fhir": "delivered"}

    assert fhir_server.errors == []
    (bundle,) = fhir_server.bundles
    assert fhir_server.headers[-1]["Authorization"] == "Bearer s3cret"
    assert fhir_server.headers[-1]["Content-Type"].startswith("application/fhir+json")
    assert bundle.type == "transaction"
    by_type: dict[str, list[Any]] = {}
    entries: list[Any] = list(bundle.entry or [])
    for entry in entries:
        by_type.setdefault(entry.resource.get_resource_type(), []).append(entry)
        assert entry.request.method == "POST" and entry.request.ifNoneExist.startswith("identifier=")
    assert {k: len(v) for k, v in by_type.items()} == {"Device": 1, "Observation": 4, "DiagnosticReport": 1}
    (device_entry,) = by_type["Device"]
    device = device_entry.resource
    assert device.deviceName[0].name == f"cxr-triage ensemble {model_set}"
    (report_entry,) = by_type["DiagnosticReport"]
    report = report_entry.resource
    assert report.status == "preliminary" and AI_DISCLAIMER in (report.conclusion or "")
    source = pydicom.dcmread(CHEST, stop_before_pixels=True)  # the Bundle, like the SR, says what the image says
    assert report.subject.identifier.value == source.PatientID
    assert [i.type for i in report.identifier] == [None]  # the image has no accession number
    assert report.imagingStudy[0].identifier.value == f"urn:oid:{source.StudyInstanceUID}"
    observations = {entry.fullUrl: entry.resource for entry in by_type["Observation"]}
    assert sorted(ref.reference for ref in report.result) == sorted(observations)
    finding = FINDING_CODES[label]
    scores = {}
    for observation in observations.values():
        assert observation.device.reference == device_entry.fullUrl
        assert AI_DISCLAIMER in [note.text for note in observation.note]
        coding = observation.code.coding[0]
        if coding.code == "121071":
            value = observation.valueCodeableConcept.coding[0]
            system = {"SCT": "http://snomed.info/sct", "DCM": "http://dicom.nema.org/resources/ontology/DCM"}
            assert (value.system, value.code) == (system[finding.scheme_designator], finding.value)
        else:
            scores[coding.code] = float(observation.valueQuantity.value)
            assert observation.valueQuantity.code == "1"
    assert scores == {PROBABILITY_CODES[n].value: pytest.approx(probabilities[n], abs=1e-6) for n in CLASS_LABELS}


def test_fhir_client_errors_are_final(tmp_path: Path, fhir_server: FhirServer) -> None:
    url = f"sqlite:///{tmp_path / 'db.sqlite3'}"
    upgrade(url)
    settings = _settings(url, tmp_path, fhir_base_url=fhir_server.url)
    fhir_server.statuses = [400]
    fhir_server.start()
    instance_id = _receive(url, "1.2.826.0.1.3680043.10.8.1")
    prediction_id = _store_result(url, settings, instance_id, ROUTINE_RESULT)
    ref = tmp_path / "bundle.json"
    ref.write_text(json.dumps({"resourceType": "Bundle", "type": "transaction"}))
    with session_scope(url) as session:  # a stored Bundle row, as the worker records it
        row = ResultObject(
            instance_id=instance_id, prediction_id=prediction_id, kind="fhir", content_type="application/fhir+json",
            path=str(ref), status=ResultStatus.PENDING,
        )  # fmt: skip
        session.add(row)
        session.flush()
        row_id = row.id
    outcome = deliver(settings, row_id, attempt=1)
    assert outcome.status is Delivery.FAILED and "HTTP 400" in outcome.detail  # the same Bundle never succeeds


def test_the_ris_port_answering_garbage_is_retried(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'db.sqlite3'}"
    upgrade(url)
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    port = server.getsockname()[1]

    def answer() -> None:
        conn, _ = server.accept()
        with conn:
            conn.recv(65536)
            conn.sendall(START_BLOCK + b"this is no ACK" + END_BLOCK)

    threading.Thread(target=answer, daemon=True).start()
    settings = _settings(url, tmp_path, hl7_host="127.0.0.1", hl7_port=port)
    _store_result(url, settings, _receive(url, "1.2.826.0.1.3680043.10.9.1"), ROUTINE_RESULT)
    (row,) = _rows(url, "hl7")
    outcome = deliver(settings, row.id, attempt=1)
    server.close()
    assert outcome.status is Delivery.RETRY and "not an HL7 ACK" in outcome.detail


def test_fhir_bundle_names_the_accession_and_refuses_what_is_not_r4() -> None:
    from pydicom.dataset import Dataset

    from cxr_triage.registry import ModelCard
    from workers.fhir import build_bundle
    from workers.sr import TriageResult

    source = Dataset()
    source.PatientID, source.AccessionNumber = "PID-1", "ACC-1"
    source.StudyInstanceUID, source.SOPInstanceUID = "1.2.3", "1.2.3.4"
    result = TriageResult(
        label="COVID-19",
        probabilities={"COVID-19": 0.8, "Pneumonia": 0.1, "No finding": 0.1},
        model_set="demo",
        members=(ModelCard(version="v1", architecture="mobilenetv2_100", device_uid="1.2.3.9"),),
        not_for_clinical_use=True,
    )
    bundle = build_bundle(source, result)
    entries: list[Any] = list(bundle.entry or [])
    (report,) = [e.resource for e in entries if e.resource.get_resource_type() == "DiagnosticReport"]
    accession = [i for i in report.identifier if i.type is not None]
    assert [(i.type.coding[0].code, i.value) for i in accession] == [("ACSN", "ACC-1")]
    assert report.conclusionCode[0].coding[0].code == "840539006"  # SNOMED CT COVID-19, as in the SR
    assert Bundle.model_validate_json(bundle.model_dump_json(exclude_none=True)) == bundle
    with pytest.raises(ValueError, match="status"):
        Bundle.model_validate({"resourceType": "Bundle", "type": "transaction", "entry": [{"resource": {
            "resourceType": "Observation", "code": {"text": "x"}}}]})  # fmt: skip
