"""What the engine has done so far, which model it scores with, and which peers it talks to (no secrets)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel

from integration.domain.redact import describe_exception, redact_url
from integration.entrypoints.api.deps import EngineDep

router = APIRouter(tags=["status"])


class ModelStatus(BaseModel):
    version: str | None = None
    runtime: str | None = None
    trained: bool | None = None
    error: str | None = None


class StatusOut(BaseModel):
    #: studies/patients/assessments by status; open_failures (distinct problems) and open_failure_occurrences
    #: (how often they were seen) by outcome.
    counts: dict[str, dict[str, int]]
    model: ModelStatus
    #: Where state and the task queue live; a password in either URL is shown as ``***``.
    database: str
    broker: str
    pacs: dict[str, Any]
    ehr: dict[str, Any]


@router.get("/status", response_model=StatusOut, summary="Counts by status, model, peers")
def status(engine: EngineDep) -> StatusOut:
    settings = engine.settings
    try:
        model = engine.model()
        model_status = ModelStatus(version=model.model_version, runtime=model.runtime_name, trained=model.trained)
    except Exception as exc:  # shown, not raised: status must answer while the model is down
        model_status = ModelStatus(error=describe_exception(exc))
    return StatusOut(
        counts=engine.store.counts(),
        model=model_status,
        database=redact_url(settings.db_url),
        broker=redact_url(settings.celery_broker_url),
        pacs={
            "dicomweb_url": redact_url(settings.pacs.dicomweb_url),
            "auth": settings.pacs.auth.mode,
            "detection": "orthanc-changes" if engine.feed is not None else "qido-polling",
        },
        ehr={
            "base_url": redact_url(settings.ehr.base_url),
            "auth": settings.ehr.auth.mode,
            "patient_identifier_system": settings.ehr.patient_identifier_system,
        },
    )
