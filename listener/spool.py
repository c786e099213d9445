"""The durable spool: <spool>/<StudyInstanceUID>/<SOPInstanceUID>.dcm, via temp file + fsync + rename."""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from cxr_triage.uids import require_uid


@dataclass(frozen=True)
class SpooledFile:
    path: Path
    sha256: str
    size_bytes: int
    already_present: bool  # an identical or earlier copy of this SOP instance was already on disk


def spool_path(spool_dir: Path, *, study_instance_uid: str, sop_instance_uid: str) -> Path:
    """The file for an instance; both UIDs are validated, so no path outside the spool can be built."""
    study = require_uid(study_instance_uid, name="StudyInstanceUID")
    sop = require_uid(sop_instance_uid, name="SOPInstanceUID")
    return spool_dir / study / f"{sop}.dcm"


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_instance(spool_dir: Path, *, study_instance_uid: str, sop_instance_uid: str, data: bytes) -> SpooledFile:
    """Write `data` durably. A resend of an instance already on disk keeps the first copy (idempotent)."""
    target = spool_path(spool_dir, study_instance_uid=study_instance_uid, sop_instance_uid=sop_instance_uid)
    digest = hashlib.sha256(data).hexdigest()
    if target.exists():
        with target.open("rb") as fh:
            existing = hashlib.file_digest(fh, "sha256").hexdigest()
        return SpooledFile(target, existing, target.stat().st_size, already_present=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=".incoming.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp_name, target)
        _fsync_dir(target.parent)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return SpooledFile(target, digest, len(data), already_present=False)
