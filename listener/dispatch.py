"""Hand instances to the broker (fresh ones to queue gpu, those that can wait to backlog), and the outbox loop that
re-sends what could not be handed over."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from cxr_triage.logs import get_logger
from cxr_triage.registry import Registry
from cxr_triage.routes import route_for
from cxr_triage.settings import Settings
from db import repo
from db.models import Instance, Study
from db.session import session_scope
from infra.queue import QUEUE_BACKLOG, QUEUE_CPU, QUEUE_GPU, hand_over_result, queue_depth, send_triage
from listener.retention import prune_spool

log = get_logger(__name__)


@dataclass(frozen=True)
class Routing:
    """What the backlog rule reads off an instance's row and its study's, as the listener recorded them."""

    study_date: str | None  # StudyDate, YYYYMMDD (a DICOM DA; anything else counts as unknown)
    requested_priority: str | None  # RequestedProcedurePriority
    calling_aet: str | None  # of the association that sent it


def triage_queue(settings: Settings, routing: Routing, *, now: datetime | None = None) -> tuple[str, str | None]:
    """The queue of an instance's triage task and why it waits: (gpu, None), or (backlog, reason) for an instance
    from a bulk sender (CXR_BACKLOG_CALLING_AETS), with a low requested priority (CXR_BACKLOG_PRIORITIES), or whose
    StudyDate ended more than CXR_BACKLOG_AGE_H hours before `now` (local time, as DICOM dates are; default: now).

    Only the date is recorded, so a study counts from the end of its StudyDate: never older than it is. An absent or
    malformed date is fresh: what the rule cannot read goes to gpu."""
    if routing.calling_aet is not None and routing.calling_aet.strip() in settings.backlog_calling_aets:
        return QUEUE_BACKLOG, "bulk-sender"
    if routing.requested_priority and routing.requested_priority.strip().upper() in settings.backlog_priorities:
        return QUEUE_BACKLOG, "low-priority"
    if settings.backlog_age_h > 0 and routing.study_date:
        try:
            day = datetime.strptime(routing.study_date.strip(), "%Y%m%d")
        except ValueError:
            return QUEUE_GPU, None
        now = datetime.now() if now is None else now
        if day + timedelta(days=1) <= now - timedelta(hours=settings.backlog_age_h):
            return QUEUE_BACKLOG, "old-study"
    return QUEUE_GPU, None


def routings(session: Session, instance_ids: Iterable[int]) -> dict[int, tuple[str, Routing]]:
    """SOP Instance UID and routing fields of each instance."""
    rows = session.execute(
        select(Instance.id, Instance.sop_instance_uid, Study.study_date, Study.requested_priority, Instance.calling_aet)
        .join(Study, Study.id == Instance.study_id)
        .where(Instance.id.in_(list(instance_ids)))
    )
    return {int(i): (str(uid), Routing(date, priority, aet)) for i, uid, date, priority, aet in rows}


class Dispatcher:
    """Sends triage tasks; after a broker failure it stops trying for `backoff_s` so C-STOREs stay fast."""

    def __init__(self, settings: Settings, *, backoff_s: float = 5.0) -> None:
        self.settings = settings
        self.backoff_s = backoff_s
        self._down_until = 0.0
        self._lock = threading.Lock()

    def broker_suspended(self) -> bool:
        return time.monotonic() < self._down_until

    def dispatch(self, instance_id: int, *, sop_instance_uid: str, routing: Routing | None = None) -> bool:
        """Send the instance's triage task to the queue `triage_queue` chooses (from `routing`, read off the row when
        not given). True if the broker accepted it (and the row is now queued); False leaves it for the outbox."""
        if self.broker_suspended():
            return False
        if routing is None:
            try:
                with session_scope(self.settings.effective_database_url) as session:
                    routing = routings(session, [instance_id])[instance_id][1]
            except Exception as exc:  # the database away (or the row gone): the outbox sends it later
                log.warning("queue.route_failed", sop_instance_uid=sop_instance_uid,
                            error=f"{type(exc).__name__}: {exc}"[:200])  # fmt: skip
                return False
        queue, reason = triage_queue(self.settings, routing)
        try:
            task_id = send_triage(self.settings, instance_id, sop_instance_uid=sop_instance_uid, queue=queue)
        except Exception as exc:  # any broker failure: the row stays put and the outbox retries
            with self._lock:
                self._down_until = time.monotonic() + self.backoff_s
            log.warning("queue.send_failed", sop_instance_uid=sop_instance_uid, error=f"{type(exc).__name__}: {exc}")
            return False
        with session_scope(self.settings.effective_database_url) as session:
            route = route_for(self.settings, routing.calling_aet)
            repo.mark_queued(session, instance_id, queue=queue, results_destination=str(route) if route else None)
        fields: dict[str, Any] = {"backlog_reason": reason} if reason else {}
        log.info("queue.sent", sop_instance_uid=sop_instance_uid, task_id=task_id, queue=queue, **fields)
        return True

    def flush_outbox(self) -> int:
        """One pass of the outbox: (re-)send what is due. Returns how many were sent."""
        registry = Registry(self.settings.models_dir)
        # With the broker's triage queues empty (gpu and backlog), anything still `queued` after the heartbeat timeout
        # lost its message (say, a Redis restarted empty): re-send it now, not after requeue_after_s. A needless
        # re-send is a duplicate task, which the claim turns away.
        empty = all(queue_depth(self.settings, queue) == 0 for queue in (QUEUE_GPU, QUEUE_BACKLOG))
        lost_before = repo.stale_cutoff(self.settings.heartbeat_timeout_s) if empty else None
        with session_scope(self.settings.effective_database_url) as session:
            ids = repo.dispatchable(
                session,
                stale_before=repo.stale_cutoff(self.settings.requeue_after_s),
                silent_before=repo.stale_cutoff(self.settings.heartbeat_timeout_s),
                lost_before=lost_before,
                model_available=registry.promoted_name() is not None,
            )
            pending = sorted(routings(session, ids).items())
        self._down_until = 0.0  # the outbox always probes the broker
        sent = 0
        for instance_id, (sop_uid, routing) in pending:
            if not self.dispatch(instance_id, sop_instance_uid=sop_uid, routing=routing):
                break
            sent += 1
        if pending:
            log.info("outbox.flushed", due=len(pending), sent=sent)
        if sent == len(pending):
            sent += self._flush_results()
        return sent

    def _flush_results(self) -> int:
        """Result objects (SR, heatmap) whose delivery task never reached the broker, or went missing."""
        empty = queue_depth(self.settings, QUEUE_CPU) == 0  # as for instances: queued results lost their messages
        lost_before = repo.stale_cutoff(self.settings.heartbeat_timeout_s) if empty else None
        with session_scope(self.settings.effective_database_url) as session:
            due = repo.results_to_send(
                session, stale_before=repo.stale_cutoff(self.settings.requeue_after_s), lost_before=lost_before
            )
        sent = 0
        for result_id in due:
            if not hand_over_result(self.settings, result_id):
                break
            sent += 1
        return sent


class Outbox(threading.Thread):
    """Background loop in the listener: every `interval_s`, flush the outbox; every `retention_s`, apply the spool's
    retention policy (listener/retention.py). Never dies on an error."""

    def __init__(self, dispatcher: Dispatcher, interval_s: float, *, retention_s: float = 3600.0) -> None:
        super().__init__(name="outbox", daemon=True)
        self.dispatcher = dispatcher
        self.interval_s = interval_s
        self.retention_s = retention_s
        self.stopped = threading.Event()

    def run(self) -> None:
        next_prune = time.monotonic()
        while not self.stopped.wait(self.interval_s):
            try:
                self.dispatcher.flush_outbox()
            except Exception as exc:
                log.warning("outbox.error", error=f"{type(exc).__name__}: {exc}")
            if time.monotonic() >= next_prune:
                next_prune = time.monotonic() + self.retention_s
                try:
                    prune_spool(self.dispatcher.settings)
                except Exception as exc:
                    log.warning("spool.prune_error", error=f"{type(exc).__name__}: {exc}")

    def stop(self) -> None:
        self.stopped.set()
