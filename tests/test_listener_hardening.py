"""Issue 10, network: safe defaults for who may associate, and slots that idle, slow or TLS-stalled sockets cannot hold.

The listener runs as the real process (`python -m service listener`) against PostgreSQL and Redis; the peers are
dcmtk's echoscu and pynetdicom.
"""

from __future__ import annotations

import socket
import ssl
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from io import BytesIO
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from cxr_triage import settings as settings_module
from cxr_triage.settings import Settings
from listener.server import ListenerConfigError, check_exposure, is_loopback
from tests.conftest import DICOM_DIR, self_signed_cert, wait_until


def _echo(port: int, *, calling: str = "ECHOSCU", called: str = "CXRTRIAGE") -> bool:
    args = ["/usr/bin/echoscu", "-aet", calling, "-aec", called, "-to", "5", "-ta", "5", "-td", "5"]
    result = subprocess.run([*args, "127.0.0.1", str(port)], capture_output=True, text=True, timeout=30)
    return result.returncode == 0


def _associate(port: int, *, calling: str, called: str = "CXRTRIAGE", tls: Any = None) -> bool:
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    ae = AE(ae_title=calling)
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.network_timeout = ae.connection_timeout = 5
    assoc = ae.associate("127.0.0.1", port, ae_title=called, tls_args=tls)
    established = bool(assoc.is_established)
    if established:
        assoc.release()
    return established


# --- who may associate ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "loopback"),
    [("127.0.0.1", True), ("127.1.2.3", True), ("::1", True), ("localhost", True), ("0.0.0.0", False),
     ("", False), ("::", False), ("10.1.2.3", False), ("pacs-gw.example.org", False)],
)  # fmt: skip
def test_loopback_addresses_are_told_apart(address: str, loopback: bool) -> None:
    assert is_loopback(address) is loopback


def test_a_listener_open_to_the_network_needs_an_allowlist_tls_clients_or_an_explicit_override() -> None:
    with pytest.raises(ListenerConfigError, match="CXR_ALLOWED_CALLING_AETS"):
        check_exposure(Settings(bind_address="0.0.0.0"))
    check_exposure(Settings(bind_address="127.0.0.1"))
    check_exposure(Settings(bind_address="0.0.0.0", allowed_calling_aets="PACS1"))
    check_exposure(Settings(bind_address="0.0.0.0", tls_cert="c.pem", tls_ca="ca.pem"))
    check_exposure(Settings(bind_address="0.0.0.0", allow_any_calling_aet=True))


def test_the_listener_command_refuses_to_start_open_to_the_network(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    from service.cli import app

    monkeypatch.setenv("CXR_HOME", str(tmp_path))
    monkeypatch.setenv("CXR_BIND_ADDRESS", "0.0.0.0")
    monkeypatch.delenv("CXR_ALLOWED_CALLING_AETS", raising=False)
    settings_module.get_settings.cache_clear()
    try:
        for command in ("listener", "run"):
            result = CliRunner().invoke(app, [command])
            assert result.exit_code == 2, result.output
            assert "refusing to listen" in result.output
    finally:
        settings_module.get_settings.cache_clear()
    assert not (tmp_path / "cxr-triage.sqlite3").exists()  # refused before touching anything


def test_the_called_ae_title_is_checked_by_default_and_calling_ae_titles_match_exactly(
    pg_url, redis_url, tiny_registry, service_factory
):
    service = service_factory(
        database_url=pg_url, broker_url=redis_url, models_dir=tiny_registry.root, allowed_calling_aets="ward_3,PACS1"
    )
    service.start_listener()
    assert _associate(service.port, calling="ward_3")  # a lower-case AE title as configured
    assert _associate(service.port, calling="PACS1")
    assert not _associate(service.port, calling="WARD_3")  # AE titles are case-sensitive
    assert not _associate(service.port, calling="PACS1", called="SOMEONEELSE")


# --- slots that cannot be held ---------------------------------------------------------------------------------------


def _associate_rq_prefix() -> bytes:
    """The first bytes of an A-ASSOCIATE-RQ announcing a 200-byte body that never fully arrives."""
    return struct.pack(">BBI", 0x01, 0x00, 200) + struct.pack(">HH", 1, 0) + b"CXRTRIAGE".ljust(16) + b"DRIP".ljust(16)


@pytest.fixture
def hostile_sockets() -> Iterator[Callable[[int, int, int], None]]:
    """Open idle sockets and sockets that drip-feed an association request one byte every 0.3 s."""
    sockets: list[socket.socket] = []
    stop = threading.Event()

    def drip(sock: socket.socket) -> None:
        for byte in _associate_rq_prefix():
            if stop.wait(0.3):
                return
            try:
                sock.sendall(bytes([byte]))
            except OSError:
                return

    def open_(port: int, idle: int, dripping: int) -> None:
        for i in range(idle + dripping):
            sock = socket.create_connection(("127.0.0.1", port), timeout=5)
            sockets.append(sock)
            if i >= idle:
                threading.Thread(target=drip, args=(sock,), daemon=True).start()

    yield open_
    stop.set()
    for sock in sockets:
        sock.close()


def test_idle_and_dripping_sockets_do_not_lock_a_real_sender_out(
    pg_url, redis_url, tiny_registry, service_factory, hostile_sockets
):
    service = service_factory(
        database_url=pg_url,
        broker_url=redis_url,
        models_dir=tiny_registry.root,
        max_associations="2",
        association_deadline_s="2",
        acse_timeout_s="2",
    )
    service.start_listener()
    hostile_sockets(service.port, 2, 2)  # 2x CXR_MAX_ASSOCIATIONS connections that never associate
    time.sleep(0.5)
    # A real echoscu gets through once the deadline has closed them (on the old listener: never, while they drip).
    wait_until(lambda: _echo(service.port), 30, "echoscu to get through past idle and dripping sockets", interval=1)
    assert "association.deadline" in service.log_text()


def test_an_idle_socket_does_not_freeze_a_tls_listener(pg_url, redis_url, tiny_registry, service_factory, tmp_path):
    cert, key = self_signed_cert(tmp_path)
    service = service_factory(
        database_url=pg_url,
        broker_url=redis_url,
        models_dir=tiny_registry.root,
        tls_cert=str(cert),
        tls_key=str(key),
        association_deadline_s="3",
    )
    service.start_listener()
    idle = socket.create_connection(("127.0.0.1", service.port), timeout=5)  # connects, never says hello
    try:
        time.sleep(0.5)
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(cert))
        # On the old listener the accept thread sat in this socket's handshake: nobody else got in, ever.
        assert _associate(service.port, calling="TLSPROBE", tls=(context, "127.0.0.1"))
        assert not _associate(service.port, calling="PLAIN")  # TLS is still required
    finally:
        idle.close()
    assert _associate(service.port, calling="TLSPROBE", tls=(context, "127.0.0.1"))


# --- memory and size limits ------------------------------------------------------------------------------------------


def _chest(rows: int, columns: int, *, sop_uid: str) -> Any:
    """An uncompressed 16-bit chest CR of the given size (zeros), as a sender would build it."""
    import numpy as np
    import pydicom
    from pydicom.uid import UID, ExplicitVRLittleEndian

    ds = pydicom.dcmread(DICOM_DIR / "dx_chest_nih_cxr14_implicit_le_label-no-finding.dcm")
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = UID(sop_uid)
    ds.Rows, ds.Columns, ds.BitsAllocated, ds.BitsStored, ds.HighBit = rows, columns, 16, 12, 11
    ds.PixelRepresentation, ds.SamplesPerPixel, ds.PhotometricInterpretation = 0, 1, "MONOCHROME2"
    ds.PixelData = np.zeros((rows, columns), dtype=np.uint16).tobytes()
    buffer = BytesIO()
    ds.save_as(buffer, implicit_vr=False, little_endian=True, enforce_file_format=True)
    return pydicom.dcmread(BytesIO(buffer.getvalue()))


def _store(port: int, ds: Any, *, transfer_syntax: str | None = None) -> Any:
    """C-STORE `ds` with pynetdicom; returns the response status data set (None when the connection was cut)."""
    from pynetdicom import AE

    ae = AE(ae_title="BOMBER")
    ae.add_requested_context(ds.SOPClassUID, transfer_syntax or ds.file_meta.TransferSyntaxUID)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    assoc = ae.associate("127.0.0.1", port, ae_title="CXRTRIAGE")
    assert assoc.is_established
    try:
        return assoc.send_c_store(ds) or None
    finally:
        if assoc.is_established:
            assoc.release()


def _peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


def test_the_listener_keeps_received_data_sets_out_of_memory(pg_url, redis_url, tiny_registry, service_factory):
    service = service_factory(database_url=pg_url, broker_url=redis_url, models_dir=tiny_registry.root)
    listener = service.start_listener()
    assert _store(service.port, _chest(256, 256, sop_uid="1.2.826.0.1.3680043.10.54.1")).Status == 0
    before = _peak_rss_mb(listener.pid)
    for i in range(3):  # 3 x 72 MB data sets; the old listener held each whole in memory (and the copy it wrote)
        response = _store(service.port, _chest(6000, 6000, sop_uid=f"1.2.826.0.1.3680043.10.54.{10 + i}"))
        assert response.Status == 0
    grown = _peak_rss_mb(listener.pid) - before
    assert grown < 40, f"the listener's peak memory grew by {grown:.0f} MB for 72 MB data sets"
    spooled = list((service.home / "var" / "spool").rglob("1.2.826.0.1.3680043.10.54.1[0-2].dcm"))
    assert len(spooled) == 3 and all(p.stat().st_size > 72_000_000 for p in spooled)
    assert not list((service.home / "var" / "spool" / ".incoming").glob("*.dcm"))  # nothing left behind


def test_oversized_and_deflate_bomb_data_sets_get_a_clear_refusal(pg_url, redis_url, tiny_registry, service_factory):
    from pydicom.uid import UID, DeflatedExplicitVRLittleEndian

    service = service_factory(
        database_url=pg_url, broker_url=redis_url, models_dir=tiny_registry.root, max_dataset_bytes=str(20_000_000)
    )
    listener = service.start_listener()
    big = _chest(3000, 3000, sop_uid="1.2.826.0.1.3680043.10.54.20")  # 18 MB: under the limit
    assert _store(service.port, big).Status == 0
    before = _peak_rss_mb(listener.pid)
    over = _chest(3500, 3500, sop_uid="1.2.826.0.1.3680043.10.54.21")  # 24.5 MB: over it
    response = _store(service.port, over)
    assert response.Status == 0xA700 and "larger than 20000000" in response.ErrorComment
    # A deflate bomb: 200 MB of zeros that travel as ~200 KB.
    bomb = _chest(10000, 10000, sop_uid="1.2.826.0.1.3680043.10.54.22")
    bomb.file_meta.TransferSyntaxUID = UID(DeflatedExplicitVRLittleEndian)
    response = _store(service.port, bomb, transfer_syntax=DeflatedExplicitVRLittleEndian)
    assert response.Status == 0xA700 and "inflated data set larger than" in response.ErrorComment
    grown = _peak_rss_mb(listener.pid) - before
    assert grown < 100, f"peak memory grew by {grown:.0f} MB"  # the old listener inflated all 200 MB, then parsed it
    # A data set well past the limit is cut off while it arrives; the listener carries on.
    assert _store(service.port, _chest(7000, 7000, sop_uid="1.2.826.0.1.3680043.10.54.23")) is None
    assert "association.cut" in service.log_text()
    assert listener.poll() is None
    assert _store(service.port, _chest(256, 256, sop_uid="1.2.826.0.1.3680043.10.54.24")).Status == 0
