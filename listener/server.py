"""The Application Entity: accepted SOP classes and transfer syntaxes, AE-title checks, TLS, and the server."""

from __future__ import annotations

import signal
import ssl
import threading
from types import FrameType
from typing import Any

from pydicom import uid
from pynetdicom import AE, evt
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    DigitalXRayImageStorageForProcessing,
    SecondaryCaptureImageStorage,
    Verification,
)

from cxr_triage.logs import get_logger
from cxr_triage.settings import Settings
from listener.dispatch import Dispatcher, Outbox
from listener.handlers import StoreHandler, log_association, set_tcp_nodelay

log = get_logger(__name__)

STORAGE_SOP_CLASSES = (
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    DigitalXRayImageStorageForProcessing,
    SecondaryCaptureImageStorage,
)

# What real CR/DX devices and PACS send. We store bytes as received, so accepting a syntax costs nothing here;
# decoding happens in the workers.
TRANSFER_SYNTAXES = (
    uid.ExplicitVRLittleEndian,
    uid.ImplicitVRLittleEndian,
    uid.DeflatedExplicitVRLittleEndian,
    uid.JPEGBaseline8Bit,
    uid.JPEGExtended12Bit,
    uid.JPEGLossless,
    uid.JPEGLosslessSV1,
    uid.JPEGLSLossless,
    uid.JPEGLSNearLossless,
    uid.JPEG2000Lossless,
    uid.JPEG2000,
    uid.RLELossless,
)


def build_ae(settings: Settings) -> AE:
    ae = AE(ae_title=settings.ae_title)
    ae.maximum_associations = settings.max_associations
    ae.maximum_pdu_size = settings.max_pdu
    ae.require_calling_aet = list(settings.allowed_calling_aets)
    ae.require_called_aet = settings.require_called_aet
    for sop_class in STORAGE_SOP_CLASSES:
        ae.add_supported_context(sop_class, list(TRANSFER_SYNTAXES))
    ae.add_supported_context(Verification)
    return ae


def tls_context(settings: Settings) -> ssl.SSLContext | None:
    if settings.tls_cert is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(str(settings.tls_cert), str(settings.tls_key) if settings.tls_key else None)
    if settings.tls_ca is not None:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(str(settings.tls_ca))
    return context


def run(settings: Settings, *, ready: threading.Event | None = None) -> None:
    """Start the listener and its outbox; blocks until SIGTERM/SIGINT."""
    settings.effective_spool_dir.mkdir(parents=True, exist_ok=True)
    dispatcher = Dispatcher(settings)
    outbox = Outbox(dispatcher, settings.outbox_interval_s)
    ae = build_ae(settings)
    handlers: list[Any] = [
        (evt.EVT_C_STORE, StoreHandler(settings, dispatcher)),
        (evt.EVT_CONN_OPEN, set_tcp_nodelay),
        (evt.EVT_ACCEPTED, log_association),
        (evt.EVT_REJECTED, log_association),
    ]
    server: Any = ae.start_server(
        (settings.bind_address, settings.port),
        block=False,
        evt_handlers=handlers,
        ssl_context=tls_context(settings),
    )
    outbox.start()
    log.info(
        "listener.started",
        ae_title=settings.ae_title,
        address=settings.bind_address,
        port=settings.port,
        tls=settings.tls_cert is not None,
        allowed_calling_aets=list(settings.allowed_calling_aets),
        spool=str(settings.effective_spool_dir),
    )
    stop = threading.Event()

    def _on_signal(signum: int, _: FrameType | None) -> None:
        log.info("listener.stopping", signal=signum)
        stop.set()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    if ready is not None:
        ready.set()
    try:
        # The outbox runs once at start-up too: anything left `received` by a previous run is sent now.
        dispatcher.flush_outbox()
    except Exception as exc:
        log.warning("outbox.error", error=f"{type(exc).__name__}: {exc}")
    stop.wait()
    outbox.stop()
    server.shutdown()
    log.info("listener.stopped")
