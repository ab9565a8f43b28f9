"""The migrations reproduce the ORM schema exactly (``alembic check``) on PostgreSQL and run
on SQLite, forwards and backwards."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager

import pytest
from alembic import command
from sqlalchemy import create_engine, inspect

from storage.db import alembic_config, ensure_schema

TABLES = {
    "alembic_version",
    "categories",
    "detections",
    "inspections",
    "jobs",
    "lines",
    "memory_banks",
    "model_weights",
    "prompt_sets",
    "rejected_messages",
    "results",
    "stage_runs",
}


def _tables(url: str) -> set[str]:
    engine = create_engine(url)
    try:
        return set(inspect(engine).get_table_names())
    finally:
        engine.dispose()


@pytest.mark.integration
def test_postgres_upgrade_check_downgrade_upgrade(
    make_pg_database: Callable[..., AbstractContextManager[str]],
) -> None:
    with make_pg_database("inspect_migrations") as url:
        ensure_schema(url)
        assert _tables(url) == TABLES
        command.check(alembic_config(url))  # raises if the ORM and the schema differ
        ensure_schema(url)  # already at head: a no-op
        command.downgrade(alembic_config(url), "base")
        assert _tables(url) == {"alembic_version"}
        ensure_schema(url)
        command.check(alembic_config(url))


def test_sqlite_upgrade_check_downgrade(sqlite_url: str) -> None:
    ensure_schema(sqlite_url)  # also creates the parent directory
    assert _tables(sqlite_url) == TABLES
    command.check(alembic_config(sqlite_url))
    command.downgrade(alembic_config(sqlite_url), "base")
    assert _tables(sqlite_url) == {"alembic_version"}
    ensure_schema(sqlite_url)
    assert _tables(sqlite_url) == TABLES
