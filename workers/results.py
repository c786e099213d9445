"""Build and store the result objects of one triage (queue gpu), one builder per kind in cxr_triage/result_kinds.py.

Delivery (to the PACS, the RIS, a FHIR server) is workers/delivery.py (queue cpu), which also builds the kinds made on
a study's change (MESSAGE_BUILDERS there).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from io import BytesIO
from typing import Final

import torch
from pydicom.dataset import Dataset

from cxr_triage.pixels import decode_dicom
from cxr_triage.result_kinds import RESULT_KINDS, Transport, Trigger, enabled_kinds
from cxr_triage.settings import Settings
from cxr_triage.uids import require_uid
from db.models import ResultObject, ResultStatus
from workers.delivery import MESSAGE_BUILDERS, destination_name
from workers.ensemble import Ensemble, EnsembleOutput
from workers.fhir import build_bundle, bundle_json
from workers.heatmap import build_heatmap_sc, grad_cam, render_overlay
from workers.interfaces import MessageContext, store_object
from workers.sr import TriageResult, build_sr


@dataclass(frozen=True)
class Built:
    """A built result object: its bytes, where it is kept (<results>/<study>/<name>) and, for DICOM, its identity."""

    data: bytes
    study_instance_uid: str
    name: str
    content_type: str = "application/dicom"
    sop_class_uid: str | None = None
    sop_instance_uid: str | None = None
    series_instance_uid: str | None = None

    @classmethod
    def dicom(cls, ds: Dataset) -> Built:
        """A DICOM object, kept as <SOPInstanceUID>.dcm."""
        sop = require_uid(str(ds.SOPInstanceUID), name="SOPInstanceUID")
        buffer = BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        return cls(
            buffer.getvalue(),
            str(ds.StudyInstanceUID),
            f"{sop}.dcm",
            sop_class_uid=str(ds.SOPClassUID),
            sop_instance_uid=sop,
            series_instance_uid=str(ds.SeriesInstanceUID),
        )


@dataclass(frozen=True)
class ProducedObject:
    kind: str
    content_type: str
    sop_class_uid: str | None  # the DICOM identity of a DICOM object; None for the others
    sop_instance_uid: str | None
    series_instance_uid: str | None
    ref: str  # the stored file's absolute path or s3:// URL (infra/objectstore.py)


@dataclass(frozen=True)
class BuildContext:
    """Everything a builder may use: the source instance, the ensemble, its inputs and output, the SR's content."""

    settings: Settings
    source: Dataset
    ensemble: Ensemble
    inputs: dict[int, torch.Tensor]
    output: EnsembleOutput
    result: TriageResult


def _build_sr(ctx: BuildContext) -> Built:
    return Built.dicom(build_sr(ctx.source, ctx.result))


def _build_heatmap(ctx: BuildContext) -> Built:
    cam = grad_cam(ctx.ensemble, ctx.inputs, ctx.output.label, ctx.output.feature_maps)
    rgb = render_overlay(decode_dicom(ctx.source, 512).pixels, cam, ctx.result)
    return Built.dicom(build_heatmap_sc(ctx.source, rgb, ctx.result))


def _build_fhir(ctx: BuildContext) -> Built:
    bundle = build_bundle(ctx.source, ctx.result)
    assert bundle.identifier is not None and bundle.identifier.value is not None
    name = bundle.identifier.value.removeprefix("urn:uuid:")
    return Built(bundle_json(bundle), str(ctx.source.StudyInstanceUID), f"{name}.fhir.json", "application/fhir+json")


# The kinds made with each result (Trigger.RESULT), built here; the kinds made on a study's change (Trigger.STUDY) are
# built when sent (workers/delivery.py MESSAGE_BUILDERS).
RESULT_BUILDERS: Final[dict[str, Callable[[BuildContext], Built]]] = {
    "sr": _build_sr,
    "heatmap": _build_heatmap,
    "fhir": _build_fhir,
}
# One builder per entry of cxr_triage.result_kinds.RESULT_KINDS (tests/test_architecture.py checks they match).
BUILDERS: Final[dict[str, Callable[[BuildContext], Built] | Callable[[MessageContext], bytes]]] = {
    **RESULT_BUILDERS,
    **MESSAGE_BUILDERS,
}


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
    objects = [(kind.name, RESULT_BUILDERS[kind.name](ctx)) for kind in enabled_kinds(settings, Trigger.RESULT)]
    return [
        ProducedObject(
            kind,
            built.content_type,
            built.sop_class_uid,
            built.sop_instance_uid,
            built.series_instance_uid,
            store_object(settings, built.study_instance_uid, built.name, built.data),
        )
        for kind, built in objects
    ]


def result_rows(
    settings: Settings,
    objects: list[ProducedObject],
    *,
    instance_id: int,
    prediction_id: int,
    route: str | None = None,
) -> list[ResultObject]:
    """The rows of the objects built for a prediction: pending where their transport has a destination, else stored.
    DICOM objects go to the instance's `route` (results to their sender, decided when it was queued) when it has one.
    """
    rows = []
    for obj in objects:
        kind = RESULT_KINDS.get(obj.kind)
        transport = kind.transport if kind is not None else Transport.DICOM
        destination = route if route and transport is Transport.DICOM else destination_name(settings, transport)
        rows.append(
            ResultObject(
                instance_id=instance_id,
                prediction_id=prediction_id,
                kind=obj.kind,
                content_type=obj.content_type,
                sop_class_uid=obj.sop_class_uid,
                sop_instance_uid=obj.sop_instance_uid,
                series_instance_uid=obj.series_instance_uid,
                path=obj.ref,
                status=ResultStatus.PENDING if destination else ResultStatus.STORED,
                destination=destination,
            )
        )
    return rows
