"""The heartbeat of the worker holding an instance, when the retention policy removed its spool file, and predictions
superseded by a corrected re-send of their instance (one current prediction per instance and model set).

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-01 04:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("instances") as batch:
        batch.add_column(sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("spool_removed_at", sa.DateTime(timezone=True), nullable=True))
    with op.batch_alter_table("predictions") as batch:
        batch.add_column(sa.Column("superseded_at", sa.DateTime(timezone=True), nullable=True))
        batch.drop_constraint("uq_prediction_instance_model_set", type_="unique")
    op.create_index(
        "uq_prediction_current",
        "predictions",
        ["instance_id", "model_set"],
        unique=True,
        sqlite_where=sa.text("superseded_at IS NULL"),
        postgresql_where=sa.text("superseded_at IS NULL"),
    )


def downgrade() -> None:
    op.drop_index("uq_prediction_current", table_name="predictions")
    op.execute("DELETE FROM predictions WHERE superseded_at IS NOT NULL")  # the old schema allows one per set
    with op.batch_alter_table("predictions") as batch:
        batch.drop_column("superseded_at")
        batch.create_unique_constraint("uq_prediction_instance_model_set", ["instance_id", "model_set"])
    with op.batch_alter_table("instances") as batch:
        batch.drop_column("spool_removed_at")
        batch.drop_column("heartbeat_at")
