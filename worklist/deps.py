"""Request dependencies shared by the API and the pages: settings, the database URL and the signed-in user."""

from __future__ import annotations

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import APIKeyCookie, HTTPAuthorizationCredentials, HTTPBearer

from cxr_triage.settings import Settings
from db.session import session_scope
from worklist.auth import SESSION_COOKIE, AuthUser, user_for_token

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
    if not token:
        return None
    with session_scope(database_url(request)) as session:
        return user_for_token(session, token)


def current_user(user: AuthUser | None = Depends(optional_user)) -> AuthUser:
    """The signed-in user; anonymous requests get 401 and nothing else."""
    if user is None:
        raise HTTPException(
            status_code=status.HTTP_401_UNAUTHORIZED,
            detail="authentication required",
            headers={"WWW-Authenticate": "Bearer"},
        )
    return user
