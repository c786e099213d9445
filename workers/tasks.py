"""Celery tasks: thin shells around plain functions (workers/triage.py)."""

from __future__ import annotations

from typing import Any, Literal

import structlog
from celery import Task

from cxr_triage.registry import Registry
from cxr_triage.settings import get_settings
from infra.queue import RETRAIN_TASK, SEND_RESULT_TASK, TRIAGE_TASK
from workers.celery_app import app
from workers.delivery import Delivery, deliver
from workers.ensemble import EnsembleProvider
from workers.triage import TRANSIENT_ERRORS, triage_instance

_providers: dict[str, EnsembleProvider] = {}


def provider(pointer: Literal["promoted", "shadow"] = "promoted") -> EnsembleProvider:
    """The process's holder of the promoted (or the shadow) set: loaded once per worker process, not per task."""
    if pointer not in _providers:
        settings = get_settings()
        _providers[pointer] = EnsembleProvider(
            Registry(settings.models_dir),
            device=settings.device,
            poll_s=settings.model_poll_s,
            backend=settings.inference_backend,
            cache_dir=settings.home / "onnx-cache",
            autocast=settings.inference_autocast,
            pointer=pointer,
            threads=settings.inference_threads,
        )
    return _providers[pointer]


@app.task(
    bind=True,
    name=TRIAGE_TASK,
    autoretry_for=TRANSIENT_ERRORS,  # the database or broker away; any other error ends the instance `failed`
    retry_backoff=2,
    retry_backoff_max=300,
    retry_jitter=True,
    max_retries=get_settings().task_max_retries,
)
def triage(self: Task, instance_id: int, sop_instance_uid: str = "", **_: Any) -> str:
    """Triage one instance (idempotent; safe to deliver twice)."""
    structlog.contextvars.bind_contextvars(task_id=self.request.id, sop_instance_uid=sop_instance_uid)
    try:
        outcome = triage_instance(get_settings(), instance_id, provider(), provider("shadow"))
        return outcome.status
    finally:
        structlog.contextvars.unbind_contextvars("task_id", "sop_instance_uid")


@app.task(bind=True, name=SEND_RESULT_TASK, max_retries=None)
def send_result(self: Task, result_id: int) -> str:
    """Deliver one result object to the PACS; retried with exponential backoff, then recorded as failed."""
    settings = get_settings()
    attempt = self.request.retries + 1
    outcome = deliver(settings, result_id, attempt=attempt)
    if outcome.status is Delivery.RETRY:
        countdown = min(settings.results_retry_base_s * 2**self.request.retries, 3600.0)
        raise self.retry(countdown=countdown)
    return outcome.status


@app.task(bind=True, name=RETRAIN_TASK, acks_late=True)
def retrain(self: Task, manifest: str | None = None, **overrides: Any) -> dict[str, Any]:
    """Scheduled (or hand-triggered) retraining: split, train, evaluate, gate, promote. Returns the decision.

    Running triage workers pick up a newly promoted ensemble between tasks (they poll the registry pointer).
    """
    from dataclasses import asdict

    from training.pipeline import RetrainConfig
    from training.pipeline import retrain as run_retrain

    config = RetrainConfig.from_settings(get_settings(), manifest, **overrides)
    log = structlog.get_logger("retrain").bind(task_id=self.request.id)
    decision = run_retrain(config, log=lambda message: log.info("retrain.progress", message=str(message)[:500]))
    log.info("retrain.decided", candidate=decision.candidate, accepted=decision.accepted, reasons=decision.reasons)
    return asdict(decision)
