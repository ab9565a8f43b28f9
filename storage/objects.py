"""Object storage: S3 through the ``minio`` client, or a local directory (embedded default).

Both stores honour one contract: missing keys raise ``ObjectNotFound`` (a ``KeyError``);
infrastructure outages raise ``ObjectStoreUnavailable`` so Celery tasks can retry on that
class alone and fail fast on everything else.
"""

from __future__ import annotations

import io
import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path, PurePosixPath
from typing import Protocol, TypeVar

import certifi
import urllib3
from minio import Minio
from minio.error import InvalidResponseError, S3Error, ServerError

from common.settings import Settings, get_settings

DEFAULT_CONTENT_TYPE = "application/octet-stream"
PRESIGN_EXPIRY = timedelta(days=7)  # the S3 maximum for SigV4 presigned URLs
_MISSING_CODES = {"NoSuchKey", "NoSuchObject", "NoSuchBucket", "NotFound"}

T = TypeVar("T")


class ObjectNotFound(KeyError):
    """The key does not exist in the store."""


class ObjectStoreUnavailable(Exception):
    """The store cannot be reached or answered with a server error; retrying may succeed."""


class ObjectStore(Protocol):
    def put_bytes(self, key: str, data: bytes, content_type: str = DEFAULT_CONTENT_TYPE) -> None: ...

    def get_bytes(self, key: str) -> bytes: ...

    def exists(self, key: str) -> bool: ...

    def put_file(self, key: str, path: Path, content_type: str = DEFAULT_CONTENT_TYPE) -> None: ...

    def get_to_file(self, key: str, path: Path) -> None: ...

    def url(self, key: str) -> str: ...

    def delete(self, key: str) -> None: ...


class LocalObjectStore:
    """Objects as files under ``root``; writes are atomic (temporary file + ``os.replace``)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root).expanduser().resolve()

    def _path(self, key: str) -> Path:
        parts = PurePosixPath(key).parts
        if (
            not key
            or key.startswith("/")
            or "\\" in key
            or any(p in {"", ".", ".."} for p in parts)
            or len(parts) != len(key.split("/"))
        ):
            raise ValueError(f"invalid object key: {key!r}")
        path = self.root.joinpath(*parts)
        # Belt and braces against symlinks inside the root pointing elsewhere.
        if not path.resolve().is_relative_to(self.root):
            raise ValueError(f"object key escapes the store root: {key!r}")
        return path

    def _write(self, path: Path, fill: Callable[[int], None]) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            fill(fd)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def put_bytes(self, key: str, data: bytes, content_type: str = DEFAULT_CONTENT_TYPE) -> None:
        def fill(fd: int) -> None:
            with os.fdopen(fd, "wb") as f:
                f.write(data)

        self._write(self._path(key), fill)

    def get_bytes(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except (FileNotFoundError, IsADirectoryError):
            raise ObjectNotFound(key) from None

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def put_file(self, key: str, path: Path, content_type: str = DEFAULT_CONTENT_TYPE) -> None:
        def fill(fd: int) -> None:
            with os.fdopen(fd, "wb") as dst, open(path, "rb") as src:
                shutil.copyfileobj(src, dst)

        self._write(self._path(key), fill)

    def get_to_file(self, key: str, path: Path) -> None:
        src = self._path(key)
        if not src.is_file():
            raise ObjectNotFound(key)

        def fill(fd: int) -> None:
            with os.fdopen(fd, "wb") as dst, open(src, "rb") as f:
                shutil.copyfileobj(f, dst)

        self._write(Path(path), fill)

    def url(self, key: str) -> str:
        return self._path(key).as_uri()

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)


def _split_endpoint(endpoint: str, secure: bool) -> tuple[str, bool]:
    """Accept ``host:port`` or ``http(s)://host:port``; a scheme decides ``secure``."""
    scheme, sep, rest = endpoint.partition("://")
    if not sep:
        return endpoint.rstrip("/"), secure
    if scheme.lower() not in {"http", "https"}:
        raise ValueError(f"S3 endpoint scheme must be http or https: {endpoint!r}")
    host = rest.rstrip("/")
    if "/" in host:
        raise ValueError(f"S3 endpoint must not contain a path: {endpoint!r}")
    return host, scheme.lower() == "https"


def _http_client() -> urllib3.PoolManager:
    # minio's default waits 5 minutes per attempt and retries 5 times: an outage would hang a
    # worker for half an hour instead of failing fast into Celery's retry with backoff.
    return urllib3.PoolManager(
        timeout=urllib3.Timeout(connect=5, read=30),
        maxsize=10,
        cert_reqs="CERT_REQUIRED",
        ca_certs=os.environ.get("SSL_CERT_FILE") or certifi.where(),
        retries=urllib3.Retry(total=2, backoff_factor=0.2, status_forcelist=[500, 502, 503, 504]),
    )


@contextmanager
def _translate(key: str | None = None) -> Iterator[None]:
    """Map minio/urllib3 errors onto the store's two exception classes."""
    try:
        yield
    except S3Error as exc:
        if key is not None and exc.code in _MISSING_CODES:
            raise ObjectNotFound(key) from exc
        if exc.response is not None and exc.response.status >= 500:
            raise ObjectStoreUnavailable(str(exc)) from exc
        raise
    except ServerError as exc:
        raise ObjectStoreUnavailable(str(exc)) from exc
    except InvalidResponseError as exc:
        # Non-XML answers with a 5xx come from proxies and load balancers in front of S3.
        if getattr(exc, "_code", 0) >= 500:
            raise ObjectStoreUnavailable(str(exc)) from exc
        raise
    except (urllib3.exceptions.HTTPError, ConnectionError, TimeoutError) as exc:
        raise ObjectStoreUnavailable(f"object store unreachable: {exc}") from exc


class S3ObjectStore:
    """A bucket on an S3-compatible server (MinIO in production, moto in tests)."""

    def __init__(
        self,
        endpoint: str,
        access_key: str,
        secret_key: str,
        bucket: str,
        secure: bool = False,
        region: str | None = None,
    ) -> None:
        host, secure = _split_endpoint(endpoint, secure)
        self.bucket = bucket
        self._region = region
        self._client = Minio(
            endpoint=host,
            access_key=access_key,
            secret_key=secret_key,
            secure=secure,
            region=region,
            http_client=_http_client(),
        )
        self._bucket_ready = False
        self._lock = threading.Lock()

    def ensure_bucket(self) -> None:
        """Create the bucket on first use; cheap afterwards."""
        if self._bucket_ready:
            return
        with self._lock, _translate():
            if not self._client.bucket_exists(bucket_name=self.bucket):
                try:
                    if self._region:
                        self._client.make_bucket(bucket_name=self.bucket, location=self._region)
                    else:
                        self._client.make_bucket(bucket_name=self.bucket)
                except S3Error as exc:
                    # Another process created it between our check and our request.
                    if exc.code not in {"BucketAlreadyOwnedByYou", "BucketAlreadyExists"}:
                        raise
            self._bucket_ready = True

    def _call(self, key: str, fn: Callable[[], T]) -> T:
        self.ensure_bucket()
        with _translate(key):
            return fn()

    def put_bytes(self, key: str, data: bytes, content_type: str = DEFAULT_CONTENT_TYPE) -> None:
        self._call(
            key,
            lambda: self._client.put_object(
                bucket_name=self.bucket,
                object_name=key,
                data=io.BytesIO(data),
                length=len(data),
                content_type=content_type,
            ),
        )

    def get_bytes(self, key: str) -> bytes:
        def read() -> bytes:
            response = self._client.get_object(bucket_name=self.bucket, object_name=key)
            try:
                return response.read()
            finally:
                response.close()
                response.release_conn()

        return self._call(key, read)

    def exists(self, key: str) -> bool:
        try:
            self._call(key, lambda: self._client.stat_object(bucket_name=self.bucket, object_name=key))
        except ObjectNotFound:
            return False
        return True

    def put_file(self, key: str, path: Path, content_type: str = DEFAULT_CONTENT_TYPE) -> None:
        self._call(
            key,
            lambda: self._client.fput_object(
                bucket_name=self.bucket,
                object_name=key,
                file_path=str(path),
                content_type=content_type,
            ),
        )

    def get_to_file(self, key: str, path: Path) -> None:
        # minio downloads into "<path>.<etag>.part.minio" and renames: readers never see halves.
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._call(
            key,
            lambda: self._client.fget_object(bucket_name=self.bucket, object_name=key, file_path=str(path)),
        )

    def url(self, key: str) -> str:
        return self._call(
            key,
            lambda: self._client.presigned_get_object(
                bucket_name=self.bucket, object_name=key, expires=PRESIGN_EXPIRY
            ),
        )

    def delete(self, key: str) -> None:
        self._call(key, lambda: self._client.remove_object(bucket_name=self.bucket, object_name=key))


_stores: dict[tuple[object, ...], ObjectStore] = {}


def open_store(settings: Settings | None = None) -> ObjectStore:
    """The process-wide store for ``settings`` (default: the global settings)."""
    settings = settings or get_settings()
    if settings.s3_endpoint:
        ident: tuple[object, ...] = (
            "s3",
            settings.s3_endpoint,
            settings.s3_bucket,
            settings.s3_secure,
            settings.s3_region,
            settings.s3_access_key.get_secret_value() if settings.s3_access_key else "",
        )
    else:
        ident = ("local", str(settings.objects_dir))
    store = _stores.get(ident)
    if store is None:
        store = _make_store(settings)
        _stores[ident] = store
    return store


def _make_store(settings: Settings) -> ObjectStore:
    if not settings.s3_endpoint:
        return LocalObjectStore(settings.objects_dir)
    if settings.s3_access_key is None or settings.s3_secret_key is None:
        raise ValueError("INSPECT_S3_ENDPOINT is set but INSPECT_S3_ACCESS_KEY/SECRET_KEY are not")
    return S3ObjectStore(
        endpoint=settings.s3_endpoint,
        access_key=settings.s3_access_key.get_secret_value(),
        secret_key=settings.s3_secret_key.get_secret_value(),
        bucket=settings.s3_bucket,
        secure=settings.s3_secure,
        region=settings.s3_region,
    )


def _after_fork_in_child() -> None:
    # urllib3 pools hold sockets shared with the parent; a child builds its own client.
    _stores.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
