"""Alembic environment: runs migrations against the URL the caller put in the config."""

from __future__ import annotations

from alembic import context

import db.audit_models
import db.feedback_models  # the feedback table joins Base.metadata
import db.worklist_models  # noqa: F401  (the worklist tables join Base.metadata)
from db.models import Base
from db.session import make_engine

config = context.config
target_metadata = Base.metadata


def run_migrations_online() -> None:
    url = config.get_main_option("sqlalchemy.url")
    assert url, "sqlalchemy.url is not set"
    with make_engine(url).connect() as connection:
        context.configure(connection=connection, target_metadata=target_metadata, render_as_batch=True)
        with context.begin_transaction():
            context.run_migrations()


run_migrations_online()
