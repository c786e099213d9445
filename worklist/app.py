"""The worklist application: JSON API, pages, static files, health, readiness and Prometheus metrics; every route
that shows patient data or changes it is audited (worklist/audit.py), or the app does not start."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from cxr_triage.labels import DEMO_DISCLAIMER
from cxr_triage.settings import Settings, get_settings
from worklist import api, dicomweb, pages, readiness
from worklist.audit import AuditMiddleware, Auditor, unaudited_routes
from worklist.limits import BodySizeLimit, LoginLimiter
from worklist.metrics import DatabaseCollector, QualityCollector, SpoolCollector
from worklist.quality import QualityMonitor
from worklist.schemas import HealthReport

SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'; form-action 'self'",
}


def _operation_id(route: APIRoute) -> str:
    return route.name


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    auditor = Auditor(settings)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        auditor.close()  # sends what is queued for syslog

    app = FastAPI(
        title="cxr-triage worklist",
        version="1.0.0",
        description=f"Chest radiograph triage worklist. {DEMO_DISCLAIMER} when `not_for_clinical_use` is true.",
        generate_unique_id_function=_operation_id,
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.auditor = auditor
    app.state.login_limiter = LoginLimiter(
        settings.login_max_failures,
        settings.login_window_s,
        max_failures_per_address=settings.login_max_failures_per_address,
    )
    app.state.quality = QualityMonitor(settings)
    registry = CollectorRegistry()
    registry.register(DatabaseCollector(settings.effective_database_url, cache_s=settings.metrics_cache_s))
    registry.register(SpoolCollector(settings))
    registry.register(QualityCollector(app.state.quality))
    # Innermost: it sees the matched route and the handler's answer before anything is sent.
    app.add_middleware(AuditMiddleware, auditor=auditor)
    # Inside the header middleware below, so a 413 carries the security headers too.
    app.add_middleware(
        BodySizeLimit,
        max_bytes=settings.api_max_body_bytes,
        prefix_limits={"/dicomweb/": settings.stow_max_request_bytes},  # STOW-RS bodies carry whole studies
    )

    @app.middleware("http")
    async def _headers(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        response = await call_next(request)
        response.headers.update(SECURITY_HEADERS)
        if not request.url.path.startswith("/static/"):
            response.headers["Cache-Control"] = "no-store"
        return response

    @app.get("/healthz", tags=["operations"], operation_id="healthz")
    def healthz() -> HealthReport:
        """Liveness: the process answers."""
        return HealthReport(ok=True, checks={})

    @app.get(
        "/readyz",
        tags=["operations"],
        operation_id="readyz",
        response_model=HealthReport,
        responses={503: {"model": HealthReport, "description": "A part is down: named in `down`, with its reason."}},
    )
    def readyz() -> Response:
        """Readiness: the database (at the schema revision of this code) and the broker are reachable.

        `checks` names each part with what was found or a short fixed reason ("unreachable", "schema missing", ...);
        `down` lists the parts that are not ready. The raw error is logged (`readyz.part_down`), never returned.
        """
        parts = readiness.check(settings)
        report = HealthReport(
            ok=all(p.ok for p in parts),
            checks={p.name: p.reason for p in parts},
            down=[p.name for p in parts if not p.ok],
        )
        return JSONResponse(report.model_dump(), status_code=200 if report.ok else 503)

    @app.get(
        "/metrics",
        tags=["operations"],
        operation_id="metrics",
        response_class=Response,
        responses={200: {"content": {CONTENT_TYPE_LATEST.split(";")[0]: {}}, "description": "Prometheus text."}},
    )
    def metrics() -> Response:
        """Prometheus metrics: instances received, triaged, failed, queue depth, turnaround histogram; the last 24
        hours' label mix, mean scores, STAT and OOD rates and drift warnings; the AI's agreement with confirmed reads
        per label and ISO week."""
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    app.include_router(api.router)
    app.include_router(pages.router)
    app.include_router(dicomweb.router)
    app.mount("/static", StaticFiles(directory=Path(__file__).parent / "static"), name="static")
    missing = unaudited_routes(app)
    if missing:
        raise RuntimeError(f"routes without an audit action or exemption (worklist/audit.py): {missing}")
    return app
