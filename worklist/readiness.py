"""Readiness of the parts the worklist needs, each with a short fixed reason; the raw error goes to the log only.

`/readyz` is unauthenticated, so its answer names the part and one of a few fixed words ("unreachable",
"schema missing", ...): never an exception's text, which can carry host names, SQL or library internals.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

from cxr_triage.logs import get_logger
from cxr_triage.settings import Settings

log = get_logger(__name__)

UNREACHABLE = "unreachable"
SCHEMA_MISSING = "schema missing"
SCHEMA_OUTDATED = "schema out of date"
SCHEMA_UNKNOWN = "schema unknown"


@dataclass(frozen=True)
class Part:
    name: str
    ok: bool
    reason: str


def _down(name: str, reason: str, exc: BaseException | None = None) -> Part:
    error = f"{type(exc).__name__}: {str(exc)[:500]}" if exc is not None else None
    log.warning("readyz.part_down", part=name, reason=reason, error=error)
    return Part(name, False, reason)


@lru_cache(maxsize=1)
def _revisions() -> tuple[frozenset[str], frozenset[str]]:
    """The head revision(s) of the migrations this code ships, and every revision it knows."""
    from alembic.script import ScriptDirectory

    from db.migrate import alembic_config

    scripts = ScriptDirectory.from_config(alembic_config("sqlite://"))
    return frozenset(scripts.get_heads()), frozenset(rev.revision for rev in scripts.walk_revisions())


def database(settings: Settings) -> Part:
    """Reachable, and at the schema revision this code expects (the head of its migrations)."""
    from sqlalchemy import text

    from db.session import engine_for

    try:
        with engine_for(settings.effective_database_url).connect() as conn:
            conn.execute(text("SELECT 1"))
            try:
                revision = conn.execute(text("SELECT version_num FROM alembic_version")).scalar()
            except Exception as exc:
                return _down("database", SCHEMA_MISSING, exc)
    except Exception as exc:
        return _down("database", UNREACHABLE, exc)
    heads, known = _revisions()
    if revision is None:
        return _down("database", SCHEMA_MISSING)
    if revision not in known:
        return _down("database", SCHEMA_UNKNOWN)
    if revision not in heads:
        return _down("database", SCHEMA_OUTDATED)
    return Part("database", True, f"schema revision {revision}")


def broker(settings: Settings) -> Part:
    from infra.queue import producer

    try:
        with producer(settings).connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=2)
    except Exception as exc:
        return _down("broker", UNREACHABLE, exc)
    return Part("broker", True, "reachable")


BELOW_WATERMARK = "below free-space watermark"


def spool(settings: Settings) -> Part:
    """The listener refuses new instances while the spool's filesystem is below its free-space watermark."""
    from infra.disk import spool_space

    try:
        space = spool_space(settings)
    except OSError as exc:
        return _down("spool", UNREACHABLE, exc)
    if space.below_watermark:
        return _down("spool", BELOW_WATERMARK)
    return Part("spool", True, "above free-space watermark")


# The parts /readyz checks, in order; a new part is one function here that returns a Part with a fixed reason.
PARTS: tuple[Callable[[Settings], Part], ...] = (database, broker, spool)


def check(settings: Settings) -> list[Part]:
    return [part(settings) for part in PARTS]
