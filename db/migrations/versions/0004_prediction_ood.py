"""Out-of-distribution score and flag per prediction, and the operating point the label was decided at.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01 00:30:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("predictions") as batch:
        batch.add_column(sa.Column("ood_score", sa.Float(), nullable=True))
        batch.add_column(sa.Column("out_of_distribution", sa.Boolean(), nullable=True))
        batch.add_column(sa.Column("operating_point", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("predictions") as batch:
        batch.drop_column("operating_point")
        batch.drop_column("out_of_distribution")
        batch.drop_column("ood_score")
