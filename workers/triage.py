"""The triage of one instance as a plain function: claim, decode, run the ensemble, store the prediction."""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import torch

from cxr_triage.logs import get_logger
from cxr_triage.pixels import PixelDecodeError, decode_dicom, normalise, read_dataset
from cxr_triage.settings import Settings
from db import repo
from db.models import Instance, InstanceStatus, utcnow
from db.session import session_scope
from workers.ensemble import EnsembleProvider

log = get_logger(__name__)


@dataclass(frozen=True)
class TriageOutcome:
    status: str
    detail: str = ""


def triage_instance(settings: Settings, instance_id: int, provider: EnsembleProvider) -> TriageOutcome:
    """Idempotent: a finished instance is left alone; a repeated run writes no second prediction."""
    url = settings.effective_database_url
    with session_scope(url) as session:
        instance = repo.claim(session, instance_id)
        if instance is None:
            return TriageOutcome("duplicate", "already finished or unknown")
        path = Path(instance.path)
        sop_uid = instance.sop_instance_uid
        queued_at = instance.queued_at
    bound = log.bind(sop_instance_uid=sop_uid)

    ensemble = provider.current()
    if ensemble is None:
        with session_scope(url) as session:
            inst = session.get(Instance, instance_id)
            assert inst is not None
            repo.set_status(session, inst, InstanceStatus.AWAITING_MODEL, "no promoted model set")
        bound.info("triage.awaiting_model")
        return TriageOutcome(InstanceStatus.AWAITING_MODEL)

    queue_wait_ms = (utcnow() - _aware(queued_at)).total_seconds() * 1000 if queued_at else None
    started = time.perf_counter()
    try:
        ds = read_dataset(path)
        inputs = {
            size: normalise(decode_dicom(ds, size).pixels)[None] for size in sorted(ensemble.input_sizes)
        }
    except (PixelDecodeError, OSError) as exc:
        reason = str(exc)[:500]
        with session_scope(url) as session:
            inst = session.get(Instance, instance_id)
            assert inst is not None
            repo.set_status(session, inst, InstanceStatus.FAILED, reason)
        bound.warning("triage.failed", reason=reason)
        return TriageOutcome(InstanceStatus.FAILED, reason)
    decode_ms = (time.perf_counter() - started) * 1000

    started = time.perf_counter()
    output = ensemble.predict_batch(inputs)[0]
    inference_ms = (time.perf_counter() - started) * 1000

    with session_scope(url) as session:
        inst = session.get(Instance, instance_id)
        assert inst is not None
        repo.save_prediction(
            session,
            inst,
            model_set=ensemble.name,
            model_versions=ensemble.versions,
            label=output.label,
            probabilities=output.probabilities,
            member_probabilities=output.member_probabilities,
            queue_wait_ms=queue_wait_ms,
            decode_ms=decode_ms,
            inference_ms=inference_ms,
            not_for_clinical_use=ensemble.not_for_clinical_use,
        )
    bound.info(
        "triage.done",
        label=output.label,
        model_set=ensemble.name,
        decode_ms=round(decode_ms, 1),
        inference_ms=round(inference_ms, 1),
        queue_wait_ms=round(queue_wait_ms, 1) if queue_wait_ms is not None else None,
    )
    return TriageOutcome(InstanceStatus.DONE, output.label)


def _aware(value: datetime) -> datetime:
    # SQLite returns naive datetimes (stored as UTC); PostgreSQL returns aware ones.
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value


__all__ = ["TriageOutcome", "torch", "triage_instance"]
