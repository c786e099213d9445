"""Results to their sender: which PACS (or VNA) an instance's DICOM results go to, by the calling AE title that sent it.

A destination is written `AE@host:port`, with ` (TLS)` (or `+tls` in the setting) for DICOM over TLS. The listener
decides an instance's destination once, when it queues it (`listener/dispatch.py`), and stores it on the instance;
the worker copies it onto each DICOM result object and delivery sends there. CXR_RESULTS_ROUTES maps calling AE titles
to destinations; every other sender's results go to the default (CXR_RESULTS_DESTINATION_*), or are only kept when
that is empty.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

from cxr_triage.settings import Settings

_SPEC = re.compile(r"^(?P<ae>[^@\\]{1,16})@(?P<host>[A-Za-z0-9.\-\[\]:]+):(?P<port>\d{1,5})(?P<tls> \(TLS\)|\+tls)?$")


@dataclass(frozen=True)
class Route:
    ae_title: str
    host: str
    port: int
    tls: bool = False

    def __post_init__(self) -> None:
        if not 0 < len(self.ae_title.strip()) <= 16 or "\\" in self.ae_title:
            raise ValueError(f"destination AE title must be 1-16 characters without backslash, got {self.ae_title!r}")
        if not 0 < self.port < 65536:
            raise ValueError(f"invalid destination port {self.port}")

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}{' (TLS)' if self.tls else ''}"

    @classmethod
    def parse(cls, spec: str) -> Route:
        """`AE@host:port`, optionally followed by ` (TLS)` or `+tls`."""
        match = _SPEC.match(spec.strip())
        if match is None:
            raise ValueError(f"not a destination (AE@host:port[+tls]): {spec!r}")
        return cls(match["ae"], match["host"], int(match["port"]), tls=bool(match["tls"]))


def parse_routes(entries: list[str]) -> dict[str, Route]:
    """`CALLING_AET=AE@host:port[+tls]` entries -> {calling AE title: route}; calling AE titles compared exactly."""
    return dict(_parse_routes(tuple(entries)))


@lru_cache(maxsize=16)
def _parse_routes(entries: tuple[str, ...]) -> dict[str, Route]:  # once per configuration, not per instance
    routes: dict[str, Route] = {}
    for entry in entries:
        calling, sep, spec = entry.partition("=")
        if not sep or not calling.strip():
            raise ValueError(f"a route is CALLING_AET=AE@host:port[+tls], got {entry!r}")
        if calling.strip() in routes:
            raise ValueError(f"calling AE title {calling.strip()!r} is routed twice")
        routes[calling.strip()] = Route.parse(spec)
    return routes


def default_route(settings: Settings) -> Route | None:
    if not settings.results_destination_aet:
        return None
    return Route(
        settings.results_destination_aet,
        settings.results_destination_host,
        settings.results_destination_port,
        tls=settings.results_destination_tls,
    )


def route_for(settings: Settings, calling_aet: str | None) -> Route | None:
    """Where the DICOM results of an instance from `calling_aet` go: its route, else the default, else nowhere."""
    routes = parse_routes(settings.results_routes)
    if calling_aet is not None and calling_aet.strip() in routes:
        return routes[calling_aet.strip()]
    return default_route(settings)
