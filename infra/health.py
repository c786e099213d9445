"""Health checks for hospital IT: database, broker, spool, promoted model set and the DICOM listener (C-ECHO)."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass

from cxr_triage.registry import Registry
from cxr_triage.settings import Settings


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str


def check_database(settings: Settings) -> Check:
    from sqlalchemy import text

    from db.session import session_scope

    try:
        with session_scope(settings.effective_database_url) as session:
            revision = session.execute(text("SELECT version_num FROM alembic_version")).scalar()
        return Check("database", True, f"schema revision {revision}")
    except Exception as exc:
        return Check("database", False, f"{type(exc).__name__}: {str(exc)[:200]}")


def check_broker(settings: Settings) -> Check:
    from infra.queue import producer

    try:
        with producer(settings).connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=2)
        return Check("broker", True, settings.effective_broker_url.split("@")[-1])
    except Exception as exc:
        return Check("broker", False, f"{type(exc).__name__}: {str(exc)[:200]}")


def check_spool(settings: Settings) -> Check:
    from infra.disk import spool_space

    spool = settings.effective_spool_dir
    if settings.spool_url:
        from infra.objectstore import check_bucket

        try:
            store = check_bucket(settings)
        except OSError as exc:
            return Check("spool", False, f"{settings.spool_url}: {exc}")
    try:
        spool.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=spool, prefix=".health.") as fh:
            fh.write(b"ok")
            fh.flush()
            os.fsync(fh.fileno())
        space = spool_space(settings)
        detail = f"{spool} writable, {space.free_bytes / 1e9:.1f} GB free (watermark {space.watermark_bytes / 1e9:.1f})"
        if settings.spool_url:
            detail = f"{store}; receiving in {detail}"
        return Check("spool", not space.below_watermark, detail)
    except OSError as exc:
        return Check("spool", False, f"{spool}: {exc}")


def check_model(settings: Settings) -> Check:
    try:
        spec = Registry(settings.models_dir).promoted()
    except Exception as exc:
        return Check("model", False, f"{type(exc).__name__}: {exc}")
    if spec is None:
        return Check("model", False, "no promoted model set: instances wait as awaiting_model")
    return Check("model", True, f"{spec.name}: {', '.join(spec.members)}")


def check_listener(settings: Settings) -> Check:
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    ae = AE(ae_title="ECHOSCU")  # the probe AE title that deployments allow (deploy/README.md)
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 5
    host = "127.0.0.1" if settings.bind_address in ("0.0.0.0", "") else settings.bind_address
    assoc = ae.associate(host, settings.port, ae_title=settings.ae_title)
    if not assoc.is_established:
        return Check("listener", False, f"no association with {settings.ae_title}@{host}:{settings.port}")
    try:
        status = assoc.send_c_echo()
    finally:
        assoc.release()
    ok = bool(status) and status.Status == 0
    return Check("listener", ok, f"C-ECHO {settings.ae_title}@{host}:{settings.port}")


def queue_consumers(settings: Settings, timeout_s: float = 1.5) -> dict[str, int] | None:
    """How many running workers consume each queue (Celery remote control), or None where the broker cannot tell
    (the filesystem broker has no broadcast)."""
    from infra.queue import producer

    if not settings.effective_broker_url.startswith(("redis", "rediss", "amqp")):
        return None
    try:
        replies = producer(settings).control.inspect(timeout=timeout_s).active_queues() or {}
    except Exception:
        return None
    consumers: dict[str, int] = {}
    for queues in replies.values():
        for queue in queues or []:
            consumers[queue["name"]] = consumers.get(queue["name"], 0) + 1
    return consumers


def check_queues(settings: Settings) -> Check:
    """Each queue's waiting messages and consumers; fails when a queue holds work that no running worker consumes
    (a deployment that forgot the `cpu` worker never delivers a result)."""
    from infra.queue import QUEUES, queue_depth

    depths = {queue: queue_depth(settings, queue) for queue in QUEUES}
    consumers = queue_consumers(settings)
    starving = [q for q, n in depths.items() if n and consumers is not None and not consumers.get(q)]
    parts = []
    for queue, n in depths.items():
        held = "?" if consumers is None else str(consumers.get(queue, 0))
        parts.append(f"{queue}: {'?' if n is None else n} waiting, {held} consumer(s)")
    detail = "; ".join(parts)
    if starving:
        detail = f"no worker consumes {', '.join(starving)}, which holds work; {detail}"
    return Check("queues", not starving, detail)


def run_checks(settings: Settings, *, listener: bool = True) -> list[Check]:
    checks = [
        check_database(settings),
        check_broker(settings),
        check_queues(settings),
        check_spool(settings),
        check_model(settings),
    ]
    if listener:
        checks.append(check_listener(settings))
    return checks
