"""The access audit trail of the worklist: each route declares its action (`@audited`) or is exempt (`EXEMPT`, the one
list of routes that return no patient data); the app refuses to start with a route that is neither, and
`AuditMiddleware` records one event per request of a signed-in user (or login attempt) before the answer leaves.

A change (read flag, priority) is recorded in its own transaction (`record_change`), so it never commits without
its record; a read is recorded before its answer is sent, and is answered 503 instead when it cannot be recorded.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final, TypeVar

from fastapi import FastAPI, Request
from fastapi.routing import RouteContext, iter_route_contexts
from sqlalchemy import event
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool
from starlette.routing import Mount
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cxr_triage.logs import get_logger
from cxr_triage.settings import Settings
from db.audit_models import AuditAction, AuditEvent, AuditOutcome
from db.audit_repo import UID, NewAuditEvent, append
from db.session import session_scope
from worklist.atna import SyslogSender, syslog_message

log = get_logger(__name__)
Endpoint = TypeVar("Endpoint", bound=Callable[..., Any])

# Routes that return no patient data and change nothing of it: "METHOD path" (or "MOUNT path") -> why.
EXEMPT: Final[dict[str, str]] = {
    "GET /healthz": "liveness: no data",
    "GET /readyz": "readiness: part names and fixed reasons",
    "GET /metrics": "counts and timings, no identifiers",
    "GET /api/me": "the caller's own username",
    "GET /api/agreement": "the AI's agreement with confirmed reads: counts per label and week, no identifiers",
    "GET /agreement": "the same counts as a page",
    "GET /api/drift": "rates and label shares of the last day, no identifiers",
    "GET /login": "the sign-in form",
    "GET /openapi.json": "the API's description",
    "GET /docs": "the API's description",
    "GET /docs/oauth2-redirect": "the API's description",
    "GET /redoc": "the API's description",
    "MOUNT /static": "scripts, styles",
}


@dataclass(frozen=True)
class AuditSpec:
    """What a route does, for the record: its action and the path parameters naming the study or the object."""

    action: AuditAction
    study_param: str | None = None
    object_param: str | None = None


_SPECS: dict[Callable[..., Any], AuditSpec] = {}


def audited(action: AuditAction, *, study: str | None = None, obj: str | None = None) -> Callable[[Endpoint], Endpoint]:
    """Declare the audit action of a route's endpoint (place it under the route decorator)."""

    def declare(endpoint: Endpoint) -> Endpoint:
        _SPECS[endpoint] = AuditSpec(action, study, obj)
        return endpoint

    return declare


def spec_of(route: object) -> AuditSpec | None:
    """The declared audit action of a route (or a route's context), by its endpoint."""
    endpoint = getattr(route, "endpoint", None)
    return _SPECS.get(endpoint) if endpoint is not None else None


def _keys(route: RouteContext) -> list[str]:
    """How EXEMPT names a route: "METHOD path" for each method but HEAD, "MOUNT path" for a mount."""
    if isinstance(route.original_route, Mount):
        return [f"MOUNT {route.path}"]
    methods = sorted(route.methods or {type(route.original_route).__name__})
    return [f"{method} {route.path}" for method in methods if method != "HEAD"]


def unaudited_routes(app: FastAPI) -> list[str]:
    """Routes of `app` (included routers' too) with neither an audit action nor an entry in EXEMPT."""
    return [
        key
        for route in iter_route_contexts(app.routes)
        if spec_of(route) is None
        for key in _keys(route)
        if key not in EXEMPT
    ]


def audited_routes(app: FastAPI) -> dict[str, AuditSpec]:
    """Every audited route of `app` ("METHOD path") with its declared action."""
    found: dict[str, AuditSpec] = {}
    for route in iter_route_contexts(app.routes):
        spec = spec_of(route)
        if spec is not None:
            found.update(dict.fromkeys(_keys(route), spec))
    return found


# --- one request's record ------------------------------------------------------------------------------------------


@dataclass
class AuditContext:
    """What the request's handlers tell the record: who (the signed-in user, or the username a login tried) and
    what was found (the study a result belongs to, a result's SOP class, short details)."""

    client_address: str
    actor: str | None = None
    fields: dict[str, str | None] = field(default_factory=dict)
    row: AuditEvent | None = None  # recorded by the handler, in its transaction


def _context(scope: Scope) -> AuditContext | None:
    context = scope.get("state", {}).get("audit")
    return context if isinstance(context, AuditContext) else None


def set_actor(request: Request, username: str) -> None:
    context = _context(request.scope)
    if context is not None:
        context.actor = username


def note(
    request: Request,
    *,
    study_instance_uid: str | None = None,
    sop_class_uid: str | None = None,
    details: str | None = None,
) -> None:
    """Add what the handler found to the request's record."""
    context = _context(request.scope)
    if context is not None:
        values = {"study_instance_uid": study_instance_uid, "sop_class_uid": sop_class_uid, "details": details}
        context.fields.update({key: value for key, value in values.items() if value is not None})


def list_details(shown: int, total: int, query: str) -> str:
    """A list's details: how many studies it showed, and its query (filters, never names)."""
    return f"{shown} of {total} studies; query {query or '(none)'}"


def record_change(session: Session, request: Request, *, details: str | None = None) -> None:
    """Record the request's change in the session of the change itself (outcome: success)."""
    context = _context(request.scope)
    if context is None or context.actor is None:
        raise RuntimeError("record_change outside an audited request of a signed-in user")
    note(request, details=details)
    row = append(session, _event(request.scope, context, 200))

    def committed(_: Session) -> None:
        context.row = row  # only now: a change rolled back leaves the middleware to record its failure

    event.listen(session, "after_commit", committed, once=True)


def _event(scope: Scope, context: AuditContext, status: int) -> NewAuditEvent:
    route = scope.get("route")
    spec = spec_of(route)
    if spec is None or context.actor is None:
        raise RuntimeError("an audit event needs an audited route and a user")
    params: dict[str, Any] = scope.get("path_params", {})
    details = context.fields.get("details")
    study = context.fields.get("study_instance_uid")
    if study is None and spec.study_param is not None:
        study = params.get(spec.study_param)
    if study is not None and not UID.fullmatch(study):
        study, details = None, details or "not a UID"
    obj = params.get(spec.object_param) if spec.object_param is not None else None
    return NewAuditEvent(
        username=context.actor,
        action=spec.action,
        client_address=context.client_address,
        via=f"{scope['method']} {getattr(route, 'path', scope['path'])}"[:100],
        outcome=AuditOutcome.of_http_status(status),
        http_status=status,
        study_instance_uid=study,
        object_id=obj[:64] if isinstance(obj, str) and obj else None,
        sop_class_uid=context.fields.get("sop_class_uid"),
        details=details,
    )


# --- recording and sending -----------------------------------------------------------------------------------------


class Auditor:
    """Writes audit events (the database row is the record) and sends each to syslog when CXR_AUDIT_SYSLOG is set."""

    def __init__(self, settings: Settings) -> None:
        self.url = settings.effective_database_url
        self.hostname = socket.gethostname()
        self.sender = (
            SyslogSender(settings.audit_syslog, ca_file=settings.audit_syslog_ca) if settings.audit_syslog else None
        )

    def append(self, event: NewAuditEvent) -> AuditEvent:
        with session_scope(self.url) as session:
            row = append(session, event)
        self.emit(row)
        return row

    def emit(self, row: AuditEvent) -> None:
        """Send a committed row to syslog; never raises."""
        if self.sender is None:
            return
        try:
            self.sender.send(syslog_message(row, hostname=self.hostname))
        except Exception as exc:
            log.warning("audit.syslog_failed", target=self.sender.target, error=type(exc).__name__)

    def close(self) -> None:
        if self.sender is not None:
            self.sender.close()


class AuditMiddleware:
    """Records one event per request to an audited route once a user is known, before the answer's first byte."""

    UNAVAILABLE: Final = b'{"detail":"audit trail unavailable"}'

    def __init__(self, app: ASGIApp, auditor: Auditor) -> None:
        self.app = app
        self.auditor = auditor

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        client = scope.get("client")
        context = AuditContext(client_address=client[0] if client else "unknown")
        scope.setdefault("state", {})["audit"] = context
        started = replaced = False

        async def send_recorded(message: Message) -> None:
            nonlocal started, replaced
            if replaced:
                return
            if message["type"] == "http.response.start" and not started:
                started = True
                if not await self._record(scope, context, message["status"]):
                    replaced = True
                    await self._unavailable(send)
                    return
            await send(message)

        try:
            await self.app(scope, receive, send_recorded)
        except Exception:
            if not started:
                await self._record(scope, context, 500)
            raise

    async def _record(self, scope: Scope, context: AuditContext, status: int) -> bool:
        """Record the request if its route is audited and a user is known; False if that failed."""
        if spec_of(scope.get("route")) is None or context.actor is None:
            return True
        if context.row is None:
            try:
                context.row = await run_in_threadpool(self.auditor.append, _event(scope, context, status))
                return True
            except Exception as exc:
                log.error("audit.record_failed", path=scope.get("path"), error=type(exc).__name__)
                return False
        self.auditor.emit(context.row)
        return True

    async def _unavailable(self, send: Send) -> None:
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(self.UNAVAILABLE)).encode())]
        await send({"type": "http.response.start", "status": 503, "headers": headers})
        await send({"type": "http.response.body", "body": self.UNAVAILABLE})
