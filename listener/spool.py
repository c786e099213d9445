"""The durable spool: <spool>/<StudyInstanceUID>/<SOPInstanceUID>.dcm, via temp file + fsync + rename."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from cxr_triage.durable import write_durably
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


def write_instance(spool_dir: Path, *, study_instance_uid: str, sop_instance_uid: str, data: bytes) -> SpooledFile:
    """Write `data` durably. A resend of an instance already on disk keeps the first copy (idempotent)."""
    target = spool_path(spool_dir, study_instance_uid=study_instance_uid, sop_instance_uid=sop_instance_uid)
    digest = hashlib.sha256(data).hexdigest()
    if target.exists():
        with target.open("rb") as fh:
            existing = hashlib.file_digest(fh, "sha256").hexdigest()
        return SpooledFile(target, existing, target.stat().st_size, already_present=True)
    write_durably(target, data)
    return SpooledFile(target, digest, len(data), already_present=False)
