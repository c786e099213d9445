"""Request dependencies shared by the API and the pages: settings, the database URL, the signed-in user and
signing in (with the failed-login limit), who sees shadow predictions, the drift and agreement reading."""

from __future__ import annotations

import re
from dataclasses import dataclass

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import APIKeyCookie, HTTPAuthorizationCredentials, HTTPBearer

from cxr_triage.logs import get_logger
from cxr_triage.settings import Settings
from db.session import session_scope
from worklist.audit import set_actor
from worklist.auth import SESSION_COOKIE, USERNAME_PATTERN, AuthUser, authenticate, issue_token, user_for_token
from worklist.limits import Attempt, Lockout, LoginLimiter
from worklist.quality import QualityMonitor

log = get_logger(__name__)

bearer_scheme = HTTPBearer(auto_error=False, description="A token from `cxr-triage users token` or POST /api/login.")
cookie_scheme = APIKeyCookie(name=SESSION_COOKIE, auto_error=False, description="The page's login session.")


def request_settings(request: Request) -> Settings:
    """The settings the app was created with (worklist/app.py), not a fresh read of the environment."""
    settings: Settings = request.app.state.settings
    return settings


def database_url(request: Request) -> str:
    return request_settings(request).effective_database_url


def request_token(
    credentials: HTTPAuthorizationCredentials | None = Depends(bearer_scheme),
    cookie: str | None = Depends(cookie_scheme),
) -> str | None:
    if credentials is not None and credentials.scheme.lower() == "bearer":
        return credentials.credentials
    return cookie


def optional_user(request: Request, token: str | None = Depends(request_token)) -> AuthUser | None:
    """The signed-in user, if any; from here on the request is audited in their name (worklist/audit.py)."""
    if not token:
        return None
    with session_scope(database_url(request)) as session:
        user = user_for_token(session, token)
    if user is not None:
        set_actor(request, user.username)
    return user


def current_user(user: AuthUser | None = Depends(optional_user)) -> AuthUser:
    """The signed-in user; anonymous requests get 401 and nothing else."""
    if user is None:
        raise HTTPException(
            status_code=status.HTTP_401_UNAUTHORIZED,
            detail="authentication required",
            headers={"WWW-Authenticate": "Bearer"},
        )
    return user


def quality_monitor(request: Request) -> QualityMonitor:
    """The app's drift and agreement reading (worklist/quality.py), re-read at most every CXR_DRIFT_REFRESH_S."""
    monitor: QualityMonitor = request.app.state.quality
    return monitor


def sees_shadow(request: Request, user: AuthUser) -> bool:
    """Whether the user is one of CXR_WORKLIST_SHADOW_USERS: they see the shadow set's prediction, marked not used."""
    return user.username in request_settings(request).worklist_shadow_users


def client_address(request: Request) -> str:
    """The peer's address as the server sees it (uvicorn applies X-Forwarded-For only from trusted proxies)."""
    return request.client.host if request.client is not None else "unknown"


@dataclass(frozen=True)
class SignIn:
    """The outcome of a login: a user and a new session token, a wrong password (both None), or a lockout."""

    user: AuthUser | None = None
    token: str | None = None
    lockout: Lockout | None = None


def sign_in(request: Request, username: str, password: str) -> SignIn:
    """Check the password unless the username or the client address has too many recent failures (then a
    lockout, and no password check at all); on success issue a session token."""
    settings = request_settings(request)
    limiter: LoginLimiter = request.app.state.login_limiter
    address = client_address(request)
    set_actor(request, username if re.fullmatch(USERNAME_PATTERN, username) else "(not a username)")
    attempt = limiter.begin(username, address)
    if isinstance(attempt, Lockout):
        return SignIn(lockout=attempt)
    try:
        with session_scope(database_url(request)) as session:
            user = authenticate(session, username, password, scrypt_n=settings.password_scrypt_n)
            token = issue_token(session, user.id, kind="session", ttl_s=settings.session_ttl_s) if user else None
    except BaseException:
        limiter.cancel(attempt)
        raise
    if user is None or token is None:
        _failed(limiter, attempt)
        return SignIn()
    limiter.succeeded(attempt)
    log.info("auth.login", user_id=user.id)
    return SignIn(user=user, token=token)


def _failed(limiter: LoginLimiter, attempt: Attempt) -> None:
    log.info("auth.login_failed", client=attempt.address)
    for lockout in limiter.failed(attempt):
        # Which count is full and for how long; never the password. The username only when it is the username's
        # count that is full (an operator needs to know whose account is being guessed at).
        who = {"username": attempt.username} if lockout.scope == "username" else {}
        log.warning(
            "auth.locked",
            scope=lockout.scope,
            client=attempt.address,
            retry_after_s=lockout.retry_after_s,
            window_s=limiter.window_s,
            **who,
        )
