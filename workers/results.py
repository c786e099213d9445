"""Produce the result objects of one triage (SR, heatmap) and deliver them to the configured destination."""

from __future__ import annotations

from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

import torch
from pydicom.dataset import Dataset

from cxr_triage.durable import write_durably
from cxr_triage.logs import get_logger
from cxr_triage.pixels import decode_dicom
from cxr_triage.settings import Settings
from cxr_triage.uids import require_uid
from db import repo
from db.models import ResultObject, ResultStatus
from db.session import session_scope
from workers.ensemble import Ensemble, EnsembleOutput
from workers.heatmap import build_heatmap_sc, grad_cam, render_overlay
from workers.sender import Destination, SendError, c_store
from workers.sr import TriageResult, build_sr

log = get_logger(__name__)


@dataclass(frozen=True)
class ProducedObject:
    kind: str
    sop_class_uid: str
    sop_instance_uid: str
    series_instance_uid: str
    path: Path


def _write(settings: Settings, ds: Dataset) -> Path:
    study = require_uid(str(ds.StudyInstanceUID), name="StudyInstanceUID")
    sop = require_uid(str(ds.SOPInstanceUID), name="SOPInstanceUID")
    target = settings.effective_results_dir / study / f"{sop}.dcm"
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    write_durably(target, buffer.getvalue())
    return target


def produce(
    settings: Settings, source: Dataset, ensemble: Ensemble, inputs: dict[int, torch.Tensor], output: EnsembleOutput
) -> list[ProducedObject]:
    """Build and store the SR (and the heatmap when enabled) for one triaged instance."""
    result = TriageResult(
        label=output.label,
        probabilities=output.probabilities,
        model_set=ensemble.name,
        members=tuple(m.card for m in ensemble.members),
        not_for_clinical_use=ensemble.not_for_clinical_use,
    )
    objects: list[tuple[str, Dataset]] = [("sr", build_sr(source, result))]
    if settings.results_heatmap:
        cam = grad_cam(ensemble, inputs, output.label)
        rgb = render_overlay(decode_dicom(source, 512).pixels, cam, result)
        objects.append(("heatmap", build_heatmap_sc(source, rgb, result)))
    return [
        ProducedObject(
            kind, str(ds.SOPClassUID), str(ds.SOPInstanceUID), str(ds.SeriesInstanceUID), _write(settings, ds)
        )
        for kind, ds in objects
    ]


def result_rows(
    settings: Settings, objects: list[ProducedObject], *, instance_id: int, prediction_id: int
) -> list[ResultObject]:
    destination = Destination.from_settings(settings)
    return [
        ResultObject(
            instance_id=instance_id,
            prediction_id=prediction_id,
            kind=obj.kind,
            sop_class_uid=obj.sop_class_uid,
            sop_instance_uid=obj.sop_instance_uid,
            series_instance_uid=obj.series_instance_uid,
            path=str(obj.path.resolve()),
            status=ResultStatus.PENDING if destination else ResultStatus.STORED,
            destination=str(destination) if destination else None,
        )
        for obj in objects
    ]


@dataclass(frozen=True)
class DeliveryOutcome:
    status: str  # delivered, retry, failed, noop
    detail: str = ""


def deliver(settings: Settings, result_id: int, *, attempt: int) -> DeliveryOutcome:
    """One delivery attempt of a result object, recorded in delivery_attempts. Idempotent once delivered."""
    destination = Destination.from_settings(settings)
    url = settings.effective_database_url
    with session_scope(url) as session:
        row = session.get(ResultObject, result_id)
        if row is None or row.status in (ResultStatus.DELIVERED, ResultStatus.STORED):
            return DeliveryOutcome("noop")
        path, sop_uid = Path(row.path), row.sop_instance_uid
    bound = log.bind(result_sop_instance_uid=sop_uid, attempt=attempt)
    if destination is None:
        with session_scope(url) as session:
            repo.record_delivery(session, result_id, destination="", dimse_status=None, error="no destination")
        return DeliveryOutcome("noop", "no destination configured")
    try:
        status = c_store(destination, path, calling_aet=settings.ae_title)
    except (SendError, OSError, ValueError) as exc:
        final = attempt >= settings.results_send_max_retries
        with session_scope(url) as session:
            repo.record_delivery(
                session,
                result_id,
                destination=str(destination),
                dimse_status=getattr(exc, "dimse_status", None),
                error=str(exc)[:500],
                final=final,
            )
        bound.warning("results.send_failed", destination=str(destination), error=str(exc)[:200], final=final)
        return DeliveryOutcome("failed" if final else "retry", str(exc))
    with session_scope(url) as session:
        repo.record_delivery(session, result_id, destination=str(destination), dimse_status=status, error=None)
    bound.info("results.delivered", destination=str(destination), dimse_status=status)
    return DeliveryOutcome("delivered")
