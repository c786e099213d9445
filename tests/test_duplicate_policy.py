"""Issue 10, data integrity: the same SOP Instance UID with different content is never silently dropped.

Real listener and worker (PostgreSQL, Redis, dcmtk storescu); one test per policy, and concurrent conflicting sends.
"""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import select

from db.models import Instance, InstanceEvent, InstanceStatus, Prediction
from db.session import session_scope
from tests.conftest import DICOM_DIR, STORESCU_CFG, wait_until

SOURCE = DICOM_DIR / "cr_chest_siim_jpeg_baseline_8bit.dcm"


def _variant(tmp_path: Path, comment: str) -> Path:
    """The same instance (same SOP Instance UID) with different content, as a corrected re-send would be."""
    ds = pydicom.dcmread(SOURCE)
    ds.ImageComments = comment
    out = tmp_path / f"{hashlib.sha1(comment.encode()).hexdigest()[:8]}.dcm"
    ds.save_as(out)
    return out


def _row(url: str) -> Instance:
    with session_scope(url) as session:
        row = session.scalars(select(Instance)).one()
        session.expunge(row)
        return row


def _history(url: str) -> list[str]:
    with session_scope(url) as session:
        return [e.reason or "" for e in session.scalars(select(InstanceEvent).order_by(InstanceEvent.id))]


def _file_sha(row: Instance) -> str:
    return hashlib.sha256(Path(row.path).read_bytes()).hexdigest()


def _done(url: str, predictions: int) -> bool:
    with session_scope(url) as session:
        status = session.scalars(select(Instance.status)).one_or_none()
        count = len(session.scalars(select(Prediction)).all())
    return status == InstanceStatus.DONE and count == predictions


@pytest.fixture
def running(pg_url, redis_url, tiny_registry, service_factory):
    def start(policy: str):
        service = service_factory(
            database_url=pg_url, broker_url=redis_url, models_dir=tiny_registry.root, duplicate_policy=policy
        )
        service.start_listener()
        service.start_worker()
        return service

    return start


def test_replace_stores_the_corrected_content_and_triages_it_again(running, pg_url, tmp_path):
    service = running("replace")
    assert service.storescu(SOURCE).returncode == 0
    wait_until(lambda: _done(pg_url, 1), 120, "the first triage")
    corrected = _variant(tmp_path, "corrected by the technologist")
    result = service.storescu(corrected)
    assert result.returncode == 0 and "Store Failed" not in result.stderr
    wait_until(lambda: _done(pg_url, 2), 120, "the triage of the corrected content")
    row = _row(pg_url)
    assert _file_sha(row) == row.sha256  # the file on disk is the one recorded
    assert pydicom.dcmread(row.path).ImageComments == "corrected by the technologist"
    assert any("different content received" in r and "replace" in r for r in _history(pg_url))
    with session_scope(pg_url) as session:
        predictions = session.scalars(select(Prediction).order_by(Prediction.id)).all()
        assert [p.superseded_at is not None for p in predictions] == [True, False]


def test_keep_first_keeps_the_stored_content_and_records_the_conflict(running, pg_url, tmp_path):
    service = running("keep-first")
    assert service.storescu(SOURCE).returncode == 0
    wait_until(lambda: _done(pg_url, 1), 120, "the first triage")
    before = _row(pg_url)
    result = service.storescu(_variant(tmp_path, "a different object"))
    assert result.returncode == 0 and "Store Failed" not in result.stderr  # Success: the sender may move on
    row = _row(pg_url)
    assert row.sha256 == before.sha256 == _file_sha(row)
    assert "ImageComments" not in pydicom.dcmread(row.path)
    assert row.status_reason is not None and "different content received" in row.status_reason  # cxr-triage status
    assert any("keep-first" in r for r in _history(pg_url))


def test_reject_answers_a_failure_with_the_reason(running, pg_url, tmp_path):
    service = running("reject")
    assert service.storescu(SOURCE).returncode == 0
    result = service.storescu(_variant(tmp_path, "a different object"), extra=("-v",))
    assert "Error: CannotUnderstand" in result.stderr or "0xc000" in result.stderr.lower(), result.stderr
    row = _row(pg_url)
    assert row.sha256 == _file_sha(row)
    assert "ImageComments" not in pydicom.dcmread(row.path)
    assert any("reject" in r for r in _history(pg_url))


def test_concurrent_different_sends_leave_the_file_matching_the_database(running, pg_url, tmp_path):
    service = running("keep-first")
    variants = [_variant(tmp_path, f"variant {i}") for i in range(6)]
    base = ["/usr/bin/storescu", "-aet", "STORESCU", "-aec", "CXRTRIAGE", "-xf", str(STORESCU_CFG), "CXR",
            "127.0.0.1", str(service.port)]  # fmt: skip
    procs = [subprocess.Popen([*base, str(v)], stderr=subprocess.PIPE, text=True) for v in variants]
    outcomes = [(proc.wait(timeout=60), proc.stderr.read() if proc.stderr else "") for proc in procs]
    assert all(code == 0 and "Store Failed" not in err for code, err in outcomes), outcomes
    row = _row(pg_url)
    assert _file_sha(row) == row.sha256, "the spooled file differs from the recorded sha256"
    assert sum("different content received" in r for r in _history(pg_url)) == len(variants) - 1
