"""The Celery configuration and the producer side of the queues (listener, workers and tools send by task name)."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Sequence
from typing import Any

from celery import Celery
from kombu.entity import Exchange, Queue
from kombu.exceptions import ChannelError
from kombu.transport import filesystem
from kombu.transport.virtual import BrokerState, Empty
from kombu.utils.scheduling import FairCycle

from cxr_triage.logs import get_logger
from cxr_triage.settings import Settings
from db import repo
from db.session import session_scope

log = get_logger(__name__)

TRIAGE_TASK = "cxr_triage.triage"
RETRAIN_TASK = "cxr_triage.retrain"
SEND_RESULT_TASK = "cxr_triage.send_result"
QUEUE_GPU = "gpu"
QUEUE_CPU = "cpu"
QUEUE_TRAINING = "training"
# Triage of instances that can wait (README: fresh studies ahead of the backlog): consumed by every worker that consumes
# gpu, and taken only when gpu (and cpu, where the same worker delivers results) is empty.
QUEUE_BACKLOG = "backlog"

# In the order a worker started without -Q consumes them: a worker takes from the first of its queues that holds work.
QUEUES = (QUEUE_GPU, QUEUE_CPU, QUEUE_BACKLOG, QUEUE_TRAINING)
TRIAGE_QUEUES = (QUEUE_GPU, QUEUE_BACKLOG)


def worker_queues(requested: Sequence[str]) -> list[str]:
    """The queues a worker asked for `requested` (its -Q, in order) consumes: one that consumes gpu consumes backlog
    too, after the others and before training (a backlog never waits on a forgotten -Q). Given explicitly, backlog
    stays where the operator put it."""
    queues = list(dict.fromkeys(requested))
    if QUEUE_GPU in queues and QUEUE_BACKLOG not in queues:
        at = queues.index(QUEUE_TRAINING) if QUEUE_TRAINING in queues else len(queues)
        queues.insert(at, QUEUE_BACKLOG)
    return queues


class _InOrder(FairCycle):
    """Each poll tries the queues in the order the worker consumes them, where kombu's FairCycle takes turns."""

    def get(self, callback: Any, **kwargs: Any) -> Any:
        for queue in list(self.resources):
            try:
                return self.fun(queue, callback, **kwargs)
            except self.predicate:
                continue
        raise self.predicate()


class _InOrderFilesystemChannel(filesystem.Channel):
    def _reset_cycle(self) -> None:
        self._cycle = _InOrder(self._get_and_deliver, self._active_queues, Empty)


_filesystem_states: dict[str, BrokerState] = {}  # control folder -> the bindings written there


class InOrderFilesystemTransport(filesystem.Transport):
    """kombu's filesystem transport (the embedded broker), but a worker takes from the first of its queues that holds
    a message, as Redis's `queue_order_strategy: priority` does; kombu's own takes from each queue in turn.

    kombu also keeps which bindings it has written in one state per process, whatever the folder: a second broker
    folder in the same process (tests, tools) would never get its bindings, and messages sent there vanish. Here the
    state is one per control folder."""

    Channel = _InOrderFilesystemChannel

    def __init__(self, client: Any, **kwargs: Any) -> None:
        super().__init__(client, **kwargs)
        folder = str(client.transport_options.get("control_folder", "control"))
        self.state = _filesystem_states.setdefault(folder, BrokerState())


def _queue(name: str) -> Queue:
    return Queue(name, Exchange(name, type="direct"), routing_key=name)


def _route(name: str) -> dict[str, str]:
    return {"queue": name, "exchange": name, "routing_key": name}


def celery_config(settings: Settings) -> dict[str, Any]:
    """The configuration every process shares (producer and workers must agree on it)."""
    url = settings.effective_broker_url
    transport_options: dict[str, Any] = {}
    transport: str | None = None  # the URL's scheme decides
    if url.startswith("filesystem"):
        folder = settings.broker_dir.resolve()
        for sub in ("out", "processed", "control"):
            (folder / sub).mkdir(parents=True, exist_ok=True)
        transport_options = {
            "data_folder_in": str(folder / "out"),
            "data_folder_out": str(folder / "out"),
            "processed_folder": str(folder / "processed"),
            "control_folder": str(folder / "control"),
            "store_processed": False,
            "polling_interval": 0.1,  # kombu's default (1 s) would add up to a second to every task
        }
        transport = f"{__name__}:InOrderFilesystemTransport"  # takes from a worker's queues in order, as below
    elif url.startswith(("redis", "rediss")):
        transport_options = {
            "visibility_timeout": settings.visibility_timeout_s,
            # BRPOP on a worker's queues in its -Q order every time (kombu's default rotates the last used queue to
            # the end): gpu before backlog, so a fresh instance is the next one a worker takes.
            "queue_order_strategy": "priority",
        }
    return {
        "broker_url": url,
        "broker_transport": transport,
        "broker_transport_options": transport_options,
        "broker_connection_retry_on_startup": True,
        "broker_connection_timeout": 2.0,
        # Each queue on its own direct exchange and routing key, so that the broker's bindings say where a message
        # goes (with bare Queue(name), Celery binds every queue to the default exchange and key "cpu").
        "task_queues": tuple(_queue(name) for name in QUEUES),
        "task_default_queue": QUEUE_CPU,
        "task_default_exchange": QUEUE_CPU,
        "task_default_routing_key": QUEUE_CPU,
        "task_routes": {
            TRIAGE_TASK: _route(QUEUE_GPU),  # unless sent to backlog (send_triage)
            SEND_RESULT_TASK: _route(QUEUE_CPU),
            RETRAIN_TASK: _route(QUEUE_TRAINING),
        },
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "task_serializer": "json",
        "accept_content": ["json"],
        "result_backend": None,
        "task_ignore_result": True,
        "worker_hijack_root_logger": False,
        "worker_send_task_events": False,
    }


_producers: dict[str, Celery] = {}
# kombu's filesystem transport keeps its exchange tables in JSON files that concurrent senders in one process read
# while another rewrites them (JSONDecodeError): sends through it take turns. Redis needs no lock.
_filesystem_send = threading.Lock()


def _sending(settings: Settings) -> contextlib.AbstractContextManager[object]:
    return _filesystem_send if settings.effective_broker_url.startswith("filesystem") else contextlib.nullcontext()


def producer(settings: Settings) -> Celery:
    """A Celery app used only to send tasks by name (no task code imported); one per broker URL."""
    key = f"{settings.effective_broker_url}|{settings.broker_dir.resolve()}"
    if key not in _producers:
        app = Celery("cxr_triage_producer")
        app.conf.update(celery_config(settings))
        _producers[key] = app
    return _producers[key]


def _send(settings: Settings, task: str, queue: str, args: list[Any], kwargs: dict[str, Any], timeout_s: float) -> str:
    """Publish `task` to `queue`; raises if the broker does not accept it within `timeout_s` (one retry)."""
    retry_policy = {"max_retries": 1, "interval_start": 0, "interval_step": timeout_s / 2, "interval_max": timeout_s}
    with _sending(settings):
        # Exchange and routing key with the queue: a task route's own (task_routes) would win over a bare queue.
        result = producer(settings).send_task(
            task, args=args, kwargs=kwargs, **_route(queue), retry=True, retry_policy=retry_policy
        )
    return str(result.id)


def send_triage(
    settings: Settings, instance_id: int, *, sop_instance_uid: str, queue: str = QUEUE_GPU, timeout_s: float = 3.0
) -> str:
    """Send the triage task for `instance_id` to `queue`: gpu, or backlog for an instance that can wait
    (listener/dispatch.py `triage_queue`)."""
    if queue not in TRIAGE_QUEUES:
        raise ValueError(f"triage goes to one of {TRIAGE_QUEUES}, not {queue!r}")
    return _send(settings, TRIAGE_TASK, queue, [instance_id], {"sop_instance_uid": sop_instance_uid}, timeout_s)


def send_result(settings: Settings, result_id: int, *, timeout_s: float = 3.0) -> str:
    """Send the delivery task of a result object to queue `cpu`."""
    return _send(settings, SEND_RESULT_TASK, QUEUE_CPU, [result_id], {}, timeout_s)


def hand_over_result(settings: Settings, result_id: int) -> bool:
    """Send a result object's delivery task to queue `cpu` and mark the row queued.

    False when the broker did not take it: the row stays pending and the listener's outbox sends it later. The one
    place results are (re-)queued, by the worker after a triage and by the outbox.
    """
    try:
        send_result(settings, result_id)
    except Exception as exc:  # any broker failure: the row stays pending
        log.warning("queue.send_failed", result_id=result_id, error=f"{type(exc).__name__}: {exc}"[:200])
        return False
    with session_scope(settings.effective_database_url) as session:
        repo.mark_result_queued(session, result_id)
    return True


def queue_depth(settings: Settings, queue: str = QUEUE_GPU) -> int | None:
    """Messages waiting in `queue` on the broker (not those a worker holds), or None when the broker cannot say."""
    try:
        with _sending(settings), producer(settings).connection_for_read() as conn:
            conn.ensure_connection(max_retries=1, timeout=2)
            try:
                _, count, _ = conn.default_channel.queue_declare(queue=queue, passive=True)
            except ChannelError as exc:
                if "NOT_FOUND" in str(exc):  # never declared, or the broker restarted empty: it holds nothing
                    return 0
                raise
            return int(count)
    except Exception:  # broker down: unknown, not empty (the broker check reports why)
        return None


def remove_legacy_bindings(settings: Settings) -> int:
    """Unbind queues gpu and training from exchange "cpu", where releases before per-queue exchanges bound them.

    A Redis broker keeps bindings across restarts (sets `_kombu.binding.<exchange>`), and kombu's unbind does not
    remove them there; left in place, a message routed to "cpu" would also land in gpu and training. Run by each
    worker at start; returns how many bindings it removed (other brokers: 0).
    """
    if not settings.effective_broker_url.startswith(("redis", "rediss")):
        return 0
    removed = 0
    with producer(settings).connection_for_write() as conn:
        channel: Any = conn.default_channel
        for name in (QUEUE_GPU, QUEUE_TRAINING):
            member = channel.sep.join([QUEUE_CPU, "", name])
            removed += int(channel.client.srem(channel.keyprefix_queue % QUEUE_CPU, member))
            channel.client.srem(channel.keyprefix_binding_permanent % QUEUE_CPU, member)
    if removed:
        log.info("queue.legacy_bindings_removed", count=removed)
    return removed
