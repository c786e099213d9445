"""Writing and reading the access audit trail: `append` is the only way in (no update, no delete), `export_events`
reads a time range back in the order it was recorded."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any, Final

from sqlalchemy import select
from sqlalchemy.orm import Session

from db.audit_models import AuditAction, AuditEvent, AuditOutcome
from db.models import as_utc
from db.session import session_scope

UID = re.compile(r"[0-9][0-9.]{0,63}")
DETAILS_MAX = 500
# The columns of an export, in order (CSV header, JSON keys).
EXPORT_COLUMNS: Final = (
    "id",
    "at",
    "username",
    "action",
    "study_instance_uid",
    "object_id",
    "sop_class_uid",
    "client_address",
    "outcome",
    "http_status",
    "via",
    "details",
)


@dataclass(frozen=True, kw_only=True)
class NewAuditEvent:
    """An event to record; valid once built (UIDs are UIDs, lengths fit the columns; long details are cut)."""

    username: str
    action: AuditAction
    client_address: str
    via: str
    outcome: AuditOutcome
    http_status: int | None = None
    study_instance_uid: str | None = None
    object_id: str | None = None
    sop_class_uid: str | None = None
    details: str | None = None

    def __post_init__(self) -> None:
        if not 0 < len(self.username) <= 64:
            raise ValueError(f"an audit username has 1-64 characters, got {len(self.username)}")
        for name in ("study_instance_uid", "sop_class_uid"):
            value = getattr(self, name)
            if value is not None and not UID.fullmatch(value):
                raise ValueError(f"{name} is not a UID: {value!r}")
        if self.object_id is not None and not 0 < len(self.object_id) <= 64:
            raise ValueError("an audit object_id has 1-64 characters")
        if not 0 < len(self.via) <= 100:
            raise ValueError("an audit `via` has 1-100 characters")
        object.__setattr__(self, "action", AuditAction(self.action))
        object.__setattr__(self, "outcome", AuditOutcome(self.outcome))
        object.__setattr__(self, "client_address", self.client_address[:64] or "unknown")
        if self.details is not None and len(self.details) > DETAILS_MAX:
            object.__setattr__(self, "details", self.details[: DETAILS_MAX - 3] + "...")


def append(session: Session, event: NewAuditEvent) -> AuditEvent:
    """Add the event in the caller's transaction (a change and its record commit together)."""
    values = asdict(event) | {"action": event.action.value, "outcome": int(event.outcome)}
    row = AuditEvent(**values)
    session.add(row)
    session.flush()
    return row


def export_events(
    url: str, *, since: datetime | None = None, until: datetime | None = None, page_size: int = 1000
) -> Iterator[AuditEvent]:
    """Every event with since <= at < until, in the order recorded; read a page per short transaction, so a long
    export never holds the database (SQLite's transactions here take the write lock)."""
    after = 0
    while True:
        query = select(AuditEvent).where(AuditEvent.id > after)
        if since is not None:
            query = query.where(AuditEvent.at >= since.astimezone(UTC))
        if until is not None:
            query = query.where(AuditEvent.at < until.astimezone(UTC))
        with session_scope(url) as session:
            rows = list(session.scalars(query.order_by(AuditEvent.id).limit(page_size)))
        yield from rows
        if len(rows) < page_size:
            return
        after = rows[-1].id


def as_record(row: AuditEvent) -> dict[str, Any]:
    """One event as export values: `at` in ISO 8601 UTC, the rest as stored."""
    values = {column: getattr(row, column) for column in EXPORT_COLUMNS}
    values["at"] = as_utc(row.at).isoformat()
    return values
