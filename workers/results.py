"""Build and store the result objects of one triage (queue gpu), one builder per kind in cxr_triage/result_kinds.py.

Delivery to the PACS is workers/delivery.py (queue cpu).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from io import BytesIO
from typing import Final

import torch
from pydicom.dataset import Dataset

from cxr_triage.durable import write_durably
from cxr_triage.pixels import decode_dicom
from cxr_triage.result_kinds import enabled_kinds
from cxr_triage.settings import Settings
from cxr_triage.uids import require_uid
from db.models import ResultObject, ResultStatus
from infra import objectstore
from workers.ensemble import Ensemble, EnsembleOutput
from workers.heatmap import build_heatmap_sc, grad_cam, render_overlay
from workers.sender import Destination
from workers.sr import TriageResult, build_sr


@dataclass(frozen=True)
class ProducedObject:
    kind: str
    sop_class_uid: str
    sop_instance_uid: str
    series_instance_uid: str
    ref: str  # the stored file's absolute path or s3:// URL (infra/objectstore.py)


def _write(settings: Settings, ds: Dataset) -> str:
    """Store a result object durably under <results>/<StudyInstanceUID>/<SOPInstanceUID>.dcm (or that key in the
    object store); returns its ref. A rerun of the same triage writes the same name again (same UIDs)."""
    study = require_uid(str(ds.StudyInstanceUID), name="StudyInstanceUID")
    sop = require_uid(str(ds.SOPInstanceUID), name="SOPInstanceUID")
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    data = buffer.getvalue()
    location = objectstore.store_location(settings, objectstore.RESULTS)
    if location is not None:
        return objectstore.put(
            settings, location.child(study, f"{sop}.dcm"), data, hashlib.sha256(data).hexdigest()
        ).ref
    target = settings.effective_results_dir / study / f"{sop}.dcm"
    write_durably(target, data)
    return str(target.resolve())


@dataclass(frozen=True)
class BuildContext:
    """Everything a builder may use: the source instance, the ensemble, its inputs and output, the SR's content."""

    settings: Settings
    source: Dataset
    ensemble: Ensemble
    inputs: dict[int, torch.Tensor]
    output: EnsembleOutput
    result: TriageResult


def _build_sr(ctx: BuildContext) -> Dataset:
    return build_sr(ctx.source, ctx.result)


def _build_heatmap(ctx: BuildContext) -> Dataset:
    cam = grad_cam(ctx.ensemble, ctx.inputs, ctx.output.label)
    rgb = render_overlay(decode_dicom(ctx.source, 512).pixels, cam, ctx.result)
    return build_heatmap_sc(ctx.source, rgb, ctx.result)


# One builder per entry of cxr_triage.result_kinds.RESULT_KINDS (tests/test_architecture.py checks they match).
BUILDERS: Final[dict[str, Callable[[BuildContext], Dataset]]] = {"sr": _build_sr, "heatmap": _build_heatmap}


def produce(
    settings: Settings, source: Dataset, ensemble: Ensemble, inputs: dict[int, torch.Tensor], output: EnsembleOutput
) -> list[ProducedObject]:
    """Build and store every enabled kind of result object for one triaged instance."""
    result = TriageResult(
        label=output.label,
        probabilities=output.probabilities,
        model_set=ensemble.name,
        members=tuple(m.card for m in ensemble.members),
        not_for_clinical_use=ensemble.not_for_clinical_use,
    )
    ctx = BuildContext(settings, source, ensemble, inputs, output, result)
    objects = [(kind.name, BUILDERS[kind.name](ctx)) for kind in enabled_kinds(settings)]
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
            path=obj.ref,
            status=ResultStatus.PENDING if destination else ResultStatus.STORED,
            destination=str(destination) if destination else None,
        )
        for obj in objects
    ]
