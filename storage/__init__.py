"""Persistence: SQL database (SQLAlchemy + Alembic) and object storage (S3 or a local directory)."""
