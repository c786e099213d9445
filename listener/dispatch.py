"""Hand instances to the broker, and the outbox loop that re-sends what could not be handed over."""

from __future__ import annotations

import threading
import time

from sqlalchemy import select

from cxr_triage.logs import get_logger
from cxr_triage.registry import Registry
from cxr_triage.settings import Settings
from db import repo
from db.models import Instance
from db.session import session_scope
from infra.queue import QUEUE_CPU, hand_over_result, queue_depth, send_triage
from listener.retention import prune_spool

log = get_logger(__name__)


class Dispatcher:
    """Sends triage tasks; after a broker failure it stops trying for `backoff_s` so C-STOREs stay fast."""

    def __init__(self, settings: Settings, *, backoff_s: float = 5.0) -> None:
        self.settings = settings
        self.backoff_s = backoff_s
        self._down_until = 0.0
        self._lock = threading.Lock()

    def broker_suspended(self) -> bool:
        return time.monotonic() < self._down_until

    def dispatch(self, instance_id: int, *, sop_instance_uid: str) -> bool:
        """True if the broker accepted the task (and the row is now queued); False leaves it for the outbox."""
        if self.broker_suspended():
            return False
        try:
            task_id = send_triage(self.settings, instance_id, sop_instance_uid=sop_instance_uid)
        except Exception as exc:  # any broker failure: the row stays put and the outbox retries
            with self._lock:
                self._down_until = time.monotonic() + self.backoff_s
            log.warning("queue.send_failed", sop_instance_uid=sop_instance_uid, error=f"{type(exc).__name__}: {exc}")
            return False
        with session_scope(self.settings.effective_database_url) as session:
            repo.mark_queued(session, instance_id)
        log.info("queue.sent", sop_instance_uid=sop_instance_uid, task_id=task_id)
        return True

    def flush_outbox(self) -> int:
        """One pass of the outbox: (re-)send what is due. Returns how many were sent."""
        registry = Registry(self.settings.models_dir)
        # With the broker's queue empty, anything still `queued` after the heartbeat timeout lost its message (say, a
        # Redis restarted empty): re-send it now, not after requeue_after_s. A needless re-send is a duplicate task,
        # which the claim turns away.
        lost_before = repo.stale_cutoff(self.settings.heartbeat_timeout_s) if queue_depth(self.settings) == 0 else None
        with session_scope(self.settings.effective_database_url) as session:
            ids = repo.dispatchable(
                session,
                stale_before=repo.stale_cutoff(self.settings.requeue_after_s),
                silent_before=repo.stale_cutoff(self.settings.heartbeat_timeout_s),
                lost_before=lost_before,
                model_available=registry.promoted_name() is not None,
            )
            rows = session.execute(select(Instance.id, Instance.sop_instance_uid).where(Instance.id.in_(ids)))
            pending = sorted((int(i), str(uid)) for i, uid in rows)
        self._down_until = 0.0  # the outbox always probes the broker
        sent = 0
        for instance_id, sop_uid in pending:
            if not self.dispatch(instance_id, sop_instance_uid=sop_uid):
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
