"""The triage of one instance as a plain function: claim, decode, run the ensemble, store the prediction."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from cxr_triage.logs import get_logger
from cxr_triage.pixels import PixelDecodeError, decode_dicom, normalise, read_dataset
from cxr_triage.settings import Settings
from db import repo
from db.models import Instance, InstanceStatus, as_utc, utcnow
from db.session import session_scope
from db.worklist_repo import assign_priority
from infra.queue import hand_over_result
from workers import results
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
        instance = repo.claim(session, instance_id, max_attempts=settings.task_max_attempts)
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

    queue_wait_ms = (utcnow() - as_utc(queued_at)).total_seconds() * 1000 if queued_at else None
    started = time.perf_counter()
    try:
        ds = read_dataset(path)
        inputs = {size: normalise(decode_dicom(ds, size).pixels)[None] for size in sorted(ensemble.input_sizes)}
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

    started = time.perf_counter()
    results_error = None
    try:
        objects = results.produce(settings, ds, ensemble, inputs, output)
    except Exception as exc:  # the prediction stands even if a result object cannot be built
        objects = []
        results_error = f"{type(exc).__name__}: {exc}"[:300]
        bound.error("results.build_failed", error=results_error)
    results_ms = (time.perf_counter() - started) * 1000

    with session_scope(url) as session:
        inst = session.get(Instance, instance_id)
        assert inst is not None
        record = repo.PredictionRecord(
            model_set=ensemble.name,
            model_versions=ensemble.versions,
            label=output.label,
            probabilities=output.probabilities,
            member_probabilities=output.member_probabilities,
            queue_wait_ms=queue_wait_ms,
            decode_ms=decode_ms,
            inference_ms=inference_ms,
            not_for_clinical_use=ensemble.not_for_clinical_use,
            ood_score=output.ood_score,
            out_of_distribution=output.out_of_distribution if output.ood_score is not None else None,
            operating_point=dict(ensemble.spec.operating_point) or None,
        )
        prediction = repo.save_prediction(session, inst, record)
        assign_priority(session, instance_id, settings)  # the worklist priority, in the same transaction
        if results_error:
            inst.status_reason = f"{inst.status_reason}; result objects not built: {results_error}"
        result_ids = repo.add_results(
            session, results.result_rows(settings, objects, instance_id=instance_id, prediction_id=prediction.id)
        )
    for result_id in result_ids:
        hand_over_result(settings, result_id)  # if the broker is down, the listener's outbox sends it later
    bound.info(
        "triage.done",
        label=output.label,
        model_set=ensemble.name,
        out_of_distribution=output.out_of_distribution,
        decode_ms=round(decode_ms, 1),
        inference_ms=round(inference_ms, 1),
        queue_wait_ms=round(queue_wait_ms, 1) if queue_wait_ms is not None else None,
        results_ms=round(results_ms, 1),
        results=[obj.kind for obj in objects],
    )
    return TriageOutcome(InstanceStatus.DONE, output.label)
