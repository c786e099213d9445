"""The Application Entity: accepted SOP classes and transfer syntaxes, AE-title checks, TLS, and the server."""

from __future__ import annotations

import ipaddress
import signal
import socket
import ssl
import tempfile
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Any

from pynetdicom import AE, _config, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import AssociationSocket, RequestHandler, ThreadedAssociationServer

from cxr_triage.logs import get_logger
from cxr_triage.settings import Settings
from listener.accept import STORAGE_SOP_CLASSES, TRANSFER_SYNTAXES
from listener.dispatch import Dispatcher, Outbox
from listener.handlers import ReceiveLimit, StoreHandler, cut_connection, log_association, set_tcp_nodelay

log = get_logger(__name__)


class ListenerConfigError(Exception):
    """The listener's settings are unsafe or inconsistent; the message says which setting to change."""


def is_loopback(address: str) -> bool:
    """True for an address only this host can reach (127.0.0.0/8, ::1, localhost)."""
    if address.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(address.strip()).is_loopback
    except ValueError:  # a host name, "" or "0.0.0.0"-like wildcard spelled otherwise: reachable from outside
        return False


def check_exposure(settings: Settings) -> None:
    """Refuse to listen beyond this host when nothing decides who may associate.

    A non-loopback bind needs an allowlist of calling AE titles, or TLS with client certificates (tls_ca), or the
    explicit override allow_any_calling_aet.
    """
    if is_loopback(settings.bind_address):
        return
    if settings.allowed_calling_aets or settings.tls_ca is not None or settings.allow_any_calling_aet:
        return
    raise ListenerConfigError(
        f"refusing to listen on {settings.bind_address or '(all addresses)'}:{settings.port} with no allowlist: set "
        "CXR_ALLOWED_CALLING_AETS (the senders' AE titles), or TLS client certificates (CXR_TLS_CA), or bind "
        "127.0.0.1; CXR_ALLOW_ANY_CALLING_AET=true accepts any sender that can reach the port"
    )


class Server(ThreadedAssociationServer):
    """pynetdicom's server, with the TLS handshake moved off the accept thread.

    pynetdicom wraps each accepted socket with a blocking server-side handshake in the thread that accepts: one
    client that connects and sends nothing would stop every other connection. Here the handshake happens in the
    association's own thread, on its first read, where the association deadline (AssociationWatchdog) bounds it.
    """

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        assert self.socket is not None
        client_socket, address = self.socket.accept()
        if self.ssl_context:
            client_socket = self.ssl_context.wrap_socket(client_socket, server_side=True, do_handshake_on_connect=False)
        return client_socket, address


# An A-ASSOCIATE-RQ may be larger than a small maximum PDU (many presentation contexts); nothing legitimate is larger.
MIN_PDU_READ = 64 * 1024


class BoundedAssociationSocket(AssociationSocket):
    """pynetdicom reads a whole PDU into memory, however long the peer's length field says it is (up to 4 GiB).

    A PDU larger than the maximum we advertised breaks PS3.8 9.3.1; it ends the connection instead of being read.
    """

    max_read: int = MIN_PDU_READ

    def recv(self, nr_bytes: int) -> bytearray:
        if nr_bytes > self.max_read:
            log.warning("association.cut", reason="PDU larger than our maximum", bytes=nr_bytes, limit=self.max_read)
            raise OSError(f"PDU of {nr_bytes} bytes exceeds the maximum of {self.max_read}")
        return super().recv(nr_bytes)


class BoundedRequestHandler(RequestHandler):
    """Gives each accepted association a BoundedAssociationSocket."""

    def _create_association(self) -> Any:
        assoc = super()._create_association()
        sock: Any = assoc.dul.socket
        sock.__class__ = BoundedAssociationSocket
        sock.max_read = max(self.ae.maximum_pdu_size, MIN_PDU_READ) + 1024  # PDV item headers
        return assoc


class AssociationWatchdog(threading.Thread):
    """Closes connections that have not completed association negotiation within `deadline_s`.

    pynetdicom counts a connection against maximum_associations from the moment it is accepted, and a client that
    drip-feeds its A-ASSOCIATE-RQ keeps its reader waiting for the rest of the PDU: without a deadline, a few idle or
    slow sockets would lock every real sender out.
    """

    def __init__(self, server: Any, deadline_s: float, *, interval_s: float = 0.5) -> None:
        super().__init__(name="association-watchdog", daemon=True)
        self.server = server
        self.deadline_s = deadline_s
        self.interval_s = interval_s
        self.stopped = threading.Event()
        self._first_seen: dict[int, float] = {}

    def run(self) -> None:
        while not self.stopped.wait(self.interval_s):
            try:
                self.sweep()
            except Exception as exc:  # never let the watchdog die
                log.warning("watchdog.error", error=f"{type(exc).__name__}: {exc}")

    def sweep(self) -> int:
        """Close every connection past the deadline that is not established; returns how many."""
        now = time.monotonic()
        alive: dict[int, float] = {}
        closed = 0
        for assoc in list(self.server.active_associations):
            key = id(assoc)
            first = self._first_seen.get(key, now)
            alive[key] = first
            if assoc.is_established or now - first < self.deadline_s:
                continue
            if not cut_connection(assoc):
                continue
            closed += 1
            peer = getattr(assoc.requestor, "address", None)
            log.warning("association.deadline", peer=peer, seconds=round(now - first, 1))
        self._first_seen = alive
        return closed

    def stop(self) -> None:
        self.stopped.set()


def build_ae(settings: Settings) -> AE:
    ae = AE(ae_title=settings.ae_title)
    ae.acse_timeout = settings.acse_timeout_s
    ae.dimse_timeout = settings.dimse_timeout_s
    ae.network_timeout = settings.network_timeout_s
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


INCOMING_DIR = ".incoming"


def receive_to_disk(settings: Settings) -> Path:
    """Have pynetdicom write each C-STORE data set to a file as it arrives, not to memory, in the spool's filesystem.

    The listener's memory then stays flat whatever the senders send (CXR_MAX_DATASET_BYTES bounds the disk), and a
    received file becomes the spooled instance by a hard link (listener/spool.py `adopt_file`), not a copy.
    """
    incoming = settings.effective_spool_dir / INCOMING_DIR
    incoming.mkdir(parents=True, exist_ok=True)
    for stale in incoming.glob("*.dcm"):  # left by a previous run that died mid-association
        stale.unlink(missing_ok=True)
    _config.STORE_RECV_CHUNKED_DATASET = True
    tempfile.tempdir = str(incoming)  # pynetdicom creates its file with NamedTemporaryFile()
    return incoming


def start_server(ae: AE, settings: Settings, handlers: list[Any]) -> Any:
    """Like `AE.start_server(block=False)`, with our Server class (TLS handshake off the accept thread)."""
    server: Any = ae.make_server(
        (settings.bind_address, settings.port),
        evt_handlers=handlers,
        ssl_context=tls_context(settings),
        server_class=Server,
        request_handler=BoundedRequestHandler,
    )
    thread = threading.Thread(target=server.serve_forever, name="dicom-acceptor", daemon=True)
    thread.start()
    ae._servers.append(server)
    return server


def run(settings: Settings, *, ready: threading.Event | None = None) -> None:
    """Start the listener and its outbox; blocks until SIGTERM/SIGINT. Raises ListenerConfigError on unsafe settings."""
    check_exposure(settings)
    settings.effective_spool_dir.mkdir(parents=True, exist_ok=True)
    receive_to_disk(settings)
    dispatcher = Dispatcher(settings)
    outbox = Outbox(dispatcher, settings.outbox_interval_s)
    ae = build_ae(settings)
    handlers: list[Any] = [
        (evt.EVT_C_STORE, StoreHandler(settings, dispatcher)),
        (evt.EVT_DATA_RECV, ReceiveLimit(settings)),
        (evt.EVT_CONN_OPEN, set_tcp_nodelay),
        (evt.EVT_ACCEPTED, log_association),
        (evt.EVT_REJECTED, log_association),
    ]
    server = start_server(ae, settings, handlers)
    watchdog = AssociationWatchdog(server, settings.association_deadline_s)
    watchdog.start()
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
    watchdog.stop()
    outbox.stop()
    server.shutdown()
    log.info("listener.stopped")
