"""The durable spool: <spool>/<StudyInstanceUID>/<SOPInstanceUID>.dcm, via temp file + fsync + rename, or the same
name under PREFIX/instances/ in an S3-compatible object store (CXR_SPOOL_URL). `open_spool` picks one; the handler
sees only `Spool.store` and `Spool.replace`."""

from __future__ import annotations

import errno
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from cxr_triage.durable import fsync_dir, write_durably
from cxr_triage.settings import Settings
from cxr_triage.uids import require_uid
from infra import objectstore
from infra.objectstore import INSTANCES, S3Location


@dataclass(frozen=True)
class SpooledFile:
    path: Path | S3Location
    sha256: str
    size_bytes: int
    already_present: bool  # an identical or earlier copy of this SOP instance was already on disk
    received_sha256: str = ""  # what arrived (differs from sha256 when the copy on disk holds other content)

    @property
    def conflict(self) -> bool:
        """The instance on disk holds different content than what arrived under the same SOP Instance UID."""
        return self.already_present and bool(self.received_sha256) and self.received_sha256 != self.sha256

    @property
    def ref(self) -> str:
        """What the database keeps: the absolute file path or the s3:// URL."""
        return self.path.url if isinstance(self.path, S3Location) else str(self.path.resolve())


def spool_path(spool_dir: Path, *, study_instance_uid: str, sop_instance_uid: str) -> Path:
    """The file for an instance; both UIDs are validated, so no path outside the spool can be built."""
    study = require_uid(study_instance_uid, name="StudyInstanceUID")
    sop = require_uid(sop_instance_uid, name="SOPInstanceUID")
    return spool_dir / study / f"{sop}.dcm"


def write_instance(spool_dir: Path, *, study_instance_uid: str, sop_instance_uid: str, data: bytes) -> SpooledFile:
    """Write `data` durably. A resend of an instance already on disk keeps the first copy (idempotent)."""
    target = spool_path(spool_dir, study_instance_uid=study_instance_uid, sop_instance_uid=sop_instance_uid)
    digest = hashlib.sha256(data).hexdigest()
    if target.exists():
        with target.open("rb") as fh:
            existing = hashlib.file_digest(fh, "sha256").hexdigest()
        return SpooledFile(target, existing, target.stat().st_size, already_present=True, received_sha256=digest)
    write_durably(target, data)
    return SpooledFile(target, digest, len(data), already_present=False)


def _sha256_file(path: Path) -> str:
    with path.open("rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def adopt_file(spool_dir: Path, *, study_instance_uid: str, sop_instance_uid: str, source: Path) -> SpooledFile:
    """Make the received file `source` the spooled instance, durably, without reading it into memory.

    `source` is pynetdicom's temporary file of the data set (under the spool, see listener/server.py): it is fsynced
    and hard-linked into place, which creates the target only if it does not exist yet, so two concurrent sends of the
    same instance cannot leave a file that differs from the one recorded. `source` itself is left for pynetdicom to
    remove. On another filesystem the bytes are copied durably instead.
    """
    target = spool_path(spool_dir, study_instance_uid=study_instance_uid, sop_instance_uid=sop_instance_uid)
    digest = _sha256_file(source)
    size = source.stat().st_size
    fd = os.open(source, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)
    except FileExistsError:
        return SpooledFile(target, _sha256_file(target), target.stat().st_size, True, received_sha256=digest)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        if target.exists():
            return SpooledFile(target, _sha256_file(target), target.stat().st_size, True, received_sha256=digest)
        write_durably(target, source.read_bytes())
        return SpooledFile(target, digest, size, already_present=False)
    fsync_dir(target.parent)
    return SpooledFile(target, digest, size, already_present=False)


def replace_instance(target: Path, *, source: Path | None = None, data: bytes | None = None) -> SpooledFile:
    """Replace the spooled file `target` with new content (a received file or bytes), atomically and durably."""
    if source is not None:
        temp = target.with_name(f".replace.{os.getpid()}.{target.name}")
        temp.unlink(missing_ok=True)
        os.link(source, temp)
        os.replace(temp, target)
        fsync_dir(target.parent)
    else:
        assert data is not None
        write_durably(target, data)
    digest = _sha256_file(target)
    return SpooledFile(target, digest, target.stat().st_size, already_present=False, received_sha256=digest)


class Spool(Protocol):
    def store(
        self, *, study_instance_uid: str, sop_instance_uid: str, source: Path | None, data: bytes | None
    ) -> SpooledFile:
        """Make the received instance (pynetdicom's file `source`, or `data`) durable unless the SOP instance is
        already stored; then describe the stored one (already_present, and its content's sha256)."""
        ...

    def replace(self, spooled: SpooledFile, *, source: Path | None, data: bytes | None) -> SpooledFile:
        """Replace a stored instance's content, atomically and durably (duplicate policy `replace`)."""
        ...


@dataclass(frozen=True)
class FileSpool:
    root: Path

    def store(
        self, *, study_instance_uid: str, sop_instance_uid: str, source: Path | None, data: bytes | None
    ) -> SpooledFile:
        uids = {"study_instance_uid": study_instance_uid, "sop_instance_uid": sop_instance_uid}
        if source is not None:
            return adopt_file(self.root, source=source, **uids)
        return write_instance(self.root, data=data or b"", **uids)

    def replace(self, spooled: SpooledFile, *, source: Path | None, data: bytes | None) -> SpooledFile:
        assert isinstance(spooled.path, Path)
        return replace_instance(spooled.path, source=source, data=data)


@dataclass(frozen=True)
class ObjectSpool:
    """The spool in an S3-compatible store: a PUT that the store acknowledged is durable (S3's contract), and a
    conditional PUT (If-None-Match) makes the first content under a SOP Instance UID win, as the hard link does on disk.
    """

    settings: Settings
    location: S3Location

    def _location(self, study_instance_uid: str, sop_instance_uid: str) -> S3Location:
        study = require_uid(study_instance_uid, name="StudyInstanceUID")
        sop = require_uid(sop_instance_uid, name="SOPInstanceUID")
        return self.location.child(study, f"{sop}.dcm")

    @staticmethod
    def _body(source: Path | None, data: bytes | None) -> tuple[bytes | Path, str]:
        if source is not None:
            return source, _sha256_file(source)
        body = data or b""
        return body, hashlib.sha256(body).hexdigest()

    def store(
        self, *, study_instance_uid: str, sop_instance_uid: str, source: Path | None, data: bytes | None
    ) -> SpooledFile:
        location = self._location(study_instance_uid, sop_instance_uid)
        body, digest = self._body(source, data)
        stored = objectstore.put_new(self.settings, location, body, digest)
        if stored.created:
            return SpooledFile(location, digest, stored.size_bytes, already_present=False)
        return SpooledFile(location, stored.sha256, stored.size_bytes, already_present=True, received_sha256=digest)

    def replace(self, spooled: SpooledFile, *, source: Path | None, data: bytes | None) -> SpooledFile:
        assert isinstance(spooled.path, S3Location)
        body, digest = self._body(source, data)
        stored = objectstore.put(self.settings, spooled.path, body, digest)
        return SpooledFile(spooled.path, digest, stored.size_bytes, already_present=False, received_sha256=digest)


def open_spool(settings: Settings) -> Spool:
    location = objectstore.store_location(settings, INSTANCES)
    if location is not None:
        return ObjectSpool(settings, location)
    return FileSpool(settings.effective_spool_dir)
