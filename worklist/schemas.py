"""The API's request and response bodies (they are the OpenAPI document's schemas)."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, Field

from cxr_triage.priority import Priority, Source
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


class ResultLink(BaseModel):
    """A result object we produced (cxr_triage/result_kinds.py) and where the API serves it."""

    kind: str
    title: str
    url: str
    image: bool = Field(description="A picture: `url` is its PNG rendering.")
    status: str = Field(description="Delivery: stored, pending, queued, delivered or failed.")


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


class StudyDetail(WorklistItem):
    requested_priority: str | None = Field(description="As received in DICOM (e.g. RequestedProcedurePriority).")
    user_priority: Priority | None
    instances: list[InstanceDetail]


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
