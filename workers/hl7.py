"""HL7 v2.5.1 to the RIS: the message of a study's change (an ORU^R01 with the finding and scores, or an ORM^O01
order-priority update: CXR_HL7_MESSAGE), built with hl7apy and sent over MLLP (optionally TLS), acknowledged.

MLLP frames a message as 0x0B <message> 0x1C 0x0D; the RIS answers with an ACK in the same framing. MSA-1 AA or CA:
accepted. AE or CE (an error while processing it): retried with backoff. AR or CR (the RIS rejects the message):
final, retrying the same message cannot help. The message control ID (MSH-10) is the result object's id, so a
retry sends the same message and the RIS can tell a repeat.
"""

from __future__ import annotations

import socket
import ssl
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.core import Group, Message
from hl7apy.exceptions import HL7apyException
from hl7apy.parser import parse_message

from cxr_triage.labels import CLASS_LABELS
from cxr_triage.settings import Settings
from workers.interfaces import AI_DISCLAIMER, DeliveryError, MessageContext, Sent
from workers.sr import FINDING_CODES, MANUFACTURER, NO_UNITS, PRIVATE_SCHEME, PROBABILITY_CODES, PROCEDURE_REPORTED

HL7_VERSION: Final = "2.5.1"
START_BLOCK: Final = b"\x0b"
END_BLOCK: Final = b"\x1c\x0d"
MAX_ACK_BYTES: Final = 1024 * 1024
ACCEPTED: Final = frozenset({"AA", "CA"})
REJECTED: Final = frozenset({"AR", "CR"})  # final; AE and CE are retried

# Worklist priority -> HL7 priority (tables 0027 and 0485): S = STAT, A = ASAP, R = routine.
HL7_PRIORITIES: Final[dict[str, tuple[str, str]]] = {
    "stat": ("S", "STAT"),
    "high": ("A", "ASAP"),
    "indeterminate": ("A", "ASAP"),
    "medium": ("R", "Routine"),
    "routine": ("R", "Routine"),
    "low": ("R", "Routine"),
}
# Observation identifiers (OBX-3) beside the SR's codes (workers/sr.py).
FINDING: Final = ("121071", "Finding", "DCM")
ALGORITHM_NAME: Final = ("111001", "Algorithm Name", "DCM")
ALGORITHM_VERSION: Final = ("111003", "Algorithm Version", "DCM")
STUDY_UID: Final = ("113014", "DICOM Study", "DCM")
COMMENT: Final = ("121106", "Comment", "DCM")
PRIORITY: Final = ("PRIORITY", "Worklist priority", PRIVATE_SCHEME)
RESULT_STATUS: Final = "P"  # preliminary: an AI result nobody has verified (the SR's VerificationFlag UNVERIFIED)


def escape(text: str) -> str:
    """A value as HL7 text: the delimiters as escape sequences (the escape character first), line breaks as spaces."""
    text = text.replace("\\", "\\E\\")
    for char, sequence in (("|", "\\F\\"), ("^", "\\S\\"), ("&", "\\T\\"), ("~", "\\R\\")):
        text = text.replace(char, sequence)
    return " ".join(text.splitlines())


def _coded(value: str, meaning: str, scheme: str) -> str:
    return f"{escape(value)}^{escape(meaning)}^{escape(scheme)}"


def _ts(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y%m%d%H%M%S+0000")


def person_name(dicom_name: str) -> str:
    """A DICOM person name (family^given^middle^prefix^suffix, first component group) as an HL7 XPN
    (family^given^middle^suffix^prefix), each part escaped."""
    parts = [*dicom_name.split("=")[0].split("^"), "", "", "", "", ""][:5]
    family, given, middle, prefix, suffix = (escape(part.strip()) for part in parts)
    return "^".join((family, given, middle, suffix, prefix)).rstrip("^")


def control_id(object_id: int) -> str:
    """MSH-10 of a result object's message (at most 20 characters in v2.5.1)."""
    return f"CXR{object_id}"


def _header(ctx: MessageContext, structure: str) -> Message:
    settings = ctx.settings
    message = Message(structure, version=HL7_VERSION, validation_level=VALIDATION_LEVEL.STRICT)
    msh = message.msh
    msh.msh_3 = escape(settings.hl7_sending_application)
    for field, value in (
        ("msh_4", settings.hl7_sending_facility),
        ("msh_5", settings.hl7_receiving_application),
        ("msh_6", settings.hl7_receiving_facility),
    ):
        if value:
            setattr(msh, field, escape(value))
    msh.msh_7 = _ts(ctx.recorded_at)
    msh.msh_9 = "^".join((*structure.split("_"), structure))
    msh.msh_10 = control_id(ctx.object_id)
    msh.msh_11 = "P"
    msh.msh_18 = "UNICODE UTF-8"
    return message


def _patient(group: Group, ctx: MessageContext) -> None:
    pid = group.pid
    pid.pid_1 = "1"
    pid.pid_3 = escape(ctx.patient_id or "")
    if ctx.patient_name:
        pid.pid_5 = person_name(ctx.patient_name)


def _order(orc: Any, obr: Any, ctx: MessageContext, *, control: str) -> None:
    """ORC and OBR: the order by its accession number (filler order number, OBR-18), the procedure, the priority."""
    code, _ = HL7_PRIORITIES[ctx.priority]
    accession = escape(ctx.accession_number or "")
    orc.orc_1 = control
    obr.obr_1 = "1"
    if accession:
        orc.orc_3 = accession
        obr.obr_3 = accession
        obr.obr_18 = accession
    obr.obr_4 = _coded(PROCEDURE_REPORTED.value, PROCEDURE_REPORTED.meaning, PROCEDURE_REPORTED.scheme_designator)
    obr.obr_7 = _ts(ctx.analysed_at)
    obr.obr_24 = "RAD"
    obr.obr_27 = f"^^^^^{code}"


def _observations(ctx: MessageContext, *, finding: bool) -> list[tuple[str, tuple[str, str, str], str, str]]:
    """(value type, identifier, value, units) of each OBX: the finding and scores (ORU), the priority, the model set,
    the study, and the disclaimer."""
    rows: list[tuple[str, tuple[str, str, str], str, str]] = []
    if finding:
        concept = FINDING_CODES[ctx.label]
        rows.append(("CE", FINDING, _coded(concept.value, concept.meaning, concept.scheme_designator), ""))
        units = _coded(NO_UNITS.value, NO_UNITS.meaning, NO_UNITS.scheme_designator)
        for label in CLASS_LABELS:
            code = PROBABILITY_CODES[label]
            identifier = (code.value, code.meaning, code.scheme_designator)
            rows.append(("NM", identifier, f"{ctx.probabilities[label]:.6f}".rstrip("0").rstrip("."), units))
    rows += [
        ("ST", PRIORITY, escape(ctx.priority), ""),
        ("ST", ALGORITHM_NAME, escape(f"{MANUFACTURER} {ctx.model_set}"), ""),
        ("ST", ALGORITHM_VERSION, escape(", ".join(ctx.model_versions)), ""),
        ("ST", STUDY_UID, escape(ctx.study_instance_uid), ""),
        ("TX", COMMENT, escape(AI_DISCLAIMER), ""),
    ]
    return rows


def _fill_obx(obx: Any, index: int, row: tuple[str, tuple[str, str, str], str, str], ctx: MessageContext) -> None:
    value_type, identifier, value, units = row
    obx.obx_1 = str(index)
    obx.obx_2 = value_type
    obx.obx_3 = _coded(*identifier)
    obx.obx_5 = value
    if units:
        obx.obx_6 = units
    obx.obx_11 = RESULT_STATUS
    obx.obx_14 = _ts(ctx.analysed_at)


def oru_r01(ctx: MessageContext) -> Message:
    """The AI result for the RIS: ORU^R01 with PID, ORC/OBR (the order, priority in OBR-27 and TQ1-9), and OBX lines
    for the finding, each class probability, the worklist priority, the model set, the study and the disclaimer."""
    message = _header(ctx, "ORU_R01")
    result = message.add_group("ORU_R01_PATIENT_RESULT")
    if ctx.patient_id:
        _patient(result.add_group("ORU_R01_PATIENT"), ctx)
    order = result.add_group("ORU_R01_ORDER_OBSERVATION")
    _order(order.orc, order.obr, ctx, control="RE")
    order.obr.obr_25 = RESULT_STATUS
    code, text = HL7_PRIORITIES[ctx.priority]
    order.add_group("ORU_R01_TIMING_QTY").tq1.tq1_9 = f"{code}^{text}^HL70485"
    for index, row in enumerate(_observations(ctx, finding=True), start=1):
        _fill_obx(order.add_group("ORU_R01_OBSERVATION").obx, index, row, ctx)
    return message


def orm_o01(ctx: MessageContext) -> Message:
    """An order-priority update for the RIS: ORM^O01, ORC-1 XO (change order), the priority in ORC-7 and OBR-27,
    the disclaimer in NTE and OBX, with the worklist priority, the model set and the study as OBX lines."""
    message = _header(ctx, "ORM_O01")
    if ctx.patient_id:
        _patient(message.add_group("ORM_O01_PATIENT"), ctx)
    order = message.add_group("ORM_O01_ORDER")
    detail = order.add_group("ORM_O01_ORDER_DETAIL")
    obr = detail.add_group("ORM_O01_OBRRQDRQ1RXOODSODT_SUPPGRP").obr
    _order(order.orc, obr, ctx, control="XO")
    order.orc.orc_7 = f"^^^^^{HL7_PRIORITIES[ctx.priority][0]}"
    nte = detail.add_segment("NTE")
    nte.nte_1 = "1"
    nte.nte_3 = escape(AI_DISCLAIMER)
    for index, row in enumerate(_observations(ctx, finding=False), start=1):
        _fill_obx(detail.add_group("ORM_O01_OBSERVATION").obx, index, row, ctx)
    return message


def _segments(element: Any) -> list[Any]:
    if element.classname == "Segment":
        return [element]
    return [segment for child in element.children for segment in _segments(child)]


def build_message(ctx: MessageContext) -> bytes:
    """The message CXR_HL7_MESSAGE asks for, validated against v2.5.1 (the ORU as a whole; the ORM segment by segment:
    hl7apy models its OBR/RQD/RQ1/RXO/ODS/ODT choice as a sequence of all six), as ER7 bytes (UTF-8)."""
    if ctx.priority not in HL7_PRIORITIES:
        raise ValueError(f"unknown priority {ctx.priority!r}")
    oru = ctx.settings.hl7_message == "oru"
    message = oru_r01(ctx) if oru else orm_o01(ctx)
    try:
        if oru:
            message.validate()
        else:
            for segment in _segments(message):
                segment.validate()
    except HL7apyException as exc:  # its text may quote a value: never a patient identifier in an error or a log
        detail = str(exc)[:300]
        for value in (ctx.patient_id, ctx.patient_name, *(ctx.patient_name or "").split("^")):
            if value and len(value.strip()) >= 2:
                detail = detail.replace(value.strip(), "[redacted]")
        raise ValueError(f"invalid HL7 message: {detail}") from exc
    er7: str = message.to_er7()
    return (er7 + "\r").encode("utf-8")


def frame(message: bytes) -> bytes:
    """One MLLP block."""
    return START_BLOCK + message + END_BLOCK


def read_frame(conn: socket.socket, *, limit: int = MAX_ACK_BYTES) -> bytes:
    """The content of the next MLLP block on `conn` (bytes before its start block are ignored)."""
    buffer = b""
    while END_BLOCK not in buffer:
        chunk = conn.recv(65536)
        if not chunk:
            raise ConnectionError("connection closed before the end of the MLLP block")
        buffer += chunk
        if len(buffer) > limit:
            raise ConnectionError(f"MLLP block over {limit} bytes")
    start = buffer.find(START_BLOCK)
    if start < 0:
        raise ConnectionError("MLLP block without its start byte (0x0B)")
    return buffer[start + 1 : buffer.index(END_BLOCK, start)]


def parse_ack(data: bytes) -> tuple[str, str]:
    """(MSA-1 acknowledgment code, MSA-2 message control ID) of an ACK; ValueError when it is not one."""
    text = data.decode("utf-8", errors="replace").strip().replace("\n", "\r")
    try:
        ack = parse_message(text, find_groups=False)
        msa = ack.msa
        return str(msa.msa_1.value), str(msa.msa_2.value)
    except (HL7apyException, AttributeError, IndexError) as exc:
        raise ValueError(f"not an HL7 ACK: {type(exc).__name__}") from exc


def _control_id_of(message: bytes) -> str:
    header = message.split(b"\r", 1)[0].decode("utf-8", errors="replace")
    fields = header.split(header[3:4] or "|")
    if not header.startswith("MSH") or len(fields) < 10:
        raise ValueError("not an HL7 message (no MSH-10)")
    return fields[9]


@dataclass(frozen=True)
class Hl7Sender:
    """The RIS's MLLP endpoint as a sender of workers/delivery.py."""

    host: str
    port: int
    timeout_s: float = 30.0
    tls: bool = False
    tls_ca: Path | None = None

    def __post_init__(self) -> None:
        if not self.host:
            raise ValueError("HL7 destination: no host")
        if not 0 < self.port < 65536:
            raise ValueError(f"HL7 destination: invalid port {self.port}")

    def __str__(self) -> str:
        return f"MLLP {self.host}:{self.port}{' (TLS)' if self.tls else ''}"

    @classmethod
    def from_settings(cls, settings: Settings) -> Hl7Sender | None:
        if not settings.hl7_host:
            return None
        return cls(settings.hl7_host, settings.hl7_port, settings.hl7_timeout_s, settings.hl7_tls, settings.hl7_tls_ca)

    def send(self, payload: bytes) -> Sent:
        """Send one message and wait for its ACK; raises DeliveryError or OSError (unreachable, timeout)."""
        expected = _control_id_of(payload)
        with socket.create_connection((self.host, self.port), timeout=self.timeout_s) as raw:
            conn = raw
            if self.tls:
                context = ssl.create_default_context(cafile=str(self.tls_ca) if self.tls_ca else None)
                conn = context.wrap_socket(raw, server_hostname=self.host)
            try:
                conn.sendall(frame(payload))
                reply = read_frame(conn)
            finally:
                if conn is not raw:
                    conn.close()
        try:
            code, acknowledged = parse_ack(reply)
        except ValueError as exc:
            raise DeliveryError(f"{self} answered message {expected} with {exc}") from exc
        if acknowledged != expected:
            raise DeliveryError(f"{self} acknowledged message {acknowledged!r}, not {expected}", answer=code)
        if code in ACCEPTED:
            return Sent(code)
        raise DeliveryError(f"{self} answered {code} to message {expected}", answer=code, final=code in REJECTED)
