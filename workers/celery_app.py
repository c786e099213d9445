"""The Celery app: `celery -A workers.celery_app worker -Q gpu` (queues gpu with backlog, cpu, training)."""

from __future__ import annotations

import os
from typing import Any

import torch
from celery import Celery
from celery.exceptions import WorkerShutdown
from celery.schedules import crontab
from celery.signals import celeryd_after_setup, setup_logging, worker_init, worker_process_init

from cxr_triage.logs import configure_logging, get_logger
from cxr_triage.settings import get_settings
from infra.queue import QUEUE_TRAINING, RETRAIN_TASK, celery_config, remove_legacy_bindings, worker_queues

app = Celery("cxr_triage", include=["workers.tasks"])
app.conf.update(celery_config(get_settings()))
if get_settings().retrain_schedule:
    # `celery -A workers.celery_app beat` sends the retraining task to queue `training` on this schedule.
    minute, hour, day_of_month, month, day_of_week = get_settings().retrain_schedule.split()
    app.conf.beat_schedule = {
        "retrain": {
            "task": RETRAIN_TASK,
            "schedule": crontab(minute, hour, day_of_week, day_of_month, month),
            "options": {"queue": QUEUE_TRAINING},
        }
    }


@setup_logging.connect
def _setup_logging(**_: Any) -> None:
    settings = get_settings()
    configure_logging(level=settings.log_level, fmt=settings.log_format, component="worker")


@celeryd_after_setup.connect
def _consume_backlog_with_gpu(instance: Any, **_: Any) -> None:
    """A worker that consumes gpu consumes backlog too (infra/queue.py `worker_queues`), whatever its -Q says: the
    backlog is triaged by the same workers, when gpu is empty, and never left without a consumer."""
    queues = instance.app.amqp.queues
    consumed = list(queues.consume_from)
    wanted = worker_queues(consumed)
    if wanted != consumed:
        queues.select(wanted)
        get_logger(__name__).info("worker.queues", requested=consumed, consumed=wanted)


@worker_init.connect
def _init_worker(**_: Any) -> None:
    remove_legacy_bindings(get_settings())
    # `cuda` on a host without a usable GPU stops the worker now (exit 1), not at its first task. PyTorch asks NVML,
    # which does not initialise CUDA in the parent process that the pool forks from.
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    from workers.ensemble import DeviceUnavailable, pick_device

    try:
        pick_device(get_settings().device)
    except (DeviceUnavailable, ValueError) as exc:
        raise WorkerShutdown(str(exc)) from exc


@worker_process_init.connect
def _init_process(**_: Any) -> None:
    # Preprocessing is one image at a time: one thread measured 8x faster than two for the antialiased resize.
    torch.set_num_threads(1)
    settings = get_settings()
    configure_logging(level=settings.log_level, fmt=settings.log_format, component="worker")
