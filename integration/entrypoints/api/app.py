"""The app factory. ``uvicorn --factory integration.entrypoints.api.app:create_app`` (``strokewatch run`` does it).

The engine (adapters, store, services) is built once at start-up by ``integration.bootstrap`` and closed at
shutdown; routes reach it through ``deps``. Follow-up work goes to the queue through ``enqueue``.
Every route runs ``security.guard.authorize`` first (see ``security``); outside the sandbox the app refuses to
start without an API credential configured, and /docs is off unless ``api.docs`` asks for it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from urllib.parse import urlencode

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles

from integration.bootstrap import Engine, bootstrap
from integration.config import Settings, get_settings
from integration.domain.types import DomainError
from integration.entrypoints.api import web
from integration.entrypoints.api.routes import (
    assessments,
    cds_hooks,
    dashboard,
    failures,
    health,
    metrics,
    patients,
    smart_launch,
    status,
    studies,
    webhooks,
)
from integration.entrypoints.api.security import middleware
from integration.entrypoints.api.security.audit import AuditLog
from integration.entrypoints.api.security.dashboard import LoginRequired
from integration.entrypoints.api.security.guard import ApiStartRefused, Guard, authorize, startup_problem

log = logging.getLogger(__name__)

Enqueue = Callable[[str, list[str]], None]
EngineFactory = Callable[[Settings, Enqueue], Engine]


def default_engine(settings: Settings, enqueue: Enqueue) -> Engine:
    return bootstrap(settings, enqueue=enqueue)


def celery_enqueue(stage: str, ids: list[str]) -> None:
    from integration.entrypoints.worker import enqueue

    enqueue(stage, ids)


def create_app(
    settings: Settings | None = None,
    *,
    engine_factory: EngineFactory = default_engine,
    enqueue: Enqueue | None = None,
) -> FastAPI:
    """``settings`` default to the environment (``get_settings()``); ``enqueue`` to the Celery queue.

    Celery's broker comes from the environment's settings too, so pass ``enqueue`` when ``settings`` differ.
    Raises ``ApiStartRefused`` (naming the settings to set) when the API must not start unauthenticated.
    """
    resolved = settings or get_settings()
    problem = startup_problem(resolved)
    if problem:
        raise ApiStartRefused(problem)
    send: Enqueue = enqueue or celery_enqueue
    guard = Guard(resolved)
    audit_log = AuditLog(resolved.data_dir)
    # httpx logs every request URL at INFO, and FHIR searches carry identifiers (MRNs) in the query string.
    for noisy in ("httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLogger(noisy).level))

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine = engine_factory(resolved, send)
        app.state.engine = engine
        app.state.metrics = metrics.registry_for(engine.store)
        if resolved.api.audit_fhir:
            audit_log.forward_to(engine.ehr.create)  # each record also as a FHIR AuditEvent
        log.info("API ready (PACS %s, EHR %s)", resolved.pacs.dicomweb_url, resolved.ehr.base_url)
        try:
            yield
        finally:
            audit_log.close()
            guard.close()
            engine.close()

    docs = resolved.api_docs_enabled
    app = FastAPI(
        title="StrokeWatch",
        summary="Stroke risk from PACS images and EHR vitals, written back as FHIR RiskAssessments.",
        version="0.1.0",
        lifespan=lifespan,
        dependencies=[Depends(authorize)],  # every route, including any added later
        docs_url="/docs" if docs else None,
        redoc_url=None,
        openapi_url="/openapi.json" if docs else None,
    )
    app.state.guard = guard
    for module in (health, status, patients, studies, assessments, failures, webhooks, metrics, cds_hooks, dashboard,
                   smart_launch):
        app.include_router(module.router)
    # The dashboard's scripts and styles (uPlot vendored): no patient data, so served without credentials.
    app.mount("/dashboard/static", StaticFiles(directory=web.STATIC_DIR), name="dashboard-static")
    app.add_exception_handler(DomainError, _domain_error)  # type: ignore[arg-type]
    app.add_exception_handler(LoginRequired, _login_required)  # type: ignore[arg-type]
    middleware.install(app, resolved, audit_log)
    return app


async def _domain_error(_: Request, err: DomainError) -> JSONResponse:
    """A peer or input problem met while serving a request: named outcome; 503 when trying again may help."""
    code = 503 if err.retryable else 422
    # DomainError keeps only finite, non-negative hints; a day is the most this API ever asks a client to wait.
    headers = {"Retry-After": str(math.ceil(min(err.retry_after, 86400.0)))} if err.retry_after else None
    return JSONResponse({"outcome": err.outcome.value, "detail": err.message}, status_code=code, headers=headers)


async def _login_required(_: Request, err: LoginRequired) -> RedirectResponse:
    """A dashboard page opened without a credential: to the sign-in form, back here afterwards."""
    return RedirectResponse(f"/dashboard/login?{urlencode({'next': err.next_path})}", status_code=303)
