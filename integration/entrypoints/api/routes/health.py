"""Liveness (the process answers) and readiness (DB, broker, PACS, EHR and model all answer)."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from integration.bootstrap import open_probes
from integration.entrypoints.api.deps import EngineDep
from integration.services.doctor import readiness

router = APIRouter(prefix="/health", tags=["health"])


class Check(BaseModel):
    name: str
    ok: bool
    detail: str
    hint: str | None = None
    warning: bool = False


class Readiness(BaseModel):
    status: str  # ready | not ready
    failing: list[str]
    checks: list[Check]


@router.get("/live", summary="The process is up")
def live() -> dict[str, str]:
    return {"status": "ok"}


@router.get(
    "/ready",
    response_model=Readiness,
    summary="Every dependency answers",
    responses={503: {"description": "At least one check failed; `checks` names it and says why"}},
)
def ready(engine: EngineDep) -> JSONResponse:
    with open_probes(engine.settings, engine=engine, timeout_s=3.0) as probes:
        checks = readiness(probes, timeout_s=3.0)
    ok = all(c.ok for c in checks)
    body: dict[str, Any] = {
        "status": "ready" if ok else "not ready",
        "failing": [c.name for c in checks if not c.ok],
        "checks": [asdict(c) for c in checks],
    }
    return JSONResponse(body, status_code=200 if ok else 503)
