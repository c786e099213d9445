"""Audit events as IHE ATNA messages: a DICOM PS3.15 A.5 (RFC 3881) AuditMessage in an RFC 5424 syslog message,
sent over UDP (RFC 5426), TCP or TLS (RFC 5425 octet-counting framing) by a background thread that never blocks a
request for long: the database row is the record, a failed send is logged and dropped."""

from __future__ import annotations

import base64
import contextlib
import ipaddress
import os
import queue
import socket
import ssl
import threading
from dataclasses import dataclass
from datetime import UTC
from pathlib import Path
from typing import Final
from urllib.parse import urlsplit
from xml.etree.ElementTree import Element, SubElement, tostring

from cxr_triage.logs import get_logger
from db.audit_models import AuditAction, AuditEvent, AuditOutcome
from db.models import as_utc

log = get_logger(__name__)

APP_NAME = "cxr-triage"
MSGID = "IHE+RFC-3881"  # IHE ITI TF-2a 3.20.7.1
FACILITY_AUTHPRIV = 10  # security/authorization messages
SEVERITY_NOTICE, SEVERITY_WARNING = 5, 4
BOM = b"\xef\xbb\xbf"
DEFAULT_PORTS: Final = {"udp": 514, "tcp": 514, "tls": 6514}


@dataclass(frozen=True)
class Code:
    """A coded value: (csd-code, codeSystemName, originalText)."""

    value: str
    scheme: str
    meaning: str

    def element(self, parent: Element, tag: str) -> Element:
        return SubElement(
            parent, tag, {"csd-code": self.value, "codeSystemName": self.scheme, "originalText": self.meaning}
        )


QUERY = Code("110112", "DCM", "Query")
PROCEDURE_RECORD = Code("110111", "DCM", "Procedure Record")
INSTANCES_TRANSFERRED = Code("110104", "DCM", "DICOM Instances Transferred")
USER_AUTHENTICATION = Code("110114", "DCM", "User Authentication")
SECURITY_ALERT = Code("110113", "DCM", "Security Alert")
AUDIT_LOG_USED = Code("110101", "DCM", "Audit Log Used")
LOGIN = Code("110122", "DCM", "Login")
LOGOUT = Code("110123", "DCM", "Logout")
USER_ATTRIBUTES_CHANGED = Code("110137", "DCM", "User Security Attributes Changed")
SOURCE_ROLE = Code("110153", "DCM", "Source Role ID")
DESTINATION_ROLE = Code("110152", "DCM", "Destination Role ID")
STUDY_INSTANCE_UID = Code("110180", "DCM", "Study Instance UID")
USER_IDENTIFIER = Code("11", "RFC-3881", "User Identifier")
URI = Code("12", "RFC-3881", "URI")
APPLICATION_SERVER = Code("4", "DCM", "Application Server process tier in a multi-tier system")


@dataclass(frozen=True)
class EventCodes:
    event_id: Code
    action_code: str  # EventActionCode: C, R, U, D or E
    type_code: Code | None = None


# Every action has its ATNA event (tests/test_audit_trail.py checks that none is missing).
EVENTS: Final[dict[AuditAction, EventCodes]] = {
    AuditAction.VIEW_WORKLIST: EventCodes(QUERY, "E"),
    AuditAction.VIEW_STUDY: EventCodes(PROCEDURE_RECORD, "R"),
    AuditAction.DOWNLOAD_RESULT: EventCodes(INSTANCES_TRANSFERRED, "R"),
    AuditAction.SET_READ: EventCodes(PROCEDURE_RECORD, "U"),
    AuditAction.SET_PRIORITY: EventCodes(PROCEDURE_RECORD, "U"),
    AuditAction.STORE_INSTANCES: EventCodes(INSTANCES_TRANSFERRED, "C"),
    AuditAction.SET_FINDING: EventCodes(PROCEDURE_RECORD, "U"),
    AuditAction.LOGIN: EventCodes(USER_AUTHENTICATION, "E", LOGIN),
    AuditAction.LOGOUT: EventCodes(USER_AUTHENTICATION, "E", LOGOUT),
    AuditAction.USER_CREATE: EventCodes(SECURITY_ALERT, "E", USER_ATTRIBUTES_CHANGED),
    AuditAction.USER_PASSWORD: EventCodes(SECURITY_ALERT, "E", USER_ATTRIBUTES_CHANGED),
    AuditAction.USER_TOKEN: EventCodes(SECURITY_ALERT, "E", USER_ATTRIBUTES_CHANGED),
    AuditAction.USER_DISABLE: EventCodes(SECURITY_ALERT, "E", USER_ATTRIBUTES_CHANGED),
    AuditAction.EXPORT_AUDIT: EventCodes(AUDIT_LOG_USED, "R"),
}
USER_ACTIONS = frozenset(
    {AuditAction.USER_CREATE, AuditAction.USER_PASSWORD, AuditAction.USER_TOKEN, AuditAction.USER_DISABLE}
)


def _access_point(parent: Element, address: str) -> None:
    try:
        ipaddress.ip_address(address)
        kind = "2"  # an IP address
    except ValueError:
        kind = "1"  # a machine name
    parent.set("NetworkAccessPointID", address)
    parent.set("NetworkAccessPointTypeCode", kind)


def _participant_objects(root: Element, row: AuditEvent) -> None:
    action = AuditAction(row.action)
    if row.study_instance_uid is not None:
        study = SubElement(
            root,
            "ParticipantObjectIdentification",
            {
                "ParticipantObjectID": row.study_instance_uid,
                "ParticipantObjectTypeCode": "2",  # system object
                "ParticipantObjectTypeCodeRole": "3",  # report
            },
        )
        STUDY_INSTANCE_UID.element(study, "ParticipantObjectIDTypeCode")
        if row.object_id is not None and row.sop_class_uid is not None:
            sop_class = SubElement(study, "SOPClass", {"UID": row.sop_class_uid, "NumberOfInstances": "1"})
            SubElement(sop_class, "Instance", {"UID": row.object_id})
    if action in USER_ACTIONS and row.object_id is not None:
        account = SubElement(
            root,
            "ParticipantObjectIdentification",
            {
                "ParticipantObjectID": row.object_id,
                "ParticipantObjectTypeCode": "1",  # person
                "ParticipantObjectTypeCodeRole": "11",  # security user entity
            },
        )
        USER_IDENTIFIER.element(account, "ParticipantObjectIDTypeCode")
    if action in (AuditAction.VIEW_WORKLIST, AuditAction.EXPORT_AUDIT):
        what = row.via.split(" ", 1)[-1] if action is AuditAction.VIEW_WORKLIST else "audit_events"
        target = SubElement(
            root,
            "ParticipantObjectIdentification",
            {
                "ParticipantObjectID": what,
                "ParticipantObjectTypeCode": "2",
                "ParticipantObjectTypeCodeRole": "24" if action is AuditAction.VIEW_WORKLIST else "13",  # query
            },
        )
        URI.element(target, "ParticipantObjectIDTypeCode")
        query = SubElement(target, "ParticipantObjectQuery")
        query.text = base64.b64encode((row.details or "").encode()).decode()


def audit_message(row: AuditEvent, *, source_id: str) -> str:
    """The event as a DICOM PS3.15 A.5 AuditMessage (XML, no patient name or ID: the study is named by its UID)."""
    codes = EVENTS[AuditAction(row.action)]
    root = Element("AuditMessage")
    event = SubElement(
        root,
        "EventIdentification",
        {
            "EventActionCode": codes.action_code,
            "EventDateTime": as_utc(row.at).isoformat(),
            "EventOutcomeIndicator": str(row.outcome),
        },
    )
    codes.event_id.element(event, "EventID")
    if codes.type_code is not None:
        codes.type_code.element(event, "EventTypeCode")
    description = "; ".join(
        part for part in (f"HTTP {row.http_status}" if row.http_status else None, row.details) if part
    )
    if description:
        SubElement(event, "EventOutcomeDescription").text = description
    requestor = SubElement(root, "ActiveParticipant", {"UserID": row.username, "UserIsRequestor": "true"})
    _access_point(requestor, row.client_address)
    SOURCE_ROLE.element(requestor, "RoleIDCode")
    application = SubElement(
        root,
        "ActiveParticipant",
        {"UserID": APP_NAME, "AlternativeUserID": row.via, "UserIsRequestor": "false"},
    )
    _access_point(application, source_id)
    DESTINATION_ROLE.element(application, "RoleIDCode")
    source = SubElement(root, "AuditSourceIdentification", {"AuditSourceID": source_id})
    APPLICATION_SERVER.element(source, "AuditSourceTypeCode")
    _participant_objects(root, row)
    return '<?xml version="1.0" encoding="UTF-8"?>' + tostring(root, encoding="unicode")


def syslog_message(row: AuditEvent, *, hostname: str) -> bytes:
    """RFC 5424: <PRI>1 TIMESTAMP HOSTNAME APP-NAME PROCID MSGID - BOM MSG, facility authpriv."""
    severity = SEVERITY_NOTICE if row.outcome == AuditOutcome.SUCCESS else SEVERITY_WARNING
    timestamp = as_utc(row.at).astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")
    host = "".join(c for c in hostname if 33 <= ord(c) <= 126)[:255] or "-"
    header = f"<{FACILITY_AUTHPRIV * 8 + severity}>1 {timestamp} {host} {APP_NAME} {os.getpid()} {MSGID} - "
    return header.encode() + BOM + audit_message(row, source_id=hostname).encode()


class SyslogSender:
    """Sends syslog messages to one receiver from a background thread; `send` only queues (a full queue drops the
    message, logged), and a failed send is logged, retried once on a fresh connection, then dropped."""

    _STOP: Final = b""

    def __init__(
        self, target: str, *, ca_file: Path | None = None, timeout_s: float = 5.0, max_queued: int = 10_000
    ) -> None:
        parts = urlsplit(target)
        if parts.scheme not in DEFAULT_PORTS or not parts.hostname:
            raise ValueError(f"a syslog target is udp://, tcp:// or tls://HOST[:PORT], got {target!r}")
        self.target = target
        self.scheme, self.host = parts.scheme, parts.hostname
        self.port = parts.port or DEFAULT_PORTS[parts.scheme]
        self.ca_file = ca_file
        self.timeout_s = timeout_s
        self._queue: queue.Queue[bytes] = queue.Queue(maxsize=max_queued)
        self._socket: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def send(self, message: bytes) -> None:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="audit-syslog", daemon=True)
                self._thread.start()
        try:
            self._queue.put_nowait(message)
        except queue.Full:
            log.warning("audit.syslog_dropped", target=self.target, reason="queue full")

    def close(self, timeout_s: float = 5.0) -> None:
        """Send what is queued (for at most `timeout_s`), then stop."""
        with self._lock:
            thread, self._thread = self._thread, None
        if thread is None:
            return
        try:
            self._queue.put(self._STOP, timeout=timeout_s)
        except queue.Full:
            return
        thread.join(timeout_s)

    def _run(self) -> None:
        while (message := self._queue.get()) != self._STOP:
            for attempt in (1, 2):
                try:
                    self._deliver(message)
                    break
                except OSError as exc:
                    self._disconnect()
                    if attempt == 2:
                        log.warning("audit.syslog_failed", target=self.target, error=type(exc).__name__)
        self._disconnect()

    def _deliver(self, message: bytes) -> None:
        if self.scheme == "udp":
            family, kind, proto, _, address = socket.getaddrinfo(self.host, self.port, type=socket.SOCK_DGRAM)[0]
            with socket.socket(family, kind, proto) as udp:
                udp.sendto(message, address)
            return
        if self._socket is None:
            connection = socket.create_connection((self.host, self.port), timeout=self.timeout_s)
            if self.scheme == "tls":
                context = ssl.create_default_context(cafile=str(self.ca_file) if self.ca_file else None)
                connection = context.wrap_socket(connection, server_hostname=self.host)
            self._socket = connection
        self._socket.sendall(f"{len(message)} ".encode() + message)  # RFC 5425/6587 octet counting

    def _disconnect(self) -> None:
        if self._socket is not None:
            with contextlib.suppress(OSError):
                self._socket.close()
            self._socket = None
