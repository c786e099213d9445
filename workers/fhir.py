"""FHIR out: each AI result as a FHIR R4 transaction Bundle (DiagnosticReport, one Observation for the finding and one
per class probability, the Device that names the model set), validated with fhir.resources and POSTed to the site's
FHIR server (CXR_FHIR_BASE_URL, optional bearer token).

Codes as in the SR (workers/sr.py): the finding is DCM 121071 "Finding" with SNOMED CT 840539006 (COVID-19),
233604007 (Pneumonia) or DCM 111286 (No abnormality); probabilities are Quantities (UCUM "1") named by our private
codes. fhir.resources models R4 as R4B (4.3.0), whose DiagnosticReport, Observation and Device are R4's. Every entry
is a conditional create on its identifier, so a send retried after a lost answer creates nothing twice.
"""

from __future__ import annotations

import ssl
import urllib.error
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from pydicom.dataset import Dataset

from cxr_triage.labels import CLASS_LABELS
from cxr_triage.settings import Settings
from workers.interfaces import AI_DISCLAIMER, CODE_SYSTEMS, DeliveryError, Sent
from workers.sr import FINDING_CODES, MANUFACTURER, PROBABILITY_CODES, PROCEDURE_REPORTED, TriageResult

if TYPE_CHECKING:  # fhir.resources takes most of a second to import: only where a site produces FHIR
    from fhir.resources.R4B.bundle import Bundle

FHIR_JSON: Final = "application/fhir+json"
URI: Final = "urn:ietf:rfc:3986"  # identifier system of a value that is itself a URI (urn:uuid:, urn:oid:)
DICOM_UID: Final = "urn:dicom:uid"
FINDING: Final = ("121071", "Finding", "DCM")
RADIOLOGY: Final = {"system": "http://terminology.hl7.org/CodeSystem/v2-0074", "code": "RAD", "display": "Radiology"}
IMAGING: Final = {"system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": "imaging"}
ACCESSION: Final = {"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "ACSN"}
# Answers worth retrying: a timeout, too many requests, the server or a gateway failing; any other 4xx is final.
RETRIED_HTTP: Final = frozenset({408, 425, 429})


def _concept(value: str, meaning: str, scheme: str) -> dict[str, Any]:
    return {"coding": [{"system": CODE_SYSTEMS[scheme], "code": value, "display": meaning}], "text": meaning}


def _entry(resource: dict[str, Any], full_url: str, identifier: dict[str, str]) -> dict[str, Any]:
    return {
        "fullUrl": full_url,
        "resource": resource,
        "request": {
            "method": "POST",
            "url": resource["resourceType"],
            "ifNoneExist": f"identifier={identifier['system']}|{identifier['value']}",
        },
    }


def build_bundle(source: Dataset, result: TriageResult, *, issued: datetime | None = None) -> Bundle:
    """The transaction Bundle of one triaged image; raises pydantic's ValidationError if it is not valid R4(B)."""
    from fhir.resources.R4B.bundle import Bundle

    issued_at = (issued or datetime.now(UTC)).isoformat(timespec="seconds")
    device_name = f"{MANUFACTURER} ensemble {result.model_set}"
    device_id = {"system": URI, "value": f"urn:oid:{result.device_uid}"}
    device_url = f"urn:uuid:{uuid.uuid4()}"
    device = {
        "resourceType": "Device",
        "identifier": [device_id],
        "manufacturer": MANUFACTURER,
        "deviceName": [{"name": device_name, "type": "model-name"}],
        "version": [{"value": result.software_version}],
        "note": [{"text": AI_DISCLAIMER}],
    }
    patient_id = str(source.get("PatientID", "") or "")
    subject = {"subject": {"identifier": {"value": patient_id}}} if patient_id else {}
    study = {"identifier": {"system": DICOM_UID, "value": f"urn:oid:{source.StudyInstanceUID}"}}
    common = {
        "status": "preliminary",  # an AI result nobody has verified (the SR's VerificationFlag UNVERIFIED)
        **subject,
        "issued": issued_at,
        "device": {"reference": device_url, "display": device_name},
        "derivedFrom": [{**study, "type": "ImagingStudy", "display": f"image {source.SOPInstanceUID}"}],
        "note": [{"text": AI_DISCLAIMER}],
    }
    finding_code = FINDING_CODES[result.label]
    observations = [
        {
            "resourceType": "Observation",
            "category": [{"coding": [IMAGING]}],
            "code": _concept(*FINDING),
            "valueCodeableConcept": _concept(finding_code.value, finding_code.meaning, finding_code.scheme_designator),
            **common,
        }
    ]
    for label in CLASS_LABELS:
        code = PROBABILITY_CODES[label]
        observations.append(
            {
                "resourceType": "Observation",
                "category": [{"coding": [IMAGING]}],
                "code": _concept(code.value, code.meaning, code.scheme_designator),
                "valueQuantity": {
                    "value": round(result.probabilities[label], 6),
                    "unit": "1",
                    "system": CODE_SYSTEMS["UCUM"],
                    "code": "1",
                },
                **common,
            }
        )
    entries = [_entry(device, device_url, device_id)]
    references = []
    for observation in observations:
        identifier = {"system": URI, "value": f"urn:uuid:{uuid.uuid4()}"}
        observation["identifier"] = [identifier]
        entries.append(_entry(observation, identifier["value"], identifier))
        references.append({"reference": identifier["value"]})
    report_id = {"system": URI, "value": f"urn:uuid:{uuid.uuid4()}"}
    accession = str(source.get("AccessionNumber", "") or "")
    probability = result.probabilities[result.label]
    report = {
        "resourceType": "DiagnosticReport",
        "identifier": [report_id] + ([{"type": {"coding": [ACCESSION]}, "value": accession}] if accession else []),
        "status": "preliminary",
        "category": [{"coding": [RADIOLOGY]}],
        "code": _concept(PROCEDURE_REPORTED.value, PROCEDURE_REPORTED.meaning, PROCEDURE_REPORTED.scheme_designator),
        **subject,
        "issued": issued_at,
        "imagingStudy": [study],
        "result": references,
        "conclusion": f"{AI_DISCLAIMER}. Finding: {result.label} (probability {probability:.2f}); {device_name}.",
        "conclusionCode": [_concept(finding_code.value, finding_code.meaning, finding_code.scheme_designator)],
    }
    entries.append(_entry(report, report_id["value"], report_id))
    return Bundle.model_validate(
        {
            "resourceType": "Bundle",
            "identifier": {"system": URI, "value": f"urn:uuid:{uuid.uuid4()}"},
            "type": "transaction",
            "timestamp": issued_at,
            "entry": entries,
        }
    )


def bundle_json(bundle: Bundle) -> bytes:
    text: str = bundle.model_dump_json(exclude_none=True)
    return text.encode("utf-8")


@dataclass(frozen=True)
class FhirSender:
    """The FHIR server as a sender of workers/delivery.py: POST [base] with a transaction Bundle."""

    base_url: str
    token: str = field(default="", repr=False)
    timeout_s: float = 30.0
    tls_ca: Path | None = None

    def __post_init__(self) -> None:
        if urllib.parse.urlsplit(self.base_url).scheme not in ("http", "https"):
            raise ValueError(f"FHIR base URL must be http(s)://..., got {self.base_url[:80]!r}")

    def __str__(self) -> str:
        parts = urllib.parse.urlsplit(self.base_url)
        host = parts.hostname or ""
        netloc = f"{host}:{parts.port}" if parts.port else host  # never the URL's credentials
        return f"FHIR {parts.scheme}://{netloc}{parts.path}"

    @classmethod
    def from_settings(cls, settings: Settings) -> FhirSender | None:
        if not settings.fhir_base_url:
            return None
        return cls(settings.fhir_base_url, settings.fhir_token, settings.fhir_timeout_s, settings.fhir_tls_ca)

    def send(self, payload: bytes) -> Sent:
        """POST the Bundle; 2xx: sent. HTTP 408, 425, 429 and 5xx, or no answer: retried; any other: final."""
        headers = {"Content-Type": f"{FHIR_JSON}; charset=utf-8", "Accept": FHIR_JSON}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        request = urllib.request.Request(self.base_url, data=payload, headers=headers, method="POST")
        context = ssl.create_default_context(cafile=str(self.tls_ca) if self.tls_ca else None)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s, context=context) as response:
                status = int(response.status)
                response.read()
        except urllib.error.HTTPError as exc:
            status = exc.code
            final = status not in RETRIED_HTTP and status < 500
            raise DeliveryError(f"{self} answered HTTP {status}", answer=str(status), final=final) from None
        except urllib.error.URLError as exc:
            raise DeliveryError(f"cannot reach {self}: {exc.reason}") from None
        return Sent(str(status))
