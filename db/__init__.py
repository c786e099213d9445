"""Database layer: SQLAlchemy models, sessions, migrations and the queries the parts share."""
