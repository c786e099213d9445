"""Where instances and result objects are kept: the filesystem, or an S3-compatible object store (CXR_SPOOL_URL).

A stored object is named by its *ref*, the string the database keeps (`instances.path`, `result_objects.path`): an
absolute file path, or `s3://BUCKET/KEY`. Readers (workers, delivery, the API, retention) go through `read_object`,
`open_object` and `delete_object`, so they work the same on both. Writers that need create-only semantics (the
listener's spool: a SOP Instance UID is stored once, whatever arrives later) use `put_new`, an S3 conditional write
(`If-None-Match: *`), which is atomic on AWS S3 and MinIO: of two concurrent sends, one creates the object and the
other is told that it exists. Every PUT carries the SHA-256 of its body (x-amz-checksum-sha256), which AWS S3 and
MinIO verify (moto, the test server, does not).
"""

from __future__ import annotations

import base64
import threading
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any

from cxr_triage.settings import Settings

S3Client = Any  # boto3's client class is generated at run time

S3_SCHEME = "s3://"
INSTANCES = "instances"
RESULTS = "results"


class ObjectStoreError(OSError):
    """The object store could not be reached or refused a request (a transient failure for the listener: 0xA700)."""


@dataclass(frozen=True)
class S3Location:
    bucket: str
    key: str  # a key, or a prefix without a trailing slash ("" = the bucket's root)

    @classmethod
    def parse(cls, url: str) -> S3Location:
        if not url.startswith(S3_SCHEME):
            raise ValueError(f"not an s3:// URL: {url!r}")
        bucket, _, key = url[len(S3_SCHEME) :].partition("/")
        if not bucket:
            raise ValueError(f"no bucket in {url!r}")
        return cls(bucket, key.strip("/"))

    @property
    def url(self) -> str:
        return f"{S3_SCHEME}{self.bucket}/{self.key}"

    def child(self, *parts: str) -> S3Location:
        return S3Location(self.bucket, "/".join(p for p in (self.key, *parts) if p))


@dataclass(frozen=True)
class Stored:
    ref: str
    sha256: str
    size_bytes: int
    created: bool  # False: an object already had this name (put_new), and sha256/size are the existing object's


def is_s3(ref: str) -> bool:
    return ref.startswith(S3_SCHEME)


def store_location(settings: Settings, area: str) -> S3Location | None:
    """The prefix of `area` (INSTANCES or RESULTS) in the configured object store, or None for the filesystem."""
    if not settings.spool_url:
        return None
    return S3Location.parse(settings.spool_url).child(area)


_clients: dict[str, S3Client] = {}
_clients_lock = threading.Lock()


def s3_client(settings: Settings) -> S3Client:
    """One boto3 client per endpoint and process (boto3 clients are thread-safe; creating one costs ~50 ms)."""
    endpoint = settings.s3_endpoint_url or ""
    with _clients_lock:
        client = _clients.get(endpoint)
        if client is None:
            import boto3
            from botocore.config import Config

            config = Config(
                connect_timeout=5,
                read_timeout=60,
                retries={"max_attempts": 4, "mode": "standard"},
                max_pool_connections=32,
                # Compute checksums only where an operation requires one; our PUTs send their own SHA-256.
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
            )
            client = boto3.client("s3", endpoint_url=endpoint or None, config=config)
            _clients[endpoint] = client
        return client


def _checksum(sha256_hex: str) -> str:
    return base64.b64encode(bytes.fromhex(sha256_hex)).decode()


def _error_code(exc: Exception) -> str:
    response: dict[str, Any] = getattr(exc, "response", {}) or {}
    return str(response.get("Error", {}).get("Code", ""))


def _put(
    settings: Settings, location: S3Location, body: bytes | Path, sha256: str, *, create_only: bool
) -> Stored | None:
    from botocore.exceptions import BotoCoreError, ClientError

    extra: dict[str, Any] = {"IfNoneMatch": "*"} if create_only else {}
    try:
        if isinstance(body, Path):
            size = body.stat().st_size
            with body.open("rb") as fh:
                s3_client(settings).put_object(
                    Bucket=location.bucket,
                    Key=location.key,
                    Body=fh,
                    ContentLength=size,
                    ChecksumSHA256=_checksum(sha256),
                    Metadata={"sha256": sha256},
                    ContentType="application/dicom",
                    **extra,
                )
        else:
            size = len(body)
            s3_client(settings).put_object(
                Bucket=location.bucket,
                Key=location.key,
                Body=body,
                ChecksumSHA256=_checksum(sha256),
                Metadata={"sha256": sha256},
                ContentType="application/dicom",
                **extra,
            )
    except ClientError as exc:
        if create_only and _error_code(exc) in ("PreconditionFailed", "412", "ConditionalRequestConflict"):
            return None
        raise ObjectStoreError(f"{location.url}: {_error_code(exc) or exc}") from exc
    except BotoCoreError as exc:
        raise ObjectStoreError(f"{location.url}: {exc}") from exc
    return Stored(location.url, sha256, size, created=True)


def head(settings: Settings, location: S3Location) -> Stored | None:
    """The stored object's SHA-256 (from its metadata) and size, or None if there is no such object."""
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        meta = s3_client(settings).head_object(Bucket=location.bucket, Key=location.key)
    except ClientError as exc:
        if _error_code(exc) in ("404", "NoSuchKey", "NotFound"):
            return None
        raise ObjectStoreError(f"{location.url}: {_error_code(exc) or exc}") from exc
    except BotoCoreError as exc:
        raise ObjectStoreError(f"{location.url}: {exc}") from exc
    return Stored(location.url, meta.get("Metadata", {}).get("sha256", ""), int(meta["ContentLength"]), created=False)


def put_new(settings: Settings, location: S3Location, body: bytes | Path, sha256: str) -> Stored:
    """Create the object unless one exists under that key; then describe the existing one (created=False)."""
    for _ in range(3):
        stored = _put(settings, location, body, sha256, create_only=True)
        if stored is not None:
            return stored
        existing = head(settings, location)
        if existing is not None:
            return existing
        # Deleted between the refused PUT and the HEAD (retention): try again.
    raise ObjectStoreError(f"{location.url}: object appears and disappears")


def put(settings: Settings, location: S3Location, body: bytes | Path, sha256: str) -> Stored:
    """Create or replace the object (atomic for readers: they get the old or the new object, never a mix)."""
    stored = _put(settings, location, body, sha256, create_only=False)
    assert stored is not None
    return stored


def read_object(settings: Settings, ref: str) -> bytes:
    """The bytes of a stored object; FileNotFoundError if it is gone, ObjectStoreError if the store fails."""
    if not is_s3(ref):
        return Path(ref).read_bytes()
    from botocore.exceptions import BotoCoreError, ClientError

    location = S3Location.parse(ref)
    try:
        response = s3_client(settings).get_object(Bucket=location.bucket, Key=location.key)
        data: bytes = response["Body"].read()
    except ClientError as exc:
        if _error_code(exc) in ("404", "NoSuchKey", "NotFound"):
            raise FileNotFoundError(ref) from exc
        raise ObjectStoreError(f"{ref}: {_error_code(exc) or exc}") from exc
    except BotoCoreError as exc:
        raise ObjectStoreError(f"{ref}: {exc}") from exc
    return data


def open_object(settings: Settings, ref: str) -> Path | BytesIO:
    """Something pydicom.dcmread reads: the file itself, or the object's bytes in memory."""
    return BytesIO(read_object(settings, ref)) if is_s3(ref) else Path(ref)


def delete_object(settings: Settings, ref: str) -> int:
    """Remove a stored object if it is there; returns the bytes freed (0 if it was gone)."""
    if not is_s3(ref):
        path = Path(ref)
        try:
            size = path.stat().st_size
            path.unlink()
        except FileNotFoundError:
            return 0
        return size
    location = S3Location.parse(ref)
    existing = head(settings, location)
    if existing is None:
        return 0
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        s3_client(settings).delete_object(Bucket=location.bucket, Key=location.key)
    except (ClientError, BotoCoreError) as exc:
        raise ObjectStoreError(f"{ref}: {exc}") from exc
    return existing.size_bytes


def check_bucket(settings: Settings) -> str:
    """Write, read back and delete a probe object in the configured store; the detail for health checks.

    Raises ObjectStoreError when any step fails.
    """
    location = store_location(settings, ".health")
    assert location is not None, "no object store configured"
    import hashlib

    body = b"ok"
    put(settings, location, body, hashlib.sha256(body).hexdigest())
    if read_object(settings, location.url) != body:
        raise ObjectStoreError(f"{location.url}: read back other content")
    delete_object(settings, location.url)
    return f"{settings.spool_url} writable" + (f" at {settings.s3_endpoint_url}" if settings.s3_endpoint_url else "")
