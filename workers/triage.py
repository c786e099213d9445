"""The triage of one instance as a plain function: claim, decode, run the ensemble, store the prediction.

Errors are of two kinds. Transient ones (`TRANSIENT_ERRORS`: the database or the broker unreachable) propagate, so
that the Celery task retries with backoff and the instance stays claimed. Anything else raised while reading,
decoding, running the ensemble or storing the outcome of this instance ends it `failed` at once, with
"<ExceptionType>: <message>" (a PixelDecodeError's message alone) as the reason, patient identifiers removed.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch
from kombu.exceptions import OperationalError as BrokerOperationalError
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from sqlalchemy.exc import DisconnectionError, OperationalError
from sqlalchemy.orm import Session

from cxr_triage.logs import get_logger
from cxr_triage.pixels import PixelDecodeError, decode_dicom, normalise, read_dataset
from cxr_triage.settings import Settings
from db import repo
from db.models import Instance, InstanceStatus, PredictionRole, as_utc, utcnow
from db.session import session_scope
from db.worklist_repo import assign_priority
from infra.objectstore import ObjectStoreError, open_object
from infra.queue import hand_over_result
from workers import results
from workers.backends import torch_threads
from workers.ensemble import Ensemble, EnsembleOutput, EnsembleProvider

log = get_logger(__name__)

# Errors that say nothing about the instance: retried by the task (workers/tasks.py autoretry_for), never `failed`.
TRANSIENT_ERRORS: tuple[type[Exception], ...] = (
    OperationalError,  # database unreachable, restarted, locked
    DisconnectionError,
    BrokerOperationalError,  # broker unreachable
    ConnectionError,
    TimeoutError,
    ObjectStoreError,  # the object store holding the spool (CXR_SPOOL_URL) unreachable or refusing
)
REASON_LIMIT = 500
DECODE_THREADS = 4
# Data set attributes whose values are removed from a failure reason (an exception message can quote them).
_IDENTIFYING = ("PatientName", "PatientID", "OtherPatientIDs", "PatientBirthDate", "IssuerOfPatientID")


@dataclass(frozen=True)
class TriageOutcome:
    status: str
    detail: str = ""


class Heartbeat:
    """While a worker holds instances, a thread refreshes their rows every `interval_s`, so that nobody re-sends or
    takes over an instance that is still being worked on (db/repo.py `claim`, `dispatchable`)."""

    def __init__(self, url: str, instance_ids: list[int], interval_s: float) -> None:
        self.url, self.instance_ids, self.interval_s = url, instance_ids, interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{instance_ids[0]}", daemon=True)

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
                    if not repo.heartbeat(session, *self.instance_ids):
                        return  # all finished, or taken over
            except Exception as exc:  # the database is away: the next beat tries again
                log.warning("triage.heartbeat_failed", error=f"{type(exc).__name__}: {exc}"[:200])


@dataclass(frozen=True)
class Claimed:
    """What a worker read off an instance it holds."""

    instance_id: int
    ref: str  # the spooled file's path or s3:// URL (infra/objectstore.py)
    sop_uid: str
    queued_at: Any
    content: str  # its sha256: a corrected re-send replaces it; what this run read must still be current

    @classmethod
    def of(cls, instance: Instance) -> Claimed:
        return cls(instance.id, instance.path, instance.sop_instance_uid, instance.queued_at, instance.sha256)


def triage_instance(
    settings: Settings, instance_id: int, provider: EnsembleProvider, shadow: EnsembleProvider | None = None
) -> TriageOutcome:
    """Triage the instance, and with CXR_TRIAGE_BATCH_SIZE (CPU) or CXR_CUDA_BATCH_SIZE (CUDA, bounded by the device's
    free memory) > 1 up to that many other queued ones in the same pass
    (one forward pass per member for all of them). Idempotent: a finished instance is left alone, one held by a live
    worker too; a repeated run writes no second prediction. The batch mates' own messages later find them finished.
    Returns this instance's outcome (or "duplicate" when another worker had it). With `shadow` serving a set in shadow
    mode, that set runs on the same decoded images after the live results are stored and handed over (`run_shadow`)."""
    url = settings.effective_database_url
    silent_before = repo.stale_cutoff(settings.heartbeat_timeout_s)
    with session_scope(url) as session:
        first = repo.claim(session, instance_id, silent_before=silent_before, max_attempts=settings.task_max_attempts)
        claims = [Claimed.of(first)] if first is not None else []
    batch_size = provider.claim_batch_size(settings)
    if batch_size > 1:
        with session_scope(url) as session:
            mates = repo.claim_queued(
                session,
                limit=batch_size - len(claims),
                exclude=instance_id,
                silent_before=silent_before,
                max_attempts=settings.task_max_attempts,
            )
            claims += [Claimed.of(mate) for mate in mates]
    if not claims:
        return TriageOutcome("duplicate", "already finished, held by a live worker, or unknown")
    with Heartbeat(url, [c.instance_id for c in claims], settings.heartbeat_s):
        outcomes = triage_claimed(settings, claims, provider, shadow)
    return outcomes.get(instance_id, TriageOutcome("duplicate", "already finished, held by a live worker"))


@dataclass
class _Decoded:
    claim: Claimed
    ds: Dataset
    inputs: dict[int, torch.Tensor]
    decode_ms: float
    bound: Any


def triage_claimed(
    settings: Settings, claims: list[Claimed], provider: EnsembleProvider, shadow: EnsembleProvider | None = None
) -> dict[int, TriageOutcome]:
    """Triage instances this worker holds: decode (in threads), one ensemble pass for all, result objects, then the
    predictions, priorities and result rows of all in one transaction. An instance that cannot be decoded, or whose
    storing fails, ends `failed` alone; transient errors propagate (the task retries)."""
    url = settings.effective_database_url
    outcomes: dict[int, TriageOutcome] = {}
    ensemble = provider.current()
    if ensemble is None:  # none promoted, or the promoted set does not load and none was loaded before
        reason = (provider.refusal or "no promoted model set")[:REASON_LIMIT]
        with session_scope(url) as session:
            for claim in claims:
                inst = session.get(Instance, claim.instance_id)
                assert inst is not None
                repo.set_status(session, inst, InstanceStatus.AWAITING_MODEL, reason)
        log.info("triage.awaiting_model", reason=reason, count=len(claims))
        return {c.instance_id: TriageOutcome(InstanceStatus.AWAITING_MODEL, reason) for c in claims}
    shadow_set = shadow.current() if shadow is not None else None
    if shadow_set is not None and shadow_set.name == ensemble.name:
        shadow_set = None  # the candidate was promoted meanwhile: its predictions are the live ones now
    sizes = sorted(ensemble.input_sizes | (shadow_set.input_sizes if shadow_set is not None else set()))

    def decode(claim: Claimed) -> _Decoded | TriageOutcome:
        bound = log.bind(sop_instance_uid=claim.sop_uid)
        ds: Dataset | None = None
        try:
            started = time.perf_counter()
            ds = read_dataset(open_object(settings, claim.ref))
            inputs = {
                size: normalise(decode_dicom(ds, size, max_pixels=settings.max_decoded_pixels).pixels)[None]
                for size in sizes
            }
            return _Decoded(claim, ds, inputs, (time.perf_counter() - started) * 1000, bound)
        except TRANSIENT_ERRORS:
            raise
        except Exception as exc:
            return _fail(url, claim.instance_id, claim.content, failure_reason(exc, ds), bound)

    if len(claims) == 1:
        decoded_all = [decode(claims[0])]
    else:
        with ThreadPoolExecutor(max_workers=min(len(claims), DECODE_THREADS)) as pool:
            decoded_all = list(pool.map(decode, claims))
    decoded = [d for d in decoded_all if isinstance(d, _Decoded)]
    outcomes.update({c.instance_id: o for c, o in zip(claims, decoded_all, strict=True) if not isinstance(o, _Decoded)})
    if not decoded:
        return outcomes

    try:
        started = time.perf_counter()
        batch = {size: torch.cat([d.inputs[size] for d in decoded]) for size in ensemble.input_sizes}
        with torch_threads(settings.inference_threads):  # Grad-CAM then starts from the maps kept here
            outputs = ensemble.predict_batch(batch, keep_feature_maps=settings.results_heatmap)
        inference_ms = (time.perf_counter() - started) * 1000 / len(decoded)
    except TRANSIENT_ERRORS:
        raise
    except Exception as exc:  # about the batch, not one instance: each ends failed with the reason
        for d in decoded:
            outcomes[d.claim.instance_id] = _fail(url, d.claim.instance_id, d.claim.content, failure_reason(exc, d.ds),
                                                  d.bound)  # fmt: skip
        return outcomes

    built = []
    for d, output in zip(decoded, outputs, strict=True):
        started = time.perf_counter()
        results_error = None
        try:
            objects = results.produce(settings, d.ds, ensemble, d.inputs, output)
        except Exception as exc:  # the prediction stands even if a result object cannot be built
            objects = []
            results_error = failure_reason(exc, d.ds, limit=300)
            d.bound.error("results.build_failed", error=results_error)
        built.append((d, output, objects, results_error, (time.perf_counter() - started) * 1000))

    def store(session: Session, d: _Decoded, output: EnsembleOutput, objects: list[Any], error: str | None) -> Any:
        inst = session.get(Instance, d.claim.instance_id)
        assert inst is not None
        if inst.sha256 != d.claim.content:  # replaced while this run worked: the new content is triaged on its own
            return TriageOutcome("superseded", "the instance was replaced by a corrected re-send")
        queued_at = d.claim.queued_at
        wait_ms = (utcnow() - as_utc(queued_at)).total_seconds() * 1000 if queued_at else None
        record = prediction_record(ensemble, output, decode_ms=d.decode_ms, inference_ms=inference_ms,
                                   queue_wait_ms=wait_ms)  # fmt: skip
        prediction = repo.save_prediction(session, inst, record)
        assign_priority(session, inst.id, settings)  # the worklist priority, in the same transaction
        if error:
            inst.status_reason = f"{inst.status_reason}; result objects not built: {error}"
        rows = results.result_rows(
            settings, objects, instance_id=inst.id, prediction_id=prediction.id, route=inst.results_destination
        )
        return repo.add_results(session, rows)

    stored: dict[int, Any] = {}
    try:
        with session_scope(url) as session:  # the whole batch in one transaction
            for d, output, objects, error, _ in built:
                stored[d.claim.instance_id] = store(session, d, output, objects, error)
    except TRANSIENT_ERRORS:
        raise
    except Exception:  # one of them cannot be stored: store each on its own, so that only that one fails
        stored = {}
        for d, output, objects, error, _ in built:
            try:
                with session_scope(url) as session:
                    stored[d.claim.instance_id] = store(session, d, output, objects, error)
            except TRANSIENT_ERRORS:
                raise
            except Exception as exc:  # nothing of it was stored (its transaction rolled back)
                outcomes[d.claim.instance_id] = _fail(url, d.claim.instance_id, d.claim.content,
                                                      failure_reason(exc, d.ds), d.bound)  # fmt: skip

    for d, output, objects, _, results_ms in built:
        result = stored.get(d.claim.instance_id)
        if result is None:
            continue
        if isinstance(result, TriageOutcome):
            d.bound.info("triage.superseded")
            outcomes[d.claim.instance_id] = result
            continue
        for result_id in result:
            hand_over_result(settings, result_id)  # if the broker is down, the listener's outbox sends it later
        d.bound.info(
            "triage.done",
            label=output.label,
            model_set=ensemble.name,
            out_of_distribution=output.out_of_distribution,
            batch=len(decoded),
            decode_ms=round(d.decode_ms, 1),
            inference_ms=round(inference_ms, 1),
            results_ms=round(results_ms, 1),
            results=[obj.kind for obj in objects],
        )
        outcomes[d.claim.instance_id] = TriageOutcome(InstanceStatus.DONE, output.label)
    if shadow_set is not None:
        done = [d for d in decoded if outcomes.get(d.claim.instance_id, TriageOutcome("", "")).status == "done"]
        run_shadow(settings, shadow_set, done)
    return outcomes


def prediction_record(
    ensemble: Ensemble,
    output: EnsembleOutput,
    *,
    decode_ms: float,
    inference_ms: float,
    queue_wait_ms: float | None = None,
    role: str = PredictionRole.LIVE,
) -> repo.PredictionRecord:
    """What is stored of one ensemble output (live or shadow), with the set's operating point at that moment."""
    return repo.PredictionRecord(
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
        role=role,
    )


def run_shadow(settings: Settings, ensemble: Ensemble, decoded: list[_Decoded]) -> int:
    """Run the shadow set on images whose live triage is stored, and store its predictions (role shadow) in one
    transaction. They set no status or priority, build no result object and are never sent; a failure here is logged
    and changes nothing of the live triage. Returns how many were stored."""
    if not decoded:
        return 0
    try:
        started = time.perf_counter()
        outputs = ensemble.predict_batch(
            {size: torch.cat([d.inputs[size] for d in decoded]) for size in ensemble.input_sizes}
        )
        inference_ms = (time.perf_counter() - started) * 1000 / len(decoded)
        with session_scope(settings.effective_database_url) as session:
            for d, output in zip(decoded, outputs, strict=True):
                inst = session.get(Instance, d.claim.instance_id)
                if inst is None or inst.sha256 != d.claim.content:
                    continue
                record = prediction_record(
                    ensemble, output, decode_ms=d.decode_ms, inference_ms=inference_ms, role=PredictionRole.SHADOW
                )
                repo.save_prediction(session, inst, record)
    except Exception as exc:  # shadow mode never disturbs the live triage, whatever fails
        log.warning(
            "shadow.failed", model_set=ensemble.name, count=len(decoded), error=f"{type(exc).__name__}: {exc}"[:300]
        )
        return 0
    log.info("shadow.done", model_set=ensemble.name, count=len(decoded), inference_ms=round(inference_ms, 1))
    return len(decoded)


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
