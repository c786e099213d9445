"""What the outbound interfaces share: a sender's contract and errors, the disclaimer every message carries, code
systems, storing a built object, and the context a message made on a study's change is built from.

One sender per transport of cxr_triage/result_kinds.py: DICOM C-STORE (workers/sender.py), HL7 v2 over MLLP
(workers/hl7.py), FHIR over HTTP (workers/fhir.py); workers/delivery.py dispatches to them.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime
from typing import Final, Protocol

from sqlalchemy.orm import Session

from cxr_triage.durable import write_durably
from cxr_triage.settings import Settings
from cxr_triage.uids import require_uid
from db.models import Instance, Prediction, ResultObject, Study, as_utc
from infra import objectstore

# In every message that leaves by HL7 or FHIR (the SR and heatmap say NOT FOR CLINICAL USE in their own way).
AI_DISCLAIMER: Final = "AI result, demo: not for clinical use"

# Coding scheme designators (DICOM, HL7 v2 table 0396) -> FHIR code system URIs.
CODE_SYSTEMS: Final[dict[str, str]] = {
    "SCT": "http://snomed.info/sct",
    "DCM": "http://dicom.nema.org/resources/ontology/DCM",
    "UCUM": "http://unitsofmeasure.org",
    "99CXRTRIAGE": "urn:cxr-triage:99CXRTRIAGE",  # our private probability codes (workers/sr.py PRIVATE_SCHEME)
}


@dataclass(frozen=True)
class Sent:
    """A destination's answer to a send it accepted."""

    answer: str  # in its own words: "0x0000" (DIMSE), "AA" (HL7 MSA-1), "201" (HTTP)
    dimse_status: int | None = None


class DeliveryError(Exception):
    """A send failed. `final`: retrying the same object cannot help (the destination rejected it); otherwise the
    delivery is retried with backoff until CXR_RESULTS_SEND_MAX_RETRIES. The message never quotes patient data."""

    def __init__(
        self, message: str, *, answer: str | None = None, final: bool = False, dimse_status: int | None = None
    ) -> None:
        super().__init__(message)
        self.answer = answer
        self.final = final
        self.dimse_status = dimse_status


class Sender(Protocol):
    """A configured destination: str() names it (no credentials) in delivery_attempts and the logs."""

    def send(self, payload: bytes) -> Sent:
        """Send one stored object; raises DeliveryError (or OSError) when it was not accepted."""
        ...


def store_object(settings: Settings, study_instance_uid: str, name: str, data: bytes) -> str:
    """Store a result object durably under <results>/<StudyInstanceUID>/<name> (or that key in the object store);
    returns its ref. Writing the same name again replaces it."""
    study = require_uid(study_instance_uid, name="StudyInstanceUID")
    if "/" in name or name.startswith("."):
        raise ValueError(f"invalid result object name {name!r}")
    location = objectstore.store_location(settings, objectstore.RESULTS)
    if location is not None:
        return objectstore.put(settings, location.child(study, name), data, hashlib.sha256(data).hexdigest()).ref
    target = settings.effective_results_dir / study / name
    write_durably(target, data)
    return str(target.resolve())


@dataclass(frozen=True)
class MessageContext:
    """What a message made on a study's change says (db/repo.py add_study_messages recorded it), read from the
    database when it is built: the same row builds the same message, so a retry sends the same bytes."""

    settings: Settings
    object_id: int  # result_objects.id
    recorded_at: datetime
    priority: str  # the study's effective priority the message reports
    label: str
    probabilities: dict[str, float]
    model_set: str
    model_versions: tuple[str, ...]
    analysed_at: datetime
    sop_instance_uid: str  # of the analysed image
    study_instance_uid: str
    accession_number: str | None
    # Patient identifiers go to the RIS, which is allowed; never to logs.
    patient_id: str | None
    patient_name: str | None

    @classmethod
    def load(cls, session: Session, settings: Settings, row: ResultObject) -> MessageContext:
        prediction = session.get(Prediction, row.prediction_id)
        instance = session.get(Instance, row.instance_id)
        study = session.get(Study, instance.study_id) if instance is not None else None
        if prediction is None or instance is None or study is None:
            raise LookupError(f"result object {row.id}: its prediction, instance or study is gone")
        if not row.event:
            raise ValueError(f"result object {row.id}: no priority recorded")
        return cls(
            settings=settings,
            object_id=row.id,
            recorded_at=as_utc(row.created_at),
            priority=row.event,
            label=prediction.label,
            probabilities=dict(prediction.probabilities),
            model_set=prediction.model_set,
            model_versions=tuple(prediction.model_versions),
            analysed_at=as_utc(prediction.created_at),
            sop_instance_uid=instance.sop_instance_uid,
            study_instance_uid=study.study_instance_uid,
            accession_number=study.accession_number or None,
            patient_id=study.patient_id or None,
            patient_name=study.patient_name or None,
        )
