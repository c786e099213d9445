"""The server-rendered pages: login, the live worklist, a study's detail with its read finding (patient data only when
signed in) and the AI's agreement with confirmed reads; each access to patient data is recorded like the API's
(`@audited`, worklist/audit.py). The header of a signed-in page shows the drift warnings and the agreement."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any, get_args
from urllib.parse import urlsplit

from fastapi import APIRouter, Depends, Form, Request, Response
from fastapi.responses import HTMLResponse, RedirectResponse
from fastapi.templating import Jinja2Templates

from cxr_triage.labels import CLASS_LABELS, DEMO_DISCLAIMER
from cxr_triage.logs import get_logger
from cxr_triage.priority import PRIORITIES
from db.audit_models import AuditAction
from db.feedback_models import READ_FINDINGS
from db.session import session_scope
from worklist.audit import audited, list_details, note
from worklist.auth import SESSION_COOKIE, AuthUser, revoke_token
from worklist.deps import (
    database_url,
    optional_user,
    quality_monitor,
    request_settings,
    request_token,
    sees_shadow,
    sign_in,
)
from worklist.quality import AGREEMENT_WEEKS, read_agreement
from worklist.queries import Filters, list_worklist, study_detail
from worklist.schemas import StudyStatus

log = get_logger(__name__)
router = APIRouter(include_in_schema=False)
templates = Jinja2Templates(directory=str(Path(__file__).parent / "templates"))


def person_name(value: str | None) -> str:
    """A DICOM person name (Family^Given^Middle^Prefix^Suffix) as people read it: "Family, Given Middle"."""
    if not value:
        return "(no name)"
    family, _, rest = value.partition("^")
    given = " ".join(part for part in rest.split("^") if part)
    return f"{family}, {given}" if family and given else family or given


templates.env.filters["person_name"] = person_name
FILTER_KEYS = ("status", "priority", "label", "read")


def _context(request: Request, **values: Any) -> dict[str, Any]:
    context = {"labels": CLASS_LABELS, "priorities": PRIORITIES[::-1], "disclaimer_text": DEMO_DISCLAIMER, **values}
    if values.get("user") is not None:  # the header: drift warnings and the agreement of the last weeks
        context["quality"] = quality_monitor(request).current()
        context["agreement_weeks"] = AGREEMENT_WEEKS
    return context


def _login_page(request: Request, *, status_code: int, error: str | None = None) -> HTMLResponse:
    target = request.url.path if request.url.path != "/login" else "/"
    return templates.TemplateResponse(
        request, "login.html", _context(request, error=error, next=target), status_code=status_code
    )


@router.get("/login", response_class=HTMLResponse)
def login_form(request: Request) -> HTMLResponse:
    return _login_page(request, status_code=200)


@router.post("/login", response_class=HTMLResponse)
@audited(AuditAction.LOGIN)
def login_submit(
    request: Request,
    username: Annotated[str, Form(max_length=64)],
    password: Annotated[str, Form(max_length=1024)],
    next: Annotated[str, Form(max_length=500)] = "/",
) -> Response:
    settings = request_settings(request)
    outcome = sign_in(request, username, password)
    if outcome.lockout is not None:
        minutes = math.ceil(outcome.lockout.retry_after_s / 60)
        page = _login_page(
            request, status_code=429, error=f"Too many failed sign-ins. Try again in {minutes} minute(s)."
        )
        page.headers["Retry-After"] = str(outcome.lockout.retry_after_s)
        return page
    token = outcome.token
    if token is None:
        return _login_page(request, status_code=401, error="Wrong username or password.")
    target = next if next.startswith("/") and not urlsplit(next).netloc and not next.startswith("//") else "/"
    response = RedirectResponse(target, status_code=303)
    response.set_cookie(
        SESSION_COOKIE,
        token,
        max_age=int(settings.session_ttl_s),
        httponly=True,
        samesite="strict",
        secure=settings.session_cookie_secure,
    )
    return response


@router.post("/logout")
@audited(AuditAction.LOGOUT)
def logout_submit(
    request: Request,
    token: str | None = Depends(request_token),
    user: AuthUser | None = Depends(optional_user),  # names the record
) -> Response:
    if token:
        with session_scope(database_url(request)) as session:
            revoke_token(session, token)
    response = RedirectResponse("/login", status_code=303)
    response.delete_cookie(SESSION_COOKIE)
    return response


@router.get("/", response_class=HTMLResponse)
@audited(AuditAction.VIEW_WORKLIST)
def worklist_page(request: Request, user: AuthUser | None = Depends(optional_user)) -> HTMLResponse:
    """The worklist; an anonymous request gets 401 and the login form, no patient data."""
    if user is None:
        return _login_page(request, status_code=401)
    params = request.query_params
    filters = {key: params.get(key) or None for key in FILTER_KEYS}
    read = {"true": True, "false": False}.get(filters["read"] or "")
    with session_scope(database_url(request)) as session:
        page = list_worklist(
            session,
            Filters(
                status=filters["status"] if filters["status"] in get_args(StudyStatus) else None,
                priority=filters["priority"] if filters["priority"] in PRIORITIES else None,
                label=filters["label"] if filters["label"] in CLASS_LABELS else None,
                read=read,
                limit=100,
            ),
        )
    note(request, details=list_details(len(page.items), page.total, request.url.query))
    return templates.TemplateResponse(
        request,
        "worklist.html",
        _context(request, user=user, page=page, filters=filters, poll_s=request_settings(request).worklist_poll_s),
    )


@router.get("/studies/{study_instance_uid}", response_class=HTMLResponse)
@audited(AuditAction.VIEW_STUDY, study="study_instance_uid")
def study_page(
    study_instance_uid: str, request: Request, user: AuthUser | None = Depends(optional_user)
) -> HTMLResponse:
    if user is None:
        return _login_page(request, status_code=401)
    if len(study_instance_uid) > 64 or not all(c.isdigit() or c == "." for c in study_instance_uid):
        detail = None
    else:
        with session_scope(database_url(request)) as session:
            detail = study_detail(session, study_instance_uid, shadow=sees_shadow(request, user))
    if detail is None:
        return templates.TemplateResponse(request, "missing.html", _context(request, user=user), status_code=404)
    return templates.TemplateResponse(
        request, "study.html", _context(request, user=user, study=detail, read_findings=READ_FINDINGS)
    )


@router.get("/agreement", response_class=HTMLResponse)
def agreement_page(request: Request, user: AuthUser | None = Depends(optional_user)) -> HTMLResponse:
    """The AI's agreement with confirmed reads per AI label and ISO week (counts only: exempt from the audit)."""
    if user is None:
        return _login_page(request, status_code=401)
    report = read_agreement(request_settings(request))
    weeks = sorted({cell.week for cell in report.cells})
    cells = {(cell.ai_label, cell.week): cell for cell in report.cells}
    return templates.TemplateResponse(
        request, "agreement.html", _context(request, user=user, report=report, weeks=weeks, cells=cells)
    )
