"""Alembic environment: the schema is ``storage.orm``'s metadata; the URL comes from settings.

A URL set on the Alembic config (``storage.db.ensure_schema``, tests) wins over
``INSPECT_DATABASE_URL`` / the embedded SQLite default.
"""

from __future__ import annotations

from logging.config import fileConfig

from alembic import context
from sqlalchemy import create_engine, pool, text
from sqlalchemy.engine import make_url

import storage.orm  # noqa: F401  (registers every table on Base.metadata)
from common.settings import get_settings
from storage.db import Base, UTCDateTime

config = context.config
target_metadata = Base.metadata

# Arbitrary constant: serialises concurrent `upgrade` runs (several workers starting at once).
_PG_MIGRATION_LOCK = 7_245_001

if (
    config.config_file_name
    and config.attributes.get("configure_logging", True)
    and config.file_config.has_section("loggers")
):
    fileConfig(config.config_file_name, disable_existing_loggers=False)


def _url() -> str:
    return config.get_main_option("sqlalchemy.url") or get_settings().resolved_database_url


def _render_item(type_: str, obj: object, autogen_context: object) -> str | bool:
    # Keep future revisions free of application imports: UTCDateTime is a plain timestamptz.
    if type_ == "type" and isinstance(obj, UTCDateTime):
        return "sa.DateTime(timezone=True)"
    return False


def _configure(**kwargs: object) -> None:
    is_sqlite = make_url(_url()).get_backend_name() == "sqlite"
    context.configure(
        target_metadata=target_metadata,
        # SQLite cannot ALTER constraints: batch mode recreates the table instead.
        render_as_batch=is_sqlite,
        compare_type=True,
        render_item=_render_item,
        **kwargs,  # type: ignore[arg-type]
    )


def run_migrations_offline() -> None:
    _configure(url=_url(), literal_binds=True, dialect_opts={"paramstyle": "named"})
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    # A dedicated engine rather than storage.db.make_engine: on SQLite foreign keys must stay
    # off during migrations, or batch mode's table copy would cascade deletes.
    engine = create_engine(_url(), poolclass=pool.NullPool)
    try:
        with engine.connect() as connection:
            _configure(connection=connection)
            with context.begin_transaction():
                if connection.dialect.name == "postgresql":
                    connection.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_MIGRATION_LOCK})
                context.run_migrations()
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
