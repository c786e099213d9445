"""The JSON API: login, the worklist, one study, read state, the user's priority and the read finding, the AI's
agreement with confirmed reads and the drift of the last day (all but login need a user).

Each route declares its audit action (`@audited`, worklist/audit.py): every access by a user is recorded."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Path, Query, Request, Response, status
from sqlalchemy import select
from sqlalchemy.orm import Session

from cxr_triage.labels import Label
from cxr_triage.logs import get_logger
from cxr_triage.priority import Priority
from cxr_triage.result_kinds import RESULT_KINDS
from db.audit_models import AuditAction
from db.feedback_repo import record_finding
from db.models import Instance, ResultObject, Study, utcnow
from db.session import session_scope
from db.worklist_repo import set_read as store_read
from db.worklist_repo import set_user_priority as store_user_priority
from infra.objectstore import open_object, read_object
from worklist.audit import audited, list_details, note, record_change
from worklist.auth import AuthUser, revoke_token
from worklist.deps import (
    current_user,
    database_url,
    quality_monitor,
    request_settings,
    request_token,
    sees_shadow,
    sign_in,
)
from worklist.quality import drift_report, read_agreement
from worklist.queries import Filters, list_worklist, study_detail
from worklist.schemas import (
    UID_PATTERN,
    AgreementReport,
    DriftReport,
    FindingChoice,
    LoginRequest,
    Me,
    ReadState,
    StudyDetail,
    StudyStatus,
    TokenResponse,
    UserPriority,
    WorklistPage,
)

log = get_logger(__name__)
router = APIRouter(prefix="/api", tags=["worklist"])
StudyUID = Annotated[str, Path(pattern=UID_PATTERN, description="Study Instance UID.")]
Responses = dict[int | str, dict[str, Any]]
UNAUTHORIZED: Responses = {401: {"description": "No valid token or session: nothing else is returned."}}
NOT_FOUND: Responses = {404: {"description": "No such study."}}
BAD_BODY: Responses = {400: {"description": "The body could not be parsed."}}


WRONG_PASSWORD: Responses = {
    401: {"description": "Wrong username or password."},
    429: {
        "description": "Too many failed logins for this username or from this address: wait Retry-After seconds.",
        "headers": {"Retry-After": {"description": "Seconds to wait.", "schema": {"type": "integer"}}},
    },
    **BAD_BODY,
}


@router.post("/login", operation_id="login", responses=WRONG_PASSWORD)
@audited(AuditAction.LOGIN)
def login(body: LoginRequest, request: Request) -> TokenResponse:
    """Exchange a username and password for a bearer token (a session that expires).

    After CXR_LOGIN_MAX_FAILURES failed logins within CXR_LOGIN_WINDOW_S for a username, or from a client address,
    further attempts get 429 (with Retry-After) without the password being checked.
    """
    outcome = sign_in(request, body.username, body.password)
    if outcome.lockout is not None:
        raise HTTPException(
            status.HTTP_429_TOO_MANY_REQUESTS,
            "too many failed logins: try again later",
            headers={"Retry-After": str(outcome.lockout.retry_after_s)},
        )
    if outcome.token is None:
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, "wrong username or password")
    ttl = request_settings(request).session_ttl_s
    return TokenResponse(token=outcome.token, expires_at=utcnow() + timedelta(seconds=ttl))


@router.post("/logout", operation_id="logout", status_code=204, responses=UNAUTHORIZED)
@audited(AuditAction.LOGOUT)
def logout(
    request: Request, user: AuthUser = Depends(current_user), token: str | None = Depends(request_token)
) -> Response:
    """Revoke the token or session used for this request."""
    with session_scope(database_url(request)) as session:
        revoke_token(session, token or "")
    return Response(status_code=204)


@router.get("/me", operation_id="me", responses=UNAUTHORIZED)
def me(user: AuthUser = Depends(current_user)) -> Me:
    return Me(username=user.username)


@router.get("/worklist", operation_id="listWorklist", responses=UNAUTHORIZED)
@audited(AuditAction.VIEW_WORKLIST)
def worklist(
    request: Request,
    user: AuthUser = Depends(current_user),
    status_: Annotated[StudyStatus | None, Query(alias="status")] = None,
    priority: Priority | None = None,
    label: Label | None = None,
    read: bool | None = None,
    since: Annotated[datetime | None, Query(description="Arrived at or after (ISO 8601).")] = None,
    until: Annotated[datetime | None, Query(description="Arrived before (ISO 8601).")] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    offset: Annotated[int, Query(ge=0, le=1_000_000)] = 0,
) -> WorklistPage:
    """Studies ordered by priority (most urgent first), then by arrival (longest waiting first)."""
    filters = Filters(
        status=status_, priority=priority, label=label, read=read, since=since, until=until, limit=limit, offset=offset
    )
    with session_scope(database_url(request)) as session:
        page = list_worklist(session, filters)
    note(request, details=list_details(len(page.items), page.total, request.url.query))
    return page.model_copy(update={"warnings": quality_monitor(request).current().warnings})


@router.get("/studies/{study_instance_uid}", operation_id="getStudy", responses={**UNAUTHORIZED, **NOT_FOUND})
@audited(AuditAction.VIEW_STUDY, study="study_instance_uid")
def get_study(study_instance_uid: StudyUID, request: Request, user: AuthUser = Depends(current_user)) -> StudyDetail:
    """One study: its instances, per-model scores, model versions, the rule that fired, SR/heatmap links, the read
    finding and its history (and, for CXR_WORKLIST_SHADOW_USERS, the shadow set's prediction, marked not used)."""
    with session_scope(database_url(request)) as session:
        detail = study_detail(session, study_instance_uid, shadow=sees_shadow(request, user))
    if detail is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "no such study")
    return detail


@router.put(
    "/studies/{study_instance_uid}/read", operation_id="setRead", responses={**UNAUTHORIZED, **NOT_FOUND, **BAD_BODY}
)
@audited(AuditAction.SET_READ, study="study_instance_uid")
def set_read(
    study_instance_uid: StudyUID, body: ReadState, request: Request, user: AuthUser = Depends(current_user)
) -> StudyDetail:
    """Mark the study read (by the signed-in user) or unread."""
    with session_scope(database_url(request)) as session:
        study = _study(session, study_instance_uid)
        store_read(session, study, body.read, user_id=user.id)
        record_change(session, request, details=f"read={str(body.read).lower()}")
    log.info("worklist.read", study_instance_uid=study_instance_uid, read=body.read, user_id=user.id)
    return get_study(study_instance_uid, request, user)


@router.put(
    "/studies/{study_instance_uid}/priority",
    operation_id="setPriority",
    responses={**UNAUTHORIZED, **NOT_FOUND, **BAD_BODY},
)
@audited(AuditAction.SET_PRIORITY, study="study_instance_uid")
def set_priority(
    study_instance_uid: StudyUID, body: UserPriority, request: Request, user: AuthUser = Depends(current_user)
) -> StudyDetail:
    """Set (or clear with null) the user's priority: the effective priority never goes below it."""
    with session_scope(database_url(request)) as session:
        study = _study(session, study_instance_uid)
        store_user_priority(session, study, body.priority, user_id=user.id, settings=request_settings(request))
        record_change(session, request, details=f"priority={body.priority or 'none'}")
    log.info("worklist.user_priority", study_instance_uid=study_instance_uid, priority=body.priority, user_id=user.id)
    return get_study(study_instance_uid, request, user)


@router.put(
    "/studies/{study_instance_uid}/finding",
    operation_id="setFinding",
    responses={**UNAUTHORIZED, **NOT_FOUND, **BAD_BODY},
)
@audited(AuditAction.SET_FINDING, study="study_instance_uid")
def set_finding(
    study_instance_uid: StudyUID, body: FindingChoice, request: Request, user: AuthUser = Depends(current_user)
) -> StudyDetail:
    """Record the study's read finding (by the signed-in user, with the AI's label at this moment); recording again
    supersedes it, and the history is kept (`finding_history`)."""
    with session_scope(database_url(request)) as session:
        study = _study(session, study_instance_uid)
        record_finding(session, study, body.finding, user.username)
        record_change(session, request, details=f"finding={body.finding}")
    log.info("worklist.finding", study_instance_uid=study_instance_uid, user_id=user.id)
    return get_study(study_instance_uid, request, user)


@router.get("/agreement", operation_id="getAgreement", responses=UNAUTHORIZED)
def get_agreement(request: Request, user: AuthUser = Depends(current_user)) -> AgreementReport:
    """The AI's agreement with confirmed reads over the last 12 ISO weeks, per week and AI label: of the studies the
    AI gave a label and a radiologist read as one of the model's classes, the share read as that label."""
    return read_agreement(request_settings(request))


@router.get("/drift", operation_id="getDrift", responses=UNAUTHORIZED)
def get_drift(request: Request, user: AuthUser = Depends(current_user)) -> DriftReport:
    """The last 24 hours of live predictions (label mix, mean scores, STAT and out-of-distribution rates) against
    the previous CXR_DRIFT_BASELINE_DAYS days; re-read at most every CXR_DRIFT_REFRESH_S."""
    return drift_report(quality_monitor(request).current())


ResultUID = Annotated[str, Path(pattern=UID_PATTERN, description="SOP Instance UID of a result object.")]
NO_RESULT: Responses = {404: {"description": "No such result object."}}


def _result_path(request: Request, sop_instance_uid: str, *, image: bool = False) -> str:
    """The stored file of a result object; with `image`, only of a kind that is a picture. Its study and SOP class
    go to the request's audit record."""
    with session_scope(database_url(request)) as session:
        found = session.execute(
            select(ResultObject, Study.study_instance_uid)
            .join(Instance, Instance.id == ResultObject.instance_id)
            .join(Study, Study.id == Instance.study_id)
            .where(ResultObject.sop_instance_uid == sop_instance_uid)
        ).first()
        if found is None:
            raise HTTPException(status.HTTP_404_NOT_FOUND, "no such result object")
        row, study_instance_uid = found
        note(request, study_instance_uid=study_instance_uid, sop_class_uid=row.sop_class_uid, details=row.kind)
        kind = RESULT_KINDS.get(row.kind)
        if kind is None or (image and not kind.image):
            raise HTTPException(status.HTTP_404_NOT_FOUND, "no such result object")
        return row.path


@router.get(
    "/results/{sop_instance_uid}",
    operation_id="getResultObject",
    responses={**UNAUTHORIZED, **NO_RESULT, 200: {"content": {"application/dicom": {}}}},
    response_class=Response,
)
@audited(AuditAction.DOWNLOAD_RESULT, obj="sop_instance_uid")
def result_object(sop_instance_uid: ResultUID, request: Request, user: AuthUser = Depends(current_user)) -> Response:
    """The DICOM file of a result object we wrote (SR or heatmap Secondary Capture)."""
    ref = _result_path(request, sop_instance_uid)
    try:
        data = read_object(request_settings(request), ref)
    except OSError as exc:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "no such result object") from exc
    headers = {"Content-Disposition": f'attachment; filename="{sop_instance_uid}.dcm"'}
    return Response(data, media_type="application/dicom", headers=headers)


@router.get(
    "/results/{sop_instance_uid}/preview.png",
    operation_id="getHeatmapPreview",
    responses={**UNAUTHORIZED, **NO_RESULT, 200: {"content": {"image/png": {}}}},
    response_class=Response,
)
@audited(AuditAction.DOWNLOAD_RESULT, obj="sop_instance_uid")
def image_preview(sop_instance_uid: ResultUID, request: Request, user: AuthUser = Depends(current_user)) -> Response:
    """A picture result (the heatmap Secondary Capture) as a PNG, for the worklist thumbnail and the study page."""
    import io

    import pydicom
    from PIL import Image

    ref = _result_path(request, sop_instance_uid, image=True)
    try:
        pixels = pydicom.dcmread(open_object(request_settings(request), ref)).pixel_array
    except Exception as exc:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "no such result object") from exc
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return Response(buffer.getvalue(), media_type="image/png", headers={"Cache-Control": "private, max-age=3600"})


def _study(session: Session, study_instance_uid: str) -> Study:
    study = session.scalar(select(Study).where(Study.study_instance_uid == study_instance_uid).with_for_update())
    if study is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "no such study")
    return study
