"""Access audit trail: `audit_events`, append-only (triggers refuse UPDATE and DELETE, and TRUNCATE on PostgreSQL).

A later migration that rebuilds this table on SQLite (batch mode copies it) must create the triggers again.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-01 06:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

REFUSED = "audit_events is append-only"


def upgrade() -> None:
    op.create_table(
        "audit_events",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("username", sa.String(length=64), nullable=False),
        sa.Column("action", sa.String(length=32), nullable=False),
        sa.Column("study_instance_uid", sa.String(length=64), nullable=True),
        sa.Column("object_id", sa.String(length=64), nullable=True),
        sa.Column("sop_class_uid", sa.String(length=64), nullable=True),
        sa.Column("client_address", sa.String(length=64), nullable=False),
        sa.Column("outcome", sa.Integer(), nullable=False),
        sa.Column("http_status", sa.Integer(), nullable=True),
        sa.Column("via", sa.String(length=100), nullable=False),
        sa.Column("details", sa.String(length=500), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    for column in ("at", "username", "study_instance_uid"):
        op.create_index(f"ix_audit_events_{column}", "audit_events", [column], unique=False)
    dialect = op.get_bind().dialect.name
    if dialect == "postgresql":
        op.execute(
            "CREATE FUNCTION audit_events_refuse_change() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
            f"RAISE EXCEPTION USING MESSAGE = '{REFUSED}: ' || TG_OP || ' refused', "
            "ERRCODE = 'insufficient_privilege'; END $$"
        )
        op.execute(
            "CREATE TRIGGER audit_events_append_only BEFORE UPDATE OR DELETE ON audit_events "
            "FOR EACH ROW EXECUTE FUNCTION audit_events_refuse_change()"
        )
        op.execute(
            "CREATE TRIGGER audit_events_no_truncate BEFORE TRUNCATE ON audit_events "
            "FOR EACH STATEMENT EXECUTE FUNCTION audit_events_refuse_change()"
        )
    elif dialect == "sqlite":
        for operation in ("UPDATE", "DELETE"):
            op.execute(
                f"CREATE TRIGGER audit_events_no_{operation.lower()} BEFORE {operation} ON audit_events "
                f"BEGIN SELECT RAISE(ABORT, '{REFUSED}: {operation} refused'); END"
            )


def downgrade() -> None:
    # Dropping the table drops its triggers (and, on SQLite, fires none).
    op.drop_table("audit_events")  # with its indexes
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP FUNCTION audit_events_refuse_change()")
