"""Routing decided when an instance is queued: its triage queue (gpu or backlog) and the destination of its DICOM
results (results to their sender, CXR_RESULTS_ROUTES).

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-01 07:30:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


# Plain ALTER TABLE (SQLite >= 3.35 adds and drops columns in place): a batch rebuild of `instances` would fail on
# SQLite, whose connections here enforce the foreign keys that point at it.
def upgrade() -> None:
    op.add_column("instances", sa.Column("triage_queue", sa.String(16), nullable=True))
    op.add_column("instances", sa.Column("results_destination", sa.String(200), nullable=True))


def downgrade() -> None:
    op.drop_column("instances", "results_destination")
    op.drop_column("instances", "triage_queue")
