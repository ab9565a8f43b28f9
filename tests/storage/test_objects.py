"""One behaviour contract for both object stores, against a real S3 HTTP server (moto)."""

from __future__ import annotations

import time
import urllib.request
import uuid
from pathlib import Path

import pytest
from moto.server import ThreadedMotoServer

from common.settings import Settings
from storage.objects import (
    LocalObjectStore,
    ObjectNotFound,
    ObjectStore,
    ObjectStoreUnavailable,
    S3ObjectStore,
    open_store,
)

KEY = "images/sha256/ab/abc.png"


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.integration)])
def store(request: pytest.FixtureRequest) -> ObjectStore:
    return request.getfixturevalue(f"{request.param}_store")


def test_put_get_exists_delete(store: ObjectStore) -> None:
    assert not store.exists(KEY)
    store.put_bytes(KEY, b"first", content_type="image/png")
    assert store.exists(KEY) and store.get_bytes(KEY) == b"first"
    store.put_bytes(KEY, b"second")  # overwrite
    assert store.get_bytes(KEY) == b"second"
    store.delete(KEY)
    assert not store.exists(KEY)
    store.delete(KEY)  # deleting a missing key is not an error


def test_missing_key_raises_object_not_found(store: ObjectStore, tmp_path: Path) -> None:
    with pytest.raises(ObjectNotFound) as info:
        store.get_bytes("inspections/nope/overlay.png")
    assert isinstance(info.value, KeyError)
    with pytest.raises(ObjectNotFound):
        store.get_to_file("inspections/nope/overlay.png", tmp_path / "out.png")
    assert not (tmp_path / "out.png").exists()


def test_files_round_trip(store: ObjectStore, tmp_path: Path) -> None:
    data = bytes(range(256)) * 4096  # 1 MiB
    src = tmp_path / "src.bin"
    src.write_bytes(data)
    store.put_file("models/m/x.safetensors", src)
    dst = tmp_path / "nested" / "dst.bin"
    store.get_to_file("models/m/x.safetensors", dst)
    assert dst.read_bytes() == data
    assert sorted(p.name for p in dst.parent.iterdir()) == ["dst.bin"]  # no temporaries left


def test_url_serves_the_bytes(store: ObjectStore) -> None:
    store.put_bytes(KEY, b"\x89PNG payload", content_type="image/png")
    url = store.url(KEY)
    assert url.startswith("file://" if isinstance(store, LocalObjectStore) else "http://")
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.read() == b"\x89PNG payload"


@pytest.mark.parametrize("key", ["", "../x", "a/../../x", "/etc/passwd", "a//b", "a/./b", "a\\b", "a/"])
def test_local_store_refuses_escaping_keys(local_store: LocalObjectStore, key: str) -> None:
    with pytest.raises(ValueError):
        local_store.put_bytes(key, b"x")
    with pytest.raises(ValueError):
        local_store.get_bytes(key)


def test_local_store_writes_atomically(local_store: LocalObjectStore) -> None:
    local_store.put_bytes(KEY, b"data")
    target = local_store.root / KEY
    assert target.read_bytes() == b"data"
    assert sorted(p.name for p in target.parent.iterdir()) == ["abc.png"]


@pytest.mark.integration
@pytest.mark.parametrize("scheme", ["", "http://"])
def test_s3_endpoint_with_or_without_scheme(
    s3_server: str, s3_credentials: dict[str, str], scheme: str
) -> None:
    store = S3ObjectStore(
        endpoint=f"{scheme}{s3_server}", bucket=f"b-{uuid.uuid4().hex[:12]}", **s3_credentials
    )
    store.put_bytes("k", b"v")
    assert store.get_bytes("k") == b"v"


@pytest.mark.integration
def test_s3_outage_raises_unavailable_quickly(s3_credentials: dict[str, str]) -> None:
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    store = S3ObjectStore(endpoint=f"{host}:{port}", bucket="outage", **s3_credentials)
    store.put_bytes("k", b"v")
    server.stop()
    # A fresh store must fail on its first call too (bucket check), not only a warm one.
    fresh = S3ObjectStore(endpoint=f"{host}:{port}", bucket="outage", **s3_credentials)
    calls = [
        lambda: store.get_bytes("k"),
        lambda: store.put_bytes("k", b"w"),
        lambda: fresh.exists("k"),
    ]
    for call in calls:
        started = time.monotonic()
        with pytest.raises(ObjectStoreUnavailable):
            call()
        assert time.monotonic() - started < 5


@pytest.mark.integration
def test_open_store_picks_backend_and_caches(tmp_path: Path, s3_server: str) -> None:
    local = open_store(Settings(data_dir=tmp_path))
    assert isinstance(local, LocalObjectStore) and local.root == (tmp_path / "objects").resolve()
    assert open_store(Settings(data_dir=tmp_path)) is local
    settings = Settings(
        s3_endpoint=f"http://{s3_server}",
        s3_access_key="testing",  # type: ignore[arg-type]
        s3_secret_key="testing",  # type: ignore[arg-type]
        s3_bucket=f"b-{uuid.uuid4().hex[:12]}",
    )
    remote = open_store(settings)
    assert isinstance(remote, S3ObjectStore) and open_store(settings) is remote
    remote.put_bytes("k", b"v")
    assert remote.get_bytes("k") == b"v"
    with pytest.raises(ValueError, match="ACCESS_KEY"):
        open_store(Settings(s3_endpoint="127.0.0.1:1", s3_bucket="other"))
