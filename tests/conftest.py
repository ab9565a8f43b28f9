"""Shared fixtures: real PostgreSQL and a real S3 endpoint (moto's server) on loopback.

PostgreSQL: ``INSPECT_TEST_PG_ADMIN_URL`` (default: trust auth as ``postgres`` on
127.0.0.1:5432) must be allowed to create databases. Each test session gets its own database,
dropped at the end. Tests needing services are marked ``integration``; when a service cannot be
reached they are skipped with the reason.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

import psycopg
import pytest
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session

from common.settings import reset_settings
from storage.db import ensure_schema, make_engine
from storage.objects import LocalObjectStore, S3ObjectStore

PG_ADMIN_URL = os.environ.get(
    "INSPECT_TEST_PG_ADMIN_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)
S3_KEYS = {"access_key": "testing", "secret_key": "testing"}


@pytest.fixture(autouse=True)
def _isolated_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No test reads the developer's config or writes to ~/.local/share."""
    for name in (
        "INSPECT_CONFIG",
        "INSPECT_DATABASE_URL",
        "INSPECT_BROKER_URL",
        "INSPECT_S3_ENDPOINT",
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("INSPECT_DATA_DIR", str(tmp_path / "inspect-data"))
    reset_settings()
    yield
    reset_settings()


def _libpq(url: str) -> str:
    # psycopg wants a plain libpq URL, without SQLAlchemy's "+psycopg" driver suffix.
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


@contextmanager
def pg_database(prefix: str = "inspect_test") -> Iterator[str]:
    """A new empty PostgreSQL database for the block; yields its SQLAlchemy URL."""
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    try:
        admin = psycopg.connect(_libpq(PG_ADMIN_URL), autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as exc:
        # CI starts PostgreSQL, so there a missing server is a failure, not a skip.
        (pytest.fail if os.environ.get("CI") else pytest.skip)(
            f"PostgreSQL not reachable at {PG_ADMIN_URL}: {exc}"
        )
    url = make_url(PG_ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    with admin:
        admin.execute(f'CREATE DATABASE "{name}"')
        try:
            yield url
        finally:
            make_engine(url).dispose()
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def make_pg_database() -> Callable[..., AbstractContextManager[str]]:
    """``with make_pg_database() as url:`` gives an empty database dropped after the block."""
    return pg_database


@pytest.fixture(scope="session")
def s3_credentials() -> dict[str, str]:
    return dict(S3_KEYS)


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """A migrated PostgreSQL database shared by the test session."""
    with pg_database() as url:
        ensure_schema(url)
        yield url


@pytest.fixture(scope="module")
def pg_module_url() -> Iterator[str]:
    """A migrated database per test module, for tests that commit (pipeline, end to end)."""
    with pg_database() as url:
        ensure_schema(url)
        yield url


@pytest.fixture
def pg_fresh_url() -> Iterator[str]:
    """A migrated database of the test's own, for tests that must commit (concurrency)."""
    with pg_database() as url:
        ensure_schema(url)
        yield url


@pytest.fixture
def pg_session(pg_url: str) -> Iterator[Session]:
    """A session inside a transaction rolled back after the test; the code under test may
    commit and use savepoints freely (they become savepoints of the outer transaction)."""
    with make_engine(pg_url).connect() as conn:
        outer = conn.begin()
        session = Session(bind=conn, join_transaction_mode="create_savepoint", expire_on_commit=False)
        try:
            yield session
        finally:
            session.close()
            outer.rollback()


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    """URL of a not yet migrated SQLite file (call ``ensure_schema`` to create the tables)."""
    return f"sqlite:///{tmp_path / 'db' / 'inspect.db'}"


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """An S3 HTTP endpoint on loopback, as "host:port"."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"{host}:{port}"
    finally:
        server.stop()


@pytest.fixture
def s3_store(s3_server: str) -> S3ObjectStore:
    """A store on a bucket of its own (created lazily on first use)."""
    bucket = f"test-{uuid.uuid4().hex[:16]}"
    return S3ObjectStore(endpoint=s3_server, bucket=bucket, region="us-east-1", **S3_KEYS)


@pytest.fixture
def local_store(tmp_path: Path) -> LocalObjectStore:
    return LocalObjectStore(tmp_path / "objects")
