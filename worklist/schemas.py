"""The API's request and response bodies (they are the OpenAPI document's schemas)."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, Field

from cxr_triage.priority import Priority, Source
from db.feedback_models import ReadFinding
from worklist.auth import USERNAME_PATTERN

StudyStatus = Literal["pending", "done", "failed", "skipped"]
UID_PATTERN = r"^[0-9][0-9.]{0,63}$"


class WorklistItem(BaseModel):
    """One study on the worklist. Priority is never lower than the DICOM or user priority."""

    study_instance_uid: str
    accession_number: str | None
    patient_name: str | None
    patient_id: str | None
    study_description: str | None
    study_date: str | None
    arrived_at: datetime
    waiting_s: float = Field(description="Seconds since the study arrived.")
    status: StudyStatus = Field(description="pending while any instance is not finished, then failed/done/skipped.")
    instance_count: int
    priority: Priority
    priority_rank: int = Field(description="Higher is more urgent; the list is ordered by it, then by arrival.")
    priority_source: Source = Field(description="Who set the effective priority: ai, dicom, user, failed or none.")
    rule: str | None = Field(description="The rule that fired for the effective priority.")
    ai_priority: Priority | None
    label: str | None
    probabilities: dict[str, float] | None
    not_for_clinical_use: bool | None
    heatmap_url: str | None = Field(description="PNG of the deciding instance's picture result (the heatmap).")
    read: bool
    read_at: datetime | None
    read_by: str | None


class WorklistPage(BaseModel):
    items: list[WorklistItem]
    total: int
    limit: int
    offset: int
    disclaimer: str | None = Field(description="Shown when any listed result comes from a demo model.")
    warnings: list[str] = Field(
        default_factory=list,
        description="Drift warnings for the header: the last day's STAT or out-of-distribution rate outside the range "
        "of the previous weeks (details in GET /api/drift).",
    )


class ResultLink(BaseModel):
    """A result object we produced (cxr_triage/result_kinds.py) and where the API serves it."""

    kind: str
    title: str
    url: str
    image: bool = Field(description="A picture: `url` is its PNG rendering.")
    status: str = Field(description="Delivery: stored, pending, queued, delivered or failed.")
    transport: str = Field("dicom", description="The interface it goes out on: dicom (C-STORE), hl7 (MLLP) or fhir.")
    destination: str | None = Field(
        None, description="Where it is (or was) sent: AE@host:port, the RIS or FHIR server."
    )


class PredictionDetail(BaseModel):
    label: str
    probabilities: dict[str, float]
    member_probabilities: dict[str, dict[str, float]] = Field(description="Per model version, per class.")
    model_set: str
    model_versions: list[str]
    not_for_clinical_use: bool
    created_at: datetime
    turnaround_s: float = Field(description="From the instance's arrival to this result.")
    priority: Priority | None
    rule: str | None
    rule_detail: str | None
    results: list[ResultLink] = Field(description="Every result object of this prediction, in registry order.")
    sr_url: str | None = Field(description="The link of the result of kind sr (also in `results`).")
    heatmap_url: str | None = Field(description="The link of the result of kind heatmap (also in `results`).")


class ShadowPredictionDetail(BaseModel):
    """The candidate set's prediction in shadow mode: stored for comparison, never used for the priority, the results
    or the worklist."""

    note: Literal["shadow (not used)"] = "shadow (not used)"
    label: str
    probabilities: dict[str, float]
    model_set: str
    model_versions: list[str]
    out_of_distribution: bool | None
    created_at: datetime


class InstanceDetail(BaseModel):
    sop_instance_uid: str
    series_instance_uid: str | None
    modality: str | None
    body_part: str | None
    view_position: str | None
    status: str
    status_reason: str | None
    received_at: datetime
    prediction: PredictionDetail | None
    shadow: ShadowPredictionDetail | None = Field(
        None, description="The shadow set's prediction, only for the users in CXR_WORKLIST_SHADOW_USERS."
    )


class FindingRecord(BaseModel):
    """One recording of the study's read finding."""

    finding: ReadFinding
    username: str
    recorded_at: datetime
    superseded_at: datetime | None = Field(description="When a later recording replaced it; null for the current.")
    ai_label: str | None = Field(description="The AI's label of the study when the finding was recorded.")
    ai_model_set: str | None = Field(description="The model set that gave that label.")


class StudyDetail(WorklistItem):
    requested_priority: str | None = Field(description="As received in DICOM (e.g. RequestedProcedurePriority).")
    user_priority: Priority | None
    instances: list[InstanceDetail]
    finding: FindingRecord | None = Field(description="The current read finding; null until one is recorded.")
    finding_history: list[FindingRecord] = Field(description="Every recording, oldest first (the last is current).")


class FindingChoice(BaseModel):
    finding: ReadFinding = Field(description="The radiologist's read finding; recording again supersedes it.")


class AgreementCell(BaseModel):
    """Confirmed reads of the studies the AI gave one label in one ISO week, and how many the read confirmed."""

    week: str = Field(description="ISO week, e.g. 2026-W49 (of the recording of the read finding).")
    ai_label: str
    confirmed: int = Field(description="Studies with this AI label and a current read finding among its classes.")
    agreed: int = Field(description="Of those, the studies whose read finding is the AI's label.")
    rate: float | None = Field(description="agreed / confirmed; null without confirmed reads.")


class AgreementReport(BaseModel):
    """The AI's agreement with the radiologists' confirmed reads: the site's own performance."""

    weeks: int = Field(description="How many weeks back (from now) the report reaches.")
    cells: list[AgreementCell] = Field(description="Per ISO week and AI label, oldest week first.")
    per_label: list[AgreementCell] = Field(description="Per AI label over all the weeks (week: `all`).")
    overall: AgreementCell = Field(description="All labels and weeks together (ai_label and week: `all`).")
    findings: dict[str, int] = Field(
        description="Current read findings by finding (all time), including those outside the model's classes."
    )


class DriftCheckDetail(BaseModel):
    check: Literal["stat", "ood"]
    last: float | None = Field(description="The last 24 hours' rate; null with fewer than CXR_DRIFT_MIN_CASES.")
    low: float | None = Field(
        description="The baseline's lowest daily rate minus CXR_DRIFT_TOLERANCE (null: no range)."
    )
    high: float | None = Field(description="The baseline's highest daily rate plus the tolerance (null: no range).")
    cases: int = Field(description="Live predictions in the last 24 hours.")
    baseline_days: int = Field(description="Days of the baseline with enough cases.")
    outside: bool = Field(description="The last day's rate is outside the range: the header warns.")
    message: str


class DriftReport(BaseModel):
    """The last 24 hours of live predictions against the previous weeks (read at most every CXR_DRIFT_REFRESH_S)."""

    read_at: datetime
    cases_24h: int
    label_share_24h: dict[str, float] = Field(description="Share of the last 24 hours' predictions per label.")
    mean_probability_24h: dict[str, float] = Field(description="Mean probability per class over the last 24 hours.")
    stat_rate_24h: float | None
    ood_rate_24h: float | None
    checks: list[DriftCheckDetail]
    warnings: list[str]


class ReadState(BaseModel):
    read: bool


class UserPriority(BaseModel):
    priority: Priority | None = Field(description="null clears the user's priority.")


class LoginRequest(BaseModel):
    username: str = Field(pattern=USERNAME_PATTERN)
    password: str = Field(min_length=1, max_length=1024)


class TokenResponse(BaseModel):
    token: str
    token_type: Literal["bearer"] = "bearer"
    expires_at: datetime


class Me(BaseModel):
    username: str


class HealthReport(BaseModel):
    ok: bool
    checks: dict[str, str] = Field(description="Each part: what was found, or a short fixed reason it is down.")
    down: list[str] = Field(default_factory=list, description="The parts that are not ready.")
