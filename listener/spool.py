"""The durable spool: <spool>/<StudyInstanceUID>/<SOPInstanceUID>.dcm, via temp file + fsync + rename."""

from __future__ import annotations

import errno
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from cxr_triage.durable import fsync_dir, write_durably
from cxr_triage.uids import require_uid


@dataclass(frozen=True)
class SpooledFile:
    path: Path
    sha256: str
    size_bytes: int
    already_present: bool  # an identical or earlier copy of this SOP instance was already on disk
    received_sha256: str = ""  # what arrived (differs from sha256 when the copy on disk holds other content)

    @property
    def conflict(self) -> bool:
        """The instance on disk holds different content than what arrived under the same SOP Instance UID."""
        return self.already_present and bool(self.received_sha256) and self.received_sha256 != self.sha256


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
