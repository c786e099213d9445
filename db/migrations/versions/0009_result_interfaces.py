"""Result objects that are not DICOM (an HL7 v2 message for the RIS, a FHIR Bundle): the DICOM identity columns become
optional, each object names its content type and, for a message made when a study's priority changed, the priority it
reports; each delivery attempt records the destination's answer (DIMSE status, HL7 ACK code, HTTP status).

Existing rows keep their values (all DICOM: content type application/dicom). The downgrade removes the non-DICOM
objects and their attempts, which the older schema cannot hold.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-02 09:00:00
"""

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

DICOM_COLUMNS = ("sop_class_uid", "sop_instance_uid", "series_instance_uid")
ATTEMPT_COLUMNS = "id, result_id, destination, dimse_status, error, at"  # those of 0003


@contextmanager
def _attempts_set_aside() -> Iterator[None]:
    """SQLite rebuilds result_objects to change a column's NULL constraint (batch mode); with foreign keys enforced
    (db/session.py) it cannot drop the old table while delivery_attempts rows point at it, and PRAGMA foreign_keys
    does not change inside the migration's transaction. So the attempts wait in a temporary copy meanwhile."""
    if op.get_bind().dialect.name != "sqlite":
        yield
        return
    op.execute(f"CREATE TEMPORARY TABLE attempts_0009 AS SELECT {ATTEMPT_COLUMNS} FROM delivery_attempts")
    op.execute("DELETE FROM delivery_attempts")
    yield
    op.execute(f"INSERT INTO delivery_attempts ({ATTEMPT_COLUMNS}) SELECT {ATTEMPT_COLUMNS} FROM attempts_0009")
    op.execute("DROP TABLE attempts_0009")


def upgrade() -> None:
    with _attempts_set_aside(), op.batch_alter_table("result_objects") as batch:
        for name in DICOM_COLUMNS:
            batch.alter_column(name, existing_type=sa.String(64), nullable=True)
        batch.add_column(sa.Column("content_type", sa.String(64), nullable=False, server_default="application/dicom"))
        batch.add_column(sa.Column("event", sa.String(64), nullable=True))
    op.create_index("ix_result_objects_kind_status", "result_objects", ["kind", "status"])
    with op.batch_alter_table("delivery_attempts") as batch:
        batch.add_column(sa.Column("answer", sa.String(64), nullable=True))


def downgrade() -> None:
    not_dicom = "SELECT id FROM result_objects WHERE sop_instance_uid IS NULL OR content_type <> 'application/dicom'"
    op.execute(f"DELETE FROM delivery_attempts WHERE result_id IN ({not_dicom})")
    op.execute(f"DELETE FROM result_objects WHERE id IN ({not_dicom})")
    with op.batch_alter_table("delivery_attempts") as batch:
        batch.drop_column("answer")
    op.drop_index("ix_result_objects_kind_status", table_name="result_objects")
    with _attempts_set_aside(), op.batch_alter_table("result_objects") as batch:
        batch.drop_column("event")
        batch.drop_column("content_type")
        for name in DICOM_COLUMNS:
            batch.alter_column(name, existing_type=sa.String(64), nullable=False)
