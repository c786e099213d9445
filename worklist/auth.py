"""Users, scrypt password hashes, bearer tokens and login sessions (only token hashes are stored)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re
import secrets
import threading
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from cxr_triage.logs import get_logger
from cxr_triage.settings import get_settings
from db.models import as_utc, utcnow
from db.worklist_models import ApiToken, User

log = get_logger(__name__)
USERNAME_PATTERN = r"^[A-Za-z0-9._@-]{1,64}$"
SESSION_COOKIE = "cxr_session"
# scrypt work factors (RFC 7914, OWASP guidance: N=2^17, r=8, p=1 = 128 MiB of memory per hash). N comes from the
# setting CXR_PASSWORD_SCRYPT_N; every hash string carries its own N, r, p, so older hashes still verify and are
# re-hashed with the current cost at the next successful login.
SCRYPT_R, SCRYPT_P = 8, 1
# Bounds on the parameters read back from a stored hash (a corrupt row must not allocate gigabytes).
_MAX_N, _MAX_R, _MAX_P, _MAX_MEM = 2**20, 32, 16, 2**31 - 1
# At most this many hashes at once per process: each one holds 128*r*N bytes (128 MiB at the default cost), and a
# burst of concurrent logins must not multiply that by the size of the thread pool.
_SCRYPT_SLOTS = threading.BoundedSemaphore(max(1, min(4, os.cpu_count() or 1)))
_DUMMY_HASHES: dict[int, str] = {}


class AuthError(ValueError):
    pass


@dataclass(frozen=True)
class AuthUser:
    id: int
    username: str


def current_scrypt_n() -> int:
    """The cost of new hashes when the caller passes none: CXR_PASSWORD_SCRYPT_N."""
    return get_settings().password_scrypt_n


def _scrypt(password: str, salt: bytes, n: int, r: int, p: int, dklen: int) -> bytes:
    # OpenSSL needs 128*r*(N+p+2) bytes; the default maxmem (32 MiB) refuses N=2^17.
    maxmem = min(_MAX_MEM, 128 * r * (n + p + 2) + (1 << 20))
    with _SCRYPT_SLOTS:
        return hashlib.scrypt(password.encode(), salt=salt, n=n, r=r, p=p, dklen=dklen, maxmem=maxmem)


def hash_password(password: str, *, scrypt_n: int | None = None) -> str:
    """`scrypt$N$r$p$salt$digest` (base64), at cost `scrypt_n` (default: the setting)."""
    if not password:
        raise AuthError("the password must not be empty")
    n = scrypt_n or current_scrypt_n()
    salt = secrets.token_bytes(16)
    digest = _scrypt(password, salt, n, SCRYPT_R, SCRYPT_P, 32)
    b64 = base64.b64encode
    return f"scrypt${n}${SCRYPT_R}${SCRYPT_P}${b64(salt).decode()}${b64(digest).decode()}"


def _parameters(stored: str) -> tuple[int, int, int, bytes, bytes] | None:
    try:
        scheme, n, r, p, salt, digest = stored.split("$")
        params = int(n), int(r), int(p)
        decoded = base64.b64decode(salt), base64.b64decode(digest)
    except (ValueError, TypeError):
        return None
    if scheme != "scrypt" or not (1 < params[0] <= _MAX_N and 0 < params[1] <= _MAX_R and 0 < params[2] <= _MAX_P):
        return None
    return (*params, *decoded)


def verify_password(password: str, stored: str) -> bool:
    parsed = _parameters(stored)
    if parsed is None:
        return False
    n, r, p, salt, expected = parsed
    try:
        actual = _scrypt(password, salt, n, r, p, len(expected))
    except (ValueError, TypeError, MemoryError):
        return False
    return hmac.compare_digest(actual, expected)


def needs_rehash(stored: str, *, scrypt_n: int | None = None) -> bool:
    """Whether a (verified) hash was made with other parameters than the current ones."""
    parsed = _parameters(stored)
    return parsed is None or parsed[:3] != (scrypt_n or current_scrypt_n(), SCRYPT_R, SCRYPT_P)


def check_password_policy(username: str, password: str, *, min_length: int | None = None) -> None:
    """The minimum policy for a new password: long enough (CXR_PASSWORD_MIN_LENGTH) and not the username."""
    min_length = min_length or get_settings().password_min_length
    if len(password) < min_length:
        raise AuthError(f"the password must be at least {min_length} characters long")
    if password.strip().casefold() == username.strip().casefold():
        raise AuthError("the password must not be the username")


def create_user(session: Session, username: str, password: str, *, scrypt_n: int | None = None) -> User:
    if not re.fullmatch(USERNAME_PATTERN, username):
        raise AuthError("usernames are 1-64 characters: letters, digits, . _ @ -")
    if session.scalar(select(User).where(User.username == username)) is not None:
        raise AuthError(f"user {username!r} exists")
    user = User(username=username, password_hash=hash_password(password, scrypt_n=scrypt_n), is_active=True)
    session.add(user)
    session.flush()
    return user


def set_password(session: Session, username: str, password: str, *, scrypt_n: int | None = None) -> None:
    user = session.scalar(select(User).where(User.username == username))
    if user is None:
        raise AuthError(f"no user {username!r}")
    user.password_hash = hash_password(password, scrypt_n=scrypt_n)
    session.execute(delete(ApiToken).where(ApiToken.user_id == user.id, ApiToken.kind == "session"))


def authenticate(session: Session, username: str, password: str, *, scrypt_n: int | None = None) -> AuthUser | None:
    """The user if the password matches; the same work is done for unknown users (no timing oracle).

    A hash made at another cost than `scrypt_n` (default: the setting) is replaced on success.
    """
    n = scrypt_n or current_scrypt_n()
    user = session.scalar(select(User).where(User.username == username))
    if user is None or not user.is_active:
        if n not in _DUMMY_HASHES:
            _DUMMY_HASHES[n] = hash_password("dummy password", scrypt_n=n)
        verify_password(password, _DUMMY_HASHES[n])
        return None
    if not verify_password(password, user.password_hash):
        return None
    if needs_rehash(user.password_hash, scrypt_n=n):
        user.password_hash = hash_password(password, scrypt_n=n)
        log.info("auth.rehashed", user_id=user.id, scrypt_n=n)
    return AuthUser(user.id, user.username)


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
