"""The triage of one instance as a plain function: claim, decode, run the ensemble, store the prediction.

Errors are of two kinds. Transient ones (`TRANSIENT_ERRORS`: the database or the broker unreachable) propagate, so
that the Celery task retries with backoff and the instance stays claimed. Anything else raised while reading,
decoding, running the ensemble or storing the outcome of this instance ends it `failed` at once, with
"<ExceptionType>: <message>" (a PixelDecodeError's message alone) as the reason, patient identifiers removed.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kombu.exceptions import OperationalError as BrokerOperationalError
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from sqlalchemy.exc import DisconnectionError, OperationalError

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

# Errors that say nothing about the instance: retried by the task (workers/tasks.py autoretry_for), never `failed`.
TRANSIENT_ERRORS: tuple[type[Exception], ...] = (
    OperationalError,  # database unreachable, restarted, locked
    DisconnectionError,
    BrokerOperationalError,  # broker unreachable
    ConnectionError,
    TimeoutError,
)
REASON_LIMIT = 500
# Data set attributes whose values are removed from a failure reason (an exception message can quote them).
_IDENTIFYING = ("PatientName", "PatientID", "OtherPatientIDs", "PatientBirthDate", "IssuerOfPatientID")


@dataclass(frozen=True)
class TriageOutcome:
    status: str
    detail: str = ""


class Heartbeat:
    """While a worker holds an instance, a thread refreshes its row every `interval_s`, so that nobody re-sends or
    takes over an instance that is still being worked on (db/repo.py `claim`, `dispatchable`)."""

    def __init__(self, url: str, instance_id: int, interval_s: float) -> None:
        self.url, self.instance_id, self.interval_s = url, instance_id, interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{instance_id}", daemon=True)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                with session_scope(self.url) as session:
                    if not repo.heartbeat(session, self.instance_id):
                        return  # finished, or taken over
            except Exception as exc:  # the database is away: the next beat tries again
                log.warning("triage.heartbeat_failed", error=f"{type(exc).__name__}: {exc}"[:200])


def triage_instance(settings: Settings, instance_id: int, provider: EnsembleProvider) -> TriageOutcome:
    """Idempotent: a finished instance is left alone, one held by a live worker too; a repeated run writes no second
    prediction."""
    url = settings.effective_database_url
    with session_scope(url) as session:
        instance = repo.claim(
            session,
            instance_id,
            silent_before=repo.stale_cutoff(settings.heartbeat_timeout_s),
            max_attempts=settings.task_max_attempts,
        )
        if instance is None:
            return TriageOutcome("duplicate", "already finished, held by a live worker, or unknown")
        path = Path(instance.path)
        sop_uid = instance.sop_instance_uid
        queued_at = instance.queued_at
        content = instance.sha256  # a corrected re-send replaces it; what this run read must still be current
    with Heartbeat(url, instance_id, settings.heartbeat_s):
        return _triage_claimed(settings, instance_id, provider, path, sop_uid, queued_at, content)


def _triage_claimed(
    settings: Settings,
    instance_id: int,
    provider: EnsembleProvider,
    path: Path,
    sop_uid: str,
    queued_at: Any,
    content: str,
) -> TriageOutcome:
    url = settings.effective_database_url
    bound = log.bind(sop_instance_uid=sop_uid)

    ensemble = provider.current()
    if ensemble is None:  # none promoted, or the promoted set does not load and none was loaded before
        reason = (provider.refusal or "no promoted model set")[:REASON_LIMIT]
        with session_scope(url) as session:
            inst = session.get(Instance, instance_id)
            assert inst is not None
            repo.set_status(session, inst, InstanceStatus.AWAITING_MODEL, reason)
        bound.info("triage.awaiting_model", reason=reason)
        return TriageOutcome(InstanceStatus.AWAITING_MODEL, reason)

    queue_wait_ms = (utcnow() - as_utc(queued_at)).total_seconds() * 1000 if queued_at else None
    ds: Dataset | None = None
    try:
        started = time.perf_counter()
        ds = read_dataset(path)
        inputs = {
            size: normalise(decode_dicom(ds, size, max_pixels=settings.max_decoded_pixels).pixels)[None]
            for size in sorted(ensemble.input_sizes)
        }
        decode_ms = (time.perf_counter() - started) * 1000

        started = time.perf_counter()
        output = ensemble.predict_batch(inputs)[0]
        inference_ms = (time.perf_counter() - started) * 1000
    except TRANSIENT_ERRORS:
        raise
    except Exception as exc:
        return _fail(url, instance_id, content, failure_reason(exc, ds), bound)
    assert ds is not None  # read above

    started = time.perf_counter()
    results_error = None
    try:
        objects = results.produce(settings, ds, ensemble, inputs, output)
    except Exception as exc:  # the prediction stands even if a result object cannot be built
        objects = []
        results_error = failure_reason(exc, ds, limit=300)
        bound.error("results.build_failed", error=results_error)
    results_ms = (time.perf_counter() - started) * 1000

    try:
        with session_scope(url) as session:
            inst = session.get(Instance, instance_id)
            assert inst is not None
            if inst.sha256 != content:  # replaced while this run worked: the new content is triaged on its own
                bound.info("triage.superseded")
                return TriageOutcome("superseded", "the instance was replaced by a corrected re-send")
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
    except TRANSIENT_ERRORS:
        raise
    except Exception as exc:  # nothing was stored (the transaction rolled back)
        return _fail(url, instance_id, content, failure_reason(exc, ds), bound)
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


def failure_reason(exc: BaseException, ds: Dataset | None = None, *, limit: int = REASON_LIMIT) -> str:
    """One line: "<ExceptionType>: <message>" (a PixelDecodeError's message alone), without the values of the
    patient identifiers of `ds`, at most `limit` characters."""
    text = str(exc) if isinstance(exc, PixelDecodeError) else f"{type(exc).__name__}: {exc}"
    text = " ".join(text.split())
    for value in _identifiers(ds):
        text = text.replace(value, "[redacted]")
    return text[:limit]


def _identifiers(ds: Dataset | None) -> list[str]:
    """The patient identifier strings of `ds` (and the components of a person name), longest first."""
    if ds is None:
        return []
    found: set[str] = set()
    for keyword in _IDENTIFYING:
        try:
            value: Any = ds.get(keyword)
        except Exception:  # an unreadable identifier cannot have been quoted by a reader
            continue
        values = list(value) if isinstance(value, MultiValue) else [value]
        for item in values:
            if item is None:
                continue
            text = " ".join(str(item).split())
            if len(text) >= 2:
                found.add(text)
            found.update(part for part in text.replace("=", "^").split("^") if len(part.strip()) >= 3)
    return sorted(found, key=len, reverse=True)


def _fail(url: str, instance_id: int, content: str, reason: str, bound: Any) -> TriageOutcome:
    """End the instance `failed` with `reason` (unless another delivery finished it, or a corrected re-send replaced
    the content this run read)."""
    with session_scope(url) as session:
        inst = session.get(Instance, instance_id)
        if inst is not None and inst.status not in InstanceStatus.TERMINAL and inst.sha256 == content:
            repo.set_status(session, inst, InstanceStatus.FAILED, reason)
    bound.warning("triage.failed", reason=reason)
    return TriageOutcome(InstanceStatus.FAILED, reason)
