"""Radiologist feedback: the read finding of a study, recorded on the study page (issue 12).

Each change is a new row (append-only: an edit supersedes the previous row, which stays with its user and time), so
that the history of a study's confirmed finding is kept; the current finding is the row not superseded.
"""

from __future__ import annotations

from datetime import datetime
from typing import Final, Literal, get_args

from sqlalchemy import DateTime, ForeignKey, Index, Integer, String, text
from sqlalchemy.orm import Mapped, mapped_column

from cxr_triage.labels import COVID19, NO_FINDING, PNEUMONIA
from db.models import Base, utcnow

ReadFinding = Literal["COVID-19", "Pneumonia", "No finding", "Other abnormality", "Not assessable"]
READ_FINDINGS: Final[tuple[str, ...]] = get_args(ReadFinding)
# The findings that are one of the model's classes (and so can confirm or contradict it, and train it).
TRAINABLE: Final[frozenset[str]] = frozenset({COVID19, PNEUMONIA, NO_FINDING})
assert set(READ_FINDINGS) >= TRAINABLE


class StudyFinding(Base):
    """One recording of a study's read finding by a radiologist, with the AI's label at that moment."""

    __tablename__ = "study_findings"
    __table_args__ = (
        Index(
            "uq_study_finding_current",
            "study_id",
            unique=True,
            sqlite_where=text("superseded_at IS NULL"),
            postgresql_where=text("superseded_at IS NULL"),
        ),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    finding: Mapped[str] = mapped_column(String(32))
    username: Mapped[str] = mapped_column(String(64))
    # The live AI label of the study when the finding was recorded (the most urgent of its instances), and its set.
    ai_label: Mapped[str | None] = mapped_column(String(32), nullable=True)
    ai_model_set: Mapped[str | None] = mapped_column(String(100), nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, index=True)
    superseded_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
