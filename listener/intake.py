"""The intake policy: which accepted instances are triaged, and why the others are stored but skipped."""

from __future__ import annotations

import re
from dataclasses import dataclass

from pydicom.dataset import Dataset

from cxr_triage.settings import Settings

# Words in free-text descriptions that name a body part other than the chest (used only when neither
# BodyPartExamined nor AnatomicRegionSequence says what was imaged).
NON_CHEST_WORDS = (
    "TEETH",
    "TOOTH",
    "DENTAL",
    "PANORAMIC",
    "SKULL",
    "HEAD",
    "SINUS",
    "CERVICAL",
    "SPINE",
    "LUMBAR",
    "PELVIS",
    "HIP",
    "FEMUR",
    "KNEE",
    "TIBIA",
    "ANKLE",
    "FOOT",
    "HAND",
    "WRIST",
    "ELBOW",
    "HUMERUS",
    "SHOULDER",
    "ABDOMEN",
    "MAMMO",
    "BREAST",
    "EXTREMITY",
)
CHEST_WORDS = ("CHEST", "THORAX", "THORACIC", "LUNG", "CXR", "PULMONARY")
LATERAL_WORDS = ("LATERAL", "LAT")
DESCRIPTION_KEYWORDS = (
    "StudyDescription",
    "SeriesDescription",
    "ProtocolName",
    "RequestedProcedureDescription",
    "PerformedProcedureStepDescription",
)

# SNOMED CT codes for the chest in AnatomicRegionSequence (CID 4031).
CHEST_REGION_CODES = frozenset({"51185008", "43799004", "302551006", "39607008"})


@dataclass(frozen=True)
class IntakeDecision:
    triage: bool
    reason: str | None = None


def _upper_word(ds: Dataset, keyword: str) -> str:
    """The attribute as a stripped upper-case string for matching against keywords; "" when absent."""
    value = ds.get(keyword)
    return str(value).strip().upper() if value is not None else ""


def _shown(value: str) -> str:
    """A header value as quoted in a skip reason: control and other unprintable characters (a sender's garbage, an
    ESC sequence for whoever prints the reason in a terminal) become "?", and at most 64 characters are kept."""
    return "".join(ch if ch.isprintable() else "?" for ch in value[:64])


def _region_codes(ds: Dataset) -> list[tuple[str, str]]:
    seq = ds.get("AnatomicRegionSequence") or []
    return [(str(item.get("CodeValue", "")), str(item.get("CodeMeaning", ""))) for item in seq]


def decide(ds: Dataset, settings: Settings) -> IntakeDecision:
    """Triage frontal chest radiographs; anything else gets a reason (stored, never triaged)."""
    modality = _upper_word(ds, "Modality")
    if settings.triage_modalities and modality not in settings.triage_modalities:
        return IntakeDecision(False, f"modality {_shown(modality) or 'absent'}")
    body_part = _upper_word(ds, "BodyPartExamined")
    regions = _region_codes(ds)
    if body_part:
        if settings.triage_body_parts and body_part not in settings.triage_body_parts:
            return IntakeDecision(False, f"body part {_shown(body_part)}")
    elif regions:
        if not any(code in CHEST_REGION_CODES for code, _ in regions):
            meaning = regions[0][1] or regions[0][0]
            return IntakeDecision(False, f"anatomic region {_shown(meaning.upper())}")
    else:
        words = set(re.findall(r"[A-Z]+", " ".join(_upper_word(ds, k) for k in DESCRIPTION_KEYWORDS)))
        non_chest = [w for w in NON_CHEST_WORDS if w in words]
        if non_chest and not words.intersection(CHEST_WORDS):
            return IntakeDecision(False, f"description names {non_chest[0]}, no body part given")
        if words.intersection(LATERAL_WORDS) and not _upper_word(ds, "ViewPosition"):
            return IntakeDecision(False, "lateral view (from description)")
    view = _upper_word(ds, "ViewPosition")
    if view and settings.triage_view_positions and view not in settings.triage_view_positions:
        if view in ("LL", "RL", "LAT", "LATERAL", "LLD", "RLD"):
            return IntakeDecision(False, f"lateral view ({view})")
        return IntakeDecision(False, f"view position {_shown(view)}")
    return IntakeDecision(True)
