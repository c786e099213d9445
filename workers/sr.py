"""The DICOM result object: a Comprehensive 3D SR (TID 1500/1501) encoded as the IHE AI Results profile describes."""

from __future__ import annotations

import copy
import hashlib
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

import highdicom as hd
from pydicom.charset import python_encoding
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid
from pydicom.valuerep import DA, TM

import cxr_triage
from cxr_triage.labels import CLASS_LABELS, COVID19, NO_FINDING, PNEUMONIA
from cxr_triage.registry import ModelCard

MANUFACTURER = "cxr-triage"
SR_SERIES_NUMBER = 9901

# The triage finding as a coded concept (value of a DCM 121071 "Finding" qualitative evaluation):
#   COVID-19    -> SNOMED CT 840539006 "Disease caused by severe acute respiratory syndrome coronavirus 2"
#   Pneumonia   -> SNOMED CT 233604007 "Pneumonia"
#   No finding  -> DCM 111286 "No abnormality"
FINDING_CODES: dict[str, hd.sr.CodedConcept] = {
    COVID19: hd.sr.CodedConcept("840539006", "SCT", "COVID-19"),
    PNEUMONIA: hd.sr.CodedConcept("233604007", "SCT", "Pneumonia"),
    NO_FINDING: hd.sr.CodedConcept("111286", "DCM", "No abnormality"),
}
# The analysed imaging procedure (Procedure Reported): SNOMED CT 399208008 "Plain X-ray of chest".
PROCEDURE_REPORTED = hd.sr.CodedConcept("399208008", "SCT", "Plain X-ray of chest")
# Per-class probabilities are numeric measurements named by codes of our own (private) coding scheme, which the
# SR declares in its Coding Scheme Identification Sequence; the unit is UCUM "1" (no units), range [0, 1].
PRIVATE_SCHEME = "99CXRTRIAGE"
PROBABILITY_CODES: dict[str, hd.sr.CodedConcept] = {
    COVID19: hd.sr.CodedConcept("P-COVID19", PRIVATE_SCHEME, "Probability of COVID-19"),
    PNEUMONIA: hd.sr.CodedConcept("P-PNEUMONIA", PRIVATE_SCHEME, "Probability of pneumonia"),
    NO_FINDING: hd.sr.CodedConcept("P-NOFINDING", PRIVATE_SCHEME, "Probability of no finding"),
}
NO_UNITS = hd.sr.CodedConcept("1", "UCUM", "no units")
# IHE AIR: Contributing Equipment purpose of reference for the algorithm.
PROCESSING_ALGORITHM = ("Newcode1", "99IHE", "Processing Algorithm")


def ensemble_device_uid(device_uids: Sequence[str]) -> str:
    """One Device UID for a set of model versions: a UUID-derived UID (2.25.x) of the members' Device UIDs.

    Each trained version has its own Device UID, so any retrained member changes the ensemble's UID too.
    """
    digest = hashlib.sha256("|".join(sorted(device_uids)).encode()).digest()[:16]
    return f"2.25.{uuid.UUID(bytes=digest).int}"


@dataclass(frozen=True)
class TriageResult:
    """What the SR says: valid once built (labels and probabilities are checked)."""

    label: str
    probabilities: dict[str, float]
    model_set: str
    members: tuple[ModelCard, ...]
    not_for_clinical_use: bool

    def __post_init__(self) -> None:
        if self.label not in CLASS_LABELS:
            raise ValueError(f"unknown label {self.label!r}")
        if set(self.probabilities) != set(CLASS_LABELS):
            raise ValueError(f"probabilities must cover {CLASS_LABELS}, got {sorted(self.probabilities)}")
        if not all(0.0 <= p <= 1.0 for p in self.probabilities.values()):
            raise ValueError("probabilities must lie in [0, 1]")
        if not self.members:
            raise ValueError("a result needs at least one model")

    @property
    def device_uid(self) -> str:
        return ensemble_device_uid([m.device_uid for m in self.members])

    @property
    def software_version(self) -> str:
        return f"{cxr_triage.__version__}; {self.model_set}: " + ", ".join(m.version for m in self.members)


def series_description(result: TriageResult) -> str:
    text = "AI triage result (cxr-triage)"
    return (text + " - NOT FOR CLINICAL USE")[:64] if result.not_for_clinical_use else text


def _contributing_equipment_item(result: TriageResult) -> Dataset:
    item = Dataset()
    purpose = Dataset()
    purpose.CodeValue, purpose.CodingSchemeDesignator, purpose.CodeMeaning = PROCESSING_ALGORITHM
    item.PurposeOfReferenceCodeSequence = DicomSequence([purpose])
    item.Manufacturer = MANUFACTURER
    item.ManufacturerModelName = f"cxr-triage ensemble {result.model_set}"[:64]
    item.SoftwareVersions = result.software_version[:64]
    item.DeviceUID = result.device_uid
    return item


def sanitise_copied_attributes(ds: Dataset) -> None:
    """Repair values copied from the source that are invalid for their VR (we must not write invalid objects)."""
    age = str(ds.get("PatientAge", "") or "")
    if age and not re.fullmatch(r"\d{3}[DWMY]", age):
        if age.isdigit() and len(age) <= 3:
            ds.PatientAge = f"{int(age):03d}Y"
        else:
            del ds.PatientAge


# Type 2 attributes of the Patient and General Study modules: they must be present (possibly empty) in what
# we write, and real sources (e.g. NIH's DX exports) leave some out.
TYPE2_COPIED = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
)


# Copied date and time attributes and how to check a value (an invalid one would make highdicom refuse the object).
_TEMPORAL = {"StudyDate": DA, "StudyTime": TM, "PatientBirthDate": DA, "SeriesDate": DA, "SeriesTime": TM}


def with_type2_defaults(source: Dataset) -> Dataset:
    """A shallow copy of `source` fit to copy from: absent Type 2 patient/study attributes present and empty, a date
    or time that is not valid for its VR emptied, and a character set pydicom does not know replaced by UTF-8."""
    ds = copy.copy(source)
    for keyword in TYPE2_COPIED:
        if keyword not in ds:
            setattr(ds, keyword, "")
    for keyword, vr in _TEMPORAL.items():
        value = ds.get(keyword)
        if value:
            try:
                vr(str(value))
            except (ValueError, TypeError, OverflowError):
                setattr(ds, keyword, "")
    charsets = ds.get("SpecificCharacterSet")
    if charsets:
        names = [charsets] if isinstance(charsets, str) else list(charsets)
        if any(name and name not in python_encoding for name in names):
            ds.SpecificCharacterSet = "ISO_IR 192"
    return ds


def build_sr(source: Dataset, result: TriageResult) -> hd.sr.Comprehensive3DSR:
    """The SR for one source radiograph: same patient and study, new series, TID 1500 with one TID 1501 group."""
    source = with_type2_defaults(source)
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=result.device_uid,
        name=f"cxr-triage {result.model_set}"[:64],
        manufacturer_name=MANUFACTURER,
        model_name=f"ensemble {result.model_set}"[:64],
    )
    observation_context = hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(
            observer_type=codes.DCM.Device, observer_identifying_attributes=device
        )
    )
    algorithm = hd.sr.AlgorithmIdentification(
        name=f"cxr-triage {result.model_set}"[:64],
        version=result.software_version[:64],
        family=codes.DCM.ArtificialIntelligence,
    )
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=generate_uid(), identifier=f"CXR triage of {source.SOPInstanceUID}"[:64]
        ),
        algorithm_id=algorithm,
        source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(source)],
        qualitative_evaluations=[hd.sr.QualitativeEvaluation(codes.DCM.Finding, FINDING_CODES[result.label])],
        measurements=[
            hd.sr.Measurement(name=PROBABILITY_CODES[label], value=round(result.probabilities[label], 6), unit=NO_UNITS)
            for label in CLASS_LABELS
        ],
    )
    report = hd.sr.MeasurementReport(
        observation_context=observation_context,
        procedure_reported=PROCEDURE_REPORTED,
        imaging_measurements=[group],
    )
    sr = hd.sr.Comprehensive3DSR(
        evidence=[source],
        content=report,
        series_instance_uid=generate_uid(),
        series_number=SR_SERIES_NUMBER,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer=MANUFACTURER,
        is_complete=True,
        is_final=False,
        is_verified=False,
        series_description=series_description(result),
    )
    # highdicom refuses the IHE purpose code and has no Device UID on Contributing Equipment: add it here.
    equipment: list[Dataset] = list(sr.get("ContributingEquipmentSequence", []))
    equipment.append(_contributing_equipment_item(result))
    sr.ContributingEquipmentSequence = DicomSequence(equipment)  # type: ignore[assignment]
    sanitise_copied_attributes(sr)
    scheme = Dataset()
    scheme.CodingSchemeDesignator = PRIVATE_SCHEME
    scheme.CodingSchemeName = "cxr-triage probabilities"
    scheme.CodingSchemeResponsibleOrganization = MANUFACTURER
    sr.CodingSchemeIdentificationSequence = DicomSequence([scheme])  # type: ignore[assignment]
    return sr


def describe_sr(ds: Dataset) -> list[str]:
    """The SR in plain words for support staff: what was analysed, by which algorithm, and what it found."""
    lines = [
        f"Document: {ds.get('SeriesDescription', '')}",
        f"Study: {ds.get('StudyInstanceUID', '')}",
        f"Content date: {ds.get('ContentDate', '')} {ds.get('ContentTime', '')}",
        f"Completion: {ds.get('CompletionFlag', '')}   Verification: {ds.get('VerificationFlag', '')}",
    ]
    for equipment in ds.get("ContributingEquipmentSequence", []):
        if "DeviceUID" in equipment:
            lines.append(
                f"Algorithm: {equipment.get('ManufacturerModelName', '')} "
                f"({equipment.get('SoftwareVersions', '')}), Device UID {equipment.DeviceUID}"
            )

    def walk(items: Sequence[Dataset], depth: int) -> None:
        for item in items:
            name = item.ConceptNameCodeSequence[0].CodeMeaning if "ConceptNameCodeSequence" in item else ""
            value_type = item.get("ValueType", "")
            if value_type == "CODE":
                lines.append(f"{'  ' * depth}{name}: {item.ConceptCodeSequence[0].CodeMeaning}")
            elif value_type == "NUM":
                value = item.MeasuredValueSequence[0].NumericValue if "MeasuredValueSequence" in item else "n/a"
                lines.append(f"{'  ' * depth}{name}: {value}")
            elif value_type in ("TEXT", "UIDREF"):
                lines.append(f"{'  ' * depth}{name}: {item.get('TextValue', item.get('UID', ''))}")
            elif value_type == "IMAGE":
                ref = item.ReferencedSOPSequence[0]
                lines.append(f"{'  ' * depth}{name}: image {ref.ReferencedSOPInstanceUID}")
            elif value_type == "CONTAINER":
                lines.append(f"{'  ' * depth}[{name}]")
            walk(item.get("ContentSequence", []), depth + 1)

    walk(ds.get("ContentSequence", []), 0)
    return lines
