"""Rename triage_results to priority_assignments without its URL columns (the API builds result links); drop the
unused model_versions table (the registry on disk is the only record of model versions).

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01 03:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("triage_results") as batch:
        batch.drop_index("ix_triage_results_prediction_id")
        batch.drop_index("ix_triage_results_instance_id")
        batch.drop_column("sr_url")
        batch.drop_column("heatmap_url")
    op.rename_table("triage_results", "priority_assignments")
    with op.batch_alter_table("priority_assignments") as batch:
        batch.create_index("ix_priority_assignments_instance_id", ["instance_id"], unique=True)
        batch.create_index("ix_priority_assignments_prediction_id", ["prediction_id"], unique=False)
    op.drop_table("model_versions")


def downgrade() -> None:
    op.create_table(
        "model_versions",
        sa.Column("version", sa.String(length=100), nullable=False),
        sa.Column("architecture", sa.String(length=100), nullable=False),
        sa.Column("device_uid", sa.String(length=64), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("card", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("version"),
    )
    with op.batch_alter_table("priority_assignments") as batch:
        batch.drop_index("ix_priority_assignments_prediction_id")
        batch.drop_index("ix_priority_assignments_instance_id")
    op.rename_table("priority_assignments", "triage_results")
    with op.batch_alter_table("triage_results") as batch:
        batch.add_column(sa.Column("sr_url", sa.Text(), nullable=True))
        batch.add_column(sa.Column("heatmap_url", sa.Text(), nullable=True))
        batch.create_index("ix_triage_results_instance_id", ["instance_id"], unique=True)
        batch.create_index("ix_triage_results_prediction_id", ["prediction_id"], unique=False)
