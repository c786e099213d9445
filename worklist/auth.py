"""Users, scrypt password hashes, bearer tokens and login sessions (only token hashes are stored)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from db.models import as_utc, utcnow
from db.worklist_models import ApiToken, User

USERNAME_PATTERN = r"^[A-Za-z0-9._@-]{1,64}$"
SESSION_COOKIE = "cxr_session"
# scrypt work factors (RFC 7914): 16 MiB of memory per hash.
_SCRYPT_N, _SCRYPT_R, _SCRYPT_P = 2**14, 8, 1
_DUMMY_HASH: str | None = None


class AuthError(ValueError):
    pass


@dataclass(frozen=True)
class AuthUser:
    id: int
    username: str


def hash_password(password: str) -> str:
    if not password:
        raise AuthError("the password must not be empty")
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=_SCRYPT_N, r=_SCRYPT_R, p=_SCRYPT_P, dklen=32)
    b64 = base64.b64encode
    return f"scrypt${_SCRYPT_N}${_SCRYPT_R}${_SCRYPT_P}${b64(salt).decode()}${b64(digest).decode()}"


def verify_password(password: str, stored: str) -> bool:
    try:
        scheme, n, r, p, salt, digest = stored.split("$")
        if scheme != "scrypt":
            return False
        expected = base64.b64decode(digest)
        actual = hashlib.scrypt(
            password.encode(), salt=base64.b64decode(salt), n=int(n), r=int(r), p=int(p), dklen=len(expected)
        )
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(actual, expected)


def create_user(session: Session, username: str, password: str) -> User:
    if not re.fullmatch(USERNAME_PATTERN, username):
        raise AuthError("usernames are 1-64 characters: letters, digits, . _ @ -")
    if session.scalar(select(User).where(User.username == username)) is not None:
        raise AuthError(f"user {username!r} exists")
    user = User(username=username, password_hash=hash_password(password), is_active=True)
    session.add(user)
    session.flush()
    return user


def set_password(session: Session, username: str, password: str) -> None:
    user = session.scalar(select(User).where(User.username == username))
    if user is None:
        raise AuthError(f"no user {username!r}")
    user.password_hash = hash_password(password)
    session.execute(delete(ApiToken).where(ApiToken.user_id == user.id, ApiToken.kind == "session"))


def authenticate(session: Session, username: str, password: str) -> AuthUser | None:
    """The user if the password matches; the same work is done for unknown users (no timing oracle)."""
    global _DUMMY_HASH
    user = session.scalar(select(User).where(User.username == username))
    if user is None or not user.is_active:
        _DUMMY_HASH = _DUMMY_HASH or hash_password("dummy")
        verify_password(password, _DUMMY_HASH)
        return None
    return AuthUser(user.id, user.username) if verify_password(password, user.password_hash) else None


def _token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def issue_token(
    session: Session, user_id: int, *, kind: str, name: str | None = None, ttl_s: float | None = None
) -> str:
    """A new random token for the user; only its SHA-256 is stored, so the caller shows it once."""
    token = secrets.token_urlsafe(32)
    expires = utcnow() + timedelta(seconds=ttl_s) if ttl_s is not None else None
    session.add(ApiToken(user_id=user_id, token_hash=_token_hash(token), kind=kind, name=name, expires_at=expires))
    session.flush()
    return token


def user_for_token(session: Session, token: str) -> AuthUser | None:
    if not token or len(token) > 200:
        return None
    row = session.execute(
        select(ApiToken, User).join(User, User.id == ApiToken.user_id).where(ApiToken.token_hash == _token_hash(token))
    ).first()
    if row is None:
        return None
    api_token, user = row
    if not user.is_active or (api_token.expires_at is not None and as_utc(api_token.expires_at) < utcnow()):
        return None
    return AuthUser(user.id, user.username)


def revoke_token(session: Session, token: str) -> None:
    session.execute(delete(ApiToken).where(ApiToken.token_hash == _token_hash(token)))
