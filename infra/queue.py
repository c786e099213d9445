"""The Celery configuration and the producer side of the queues (listener, workers and tools send by task name)."""

from __future__ import annotations

from typing import Any

from celery import Celery
from kombu.entity import Queue

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


def celery_config(settings: Settings) -> dict[str, Any]:
    """The configuration every process shares (producer and workers must agree on it)."""
    url = settings.effective_broker_url
    transport_options: dict[str, Any] = {}
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
    elif url.startswith(("redis", "rediss")):
        transport_options = {"visibility_timeout": settings.visibility_timeout_s}
    return {
        "broker_url": url,
        "broker_transport_options": transport_options,
        "broker_connection_retry_on_startup": True,
        "broker_connection_timeout": 2.0,
        "task_queues": (Queue(QUEUE_GPU), Queue(QUEUE_CPU), Queue(QUEUE_TRAINING)),
        "task_default_queue": QUEUE_CPU,
        "task_routes": {
            TRIAGE_TASK: {"queue": QUEUE_GPU},
            SEND_RESULT_TASK: {"queue": QUEUE_CPU},
            RETRAIN_TASK: {"queue": QUEUE_TRAINING},
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


def producer(settings: Settings) -> Celery:
    """A Celery app used only to send tasks by name (no task code imported); one per broker URL."""
    key = f"{settings.effective_broker_url}|{settings.broker_dir.resolve()}"
    if key not in _producers:
        app = Celery("cxr_triage_producer")
        app.conf.update(celery_config(settings))
        _producers[key] = app
    return _producers[key]


def send_triage(settings: Settings, instance_id: int, *, sop_instance_uid: str, timeout_s: float = 3.0) -> str:
    """Send the triage task for `instance_id`; raises if the broker does not accept it within `timeout_s`."""
    app = producer(settings)
    result = app.send_task(
        TRIAGE_TASK,
        args=[instance_id],
        kwargs={"sop_instance_uid": sop_instance_uid},
        queue=QUEUE_GPU,
        retry=True,
        retry_policy={
            "max_retries": 1,
            "interval_start": 0,
            "interval_step": timeout_s / 2,
            "interval_max": timeout_s,
        },
    )
    return str(result.id)


def send_result(settings: Settings, result_id: int, *, timeout_s: float = 3.0) -> str:
    """Send the delivery task of a result object to queue `cpu`."""
    result = producer(settings).send_task(
        SEND_RESULT_TASK,
        args=[result_id],
        queue=QUEUE_CPU,
        retry=True,
        retry_policy={"max_retries": 1, "interval_start": 0, "interval_step": timeout_s / 2, "interval_max": timeout_s},
    )
    return str(result.id)


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
