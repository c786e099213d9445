"""Retention of the spool: the files of finished instances go after CXR_SPOOL_RETENTION_DAYS, or oldest first while
the spool is over CXR_SPOOL_MAX_BYTES. An unfinished instance's file is never touched; each removal is recorded."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from cxr_triage.logs import get_logger
from cxr_triage.settings import Settings
from db.models import Instance, InstanceEvent, InstanceStatus, utcnow
from db.session import session_scope
from infra.objectstore import delete_object

log = get_logger(__name__)

FINISHED = tuple(InstanceStatus.TERMINAL)
BATCH = 500


@dataclass(frozen=True)
class Pruned:
    files: int
    bytes: int


def prune_spool(settings: Settings) -> Pruned:
    """One pass of the retention policy; returns what it removed. Does nothing when both limits are 0."""
    if not settings.spool_retention_days and not settings.spool_max_bytes:
        return Pruned(0, 0)
    url = settings.effective_database_url
    kept = Instance.spool_removed_at.is_(None)
    finished = Instance.status.in_(FINISHED)
    files = removed = 0
    with session_scope(url) as session:
        if settings.spool_retention_days:
            cutoff = utcnow() - timedelta(days=settings.spool_retention_days)
            old = session.scalars(
                select(Instance).where(kept, finished, Instance.received_at < cutoff).order_by(Instance.id).limit(BATCH)
            ).all()
            for instance in old:
                removed += _remove(settings, session, instance, f"older than {settings.spool_retention_days:g} days")
                files += 1
        if settings.spool_max_bytes:
            total = int(session.scalar(select(func.coalesce(func.sum(Instance.size_bytes), 0)).where(kept)) or 0)
            excess = total - settings.spool_max_bytes
            if excess > 0:
                oldest = session.scalars(
                    select(Instance).where(kept, finished).order_by(Instance.received_at, Instance.id).limit(BATCH)
                ).all()
                for instance in oldest:
                    if excess <= 0:
                        break
                    freed = _remove(settings, session, instance, f"spool over {settings.spool_max_bytes} bytes")
                    excess -= instance.size_bytes
                    removed += freed
                    files += 1
    if files:
        log.info("spool.pruned", files=files, bytes=removed)
    return Pruned(files, removed)


def _remove(settings: Settings, session: Session, instance: Instance, why: str) -> int:
    """Delete the instance's spool file or object (if still there) and record it; the row and its results stay."""
    size = delete_object(settings, instance.path)
    instance.spool_removed_at = utcnow()
    session.add(InstanceEvent(instance_id=instance.id, status=instance.status, reason=f"spool file removed: {why}"))
    return size
