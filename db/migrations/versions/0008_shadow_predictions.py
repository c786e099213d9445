"""Shadow predictions: the role of a prediction (live: the promoted set's, used for priority and results; shadow: a
candidate set's, stored for comparison only), one current prediction per instance, model set and role.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-01 06:30:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.drop_index("uq_prediction_current", table_name="predictions")
    with op.batch_alter_table("predictions") as batch:
        batch.add_column(sa.Column("role", sa.String(8), nullable=False, server_default="live"))
    op.create_index(
        "uq_prediction_current",
        "predictions",
        ["instance_id", "model_set", "role"],
        unique=True,
        sqlite_where=sa.text("superseded_at IS NULL"),
        postgresql_where=sa.text("superseded_at IS NULL"),
    )
    op.create_index("ix_predictions_role_model_set", "predictions", ["role", "model_set"])


def downgrade() -> None:
    op.drop_index("ix_predictions_role_model_set", table_name="predictions")
    op.drop_index("uq_prediction_current", table_name="predictions")
    op.execute("DELETE FROM predictions WHERE role <> 'live'")
    with op.batch_alter_table("predictions") as batch:
        batch.drop_column("role")
    op.create_index(
        "uq_prediction_current",
        "predictions",
        ["instance_id", "model_set"],
        unique=True,
        sqlite_where=sa.text("superseded_at IS NULL"),
        postgresql_where=sa.text("superseded_at IS NULL"),
    )
