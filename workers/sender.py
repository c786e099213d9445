"""Send result objects back to the PACS: a C-STORE SCU (optionally over TLS) that reports the DIMSE status."""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import BinaryIO

import pydicom
from pynetdicom import AE

from cxr_triage.routes import Route
from cxr_triage.settings import Settings
from workers.interfaces import DeliveryError, Sent


@dataclass(frozen=True)
class Destination(Route):
    """A C-STORE destination: a route (AE@host:port, TLS or not; checked and written by cxr_triage/routes.py) and the
    CA bundle that verifies its certificate."""

    tls_ca: Path | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> Destination | None:
        if not settings.results_destination_aet:
            return None
        return cls(
            ae_title=settings.results_destination_aet,
            host=settings.results_destination_host,
            port=settings.results_destination_port,
            tls=settings.results_destination_tls,
            tls_ca=settings.results_tls_ca,
        )


class SendError(DeliveryError):
    """The destination could not be reached or refused the object (the message says which); always retried."""

    def __init__(self, message: str, *, dimse_status: int | None = None) -> None:
        answer = f"0x{dimse_status:04X}" if dimse_status is not None else None
        super().__init__(message, answer=answer, dimse_status=dimse_status)


@dataclass(frozen=True)
class DicomSender:
    """The PACS as a sender of workers/delivery.py: C-STORE with our AE title as the calling AE."""

    destination: Destination
    calling_aet: str

    def __str__(self) -> str:
        return str(self.destination)

    @classmethod
    def from_settings(cls, settings: Settings) -> DicomSender | None:
        destination = Destination.from_settings(settings)
        return cls(destination, settings.ae_title) if destination is not None else None

    @classmethod
    def to(cls, settings: Settings, route: Route) -> DicomSender:
        """C-STORE to `route` (an instance's results destination), verified with CXR_RESULTS_TLS_CA."""
        destination = Destination(route.ae_title, route.host, route.port, tls=route.tls, tls_ca=settings.results_tls_ca)
        return cls(destination, settings.ae_title)

    def send(self, payload: bytes) -> Sent:
        status = c_store(self.destination, BytesIO(payload), calling_aet=self.calling_aet)
        return Sent(f"0x{status:04X}", dimse_status=status)


def c_store(destination: Destination, path: Path | BinaryIO, *, calling_aet: str, timeout_s: float = 30.0) -> int:
    """Send one DICOM file (a path or file-like object); returns the DIMSE status (0x0000) or raises SendError."""
    ds = pydicom.dcmread(path)
    ae = AE(ae_title=calling_aet)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout_s
    ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    tls_args = None
    if destination.tls:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(destination.tls_ca or "") or None)
        tls_args = (context, destination.host)
    try:
        assoc = ae.associate(destination.host, destination.port, ae_title=destination.ae_title, tls_args=tls_args)
    except OSError as exc:
        raise SendError(f"cannot connect to {destination}: {exc}") from exc
    if not assoc.is_established:
        raise SendError(f"association with {destination} not established (rejected, aborted or unreachable)")
    try:
        status = assoc.send_c_store(ds)
    finally:
        assoc.release()
    if not status:
        raise SendError(f"no C-STORE response from {destination} (timeout or abort)")
    code = int(status.Status)
    if code != 0x0000 and not 0xB000 <= code <= 0xBFFF:  # B0xx: warnings, the object was stored
        raise SendError(f"{destination} answered 0x{code:04X}", dimse_status=code)
    return code
