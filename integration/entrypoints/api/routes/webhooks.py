"""Push alternatives to polling: Orthanc says a study is stable; a FHIR Subscription says vitals changed.

Both answer 202 and hand the work to the queue; polling still runs, so a lost notification loses nothing.
Bodies may hold PHI: never log them, only study UIDs and FHIR ids. Callers are verified before the route runs
(``security.webhooks``: HMAC signature or bearer token per source); ids are checked by pattern before they go
anywhere near a URL.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator
from typing import Any

from fastapi import APIRouter, BackgroundTasks, HTTPException, Request, status
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, ConfigDict, Field

from integration.domain.ids import is_dicom_uid, is_orthanc_id, shown
from integration.entrypoints.api.deps import EngineDep, ServicesDep
from integration.services.studies import register_study
from integration.services.vitals import request_vitals_sync

log = logging.getLogger(__name__)
router = APIRouter(prefix="/webhooks", tags=["webhooks"])


class StableStudy(BaseModel):
    """Either the DICOM StudyInstanceUID or Orthanc's own study ID (as Orthanc's Lua OnStableStudy sends)."""

    model_config = ConfigDict(extra="allow")
    StudyInstanceUID: str | None = None
    ID: str | None = Field(None, description="Orthanc study ID")


class StudyAccepted(BaseModel):
    study_uid: str
    enqueued: bool


class NotificationAccepted(BaseModel):
    patients: list[str]  # FHIR ids whose vitals sync was enqueued
    ignored: list[str]  # referenced patients the engine does not follow


def _orthanc_study_uid(engine: Any, orthanc_id: str) -> str | None:
    feed = engine.feed
    if feed is None:
        raise HTTPException(422, "an Orthanc ID needs an Orthanc PACS (STROKEWATCH_PACS__KIND=orthanc or auto)")
    uid = feed.study_uid(orthanc_id)
    return str(uid) if uid else None


@router.post(
    "/orthanc/stable-study",
    response_model=StudyAccepted,
    status_code=status.HTTP_202_ACCEPTED,
    summary="A study is complete on the PACS: record it and enqueue its ingestion",
    responses={
        401: {"description": "Not signed (or not with the Orthanc webhook's secret or token)"},
        404: {"description": "The PACS does not know the study"},
        422: {"description": "No study named, or an id that is not a DICOM UID / Orthanc id"},
    },
)
def stable_study(body: StableStudy, request: Request, engine: EngineDep, services: ServicesDep,
                 background: BackgroundTasks) -> StudyAccepted:
    if body.StudyInstanceUID is not None and not is_dicom_uid(body.StudyInstanceUID):
        raise HTTPException(422, f"StudyInstanceUID {shown(body.StudyInstanceUID)} is not a DICOM UID")
    if body.ID is not None and not is_orthanc_id(body.ID):
        raise HTTPException(422, f"ID {shown(body.ID)} is not an Orthanc id (5 groups of 8 hex digits)")
    if body.StudyInstanceUID and "respond-async" in request.headers.get("prefer", "").lower():
        # RFC 7240: answered before the PACS is asked about the study. Orthanc's Lua waits for the answer while it
        # holds its event lock, and the registration's lookup (QIDO-RS to that same Orthanc) would wait for that
        # lock: sent by the shipped script, so the two never wait on each other. A study the PACS does not know is
        # logged instead of answered 404; the change feed remains the safety net.
        uid = body.StudyInstanceUID
        request.state.audit_studies = [uid]
        background.add_task(_register_later, services, uid)
        return StudyAccepted(study_uid=uid, enqueued=True)
    uid = body.StudyInstanceUID
    if not uid and body.ID:
        uid = _orthanc_study_uid(engine, body.ID)
        if not uid:
            raise HTTPException(404, f"Orthanc has no study {body.ID}")
        if not is_dicom_uid(uid):  # Orthanc stores whatever StudyInstanceUID a modality sent
            raise HTTPException(422, f"Orthanc study {body.ID} has StudyInstanceUID {shown(uid)}: not a DICOM UID")
    if not uid:
        raise HTTPException(422, "give StudyInstanceUID or ID (Orthanc study ID)")
    request.state.audit_studies = [uid]
    if not register_study(services, uid, source="webhook"):
        raise HTTPException(404, f"the PACS does not know study {uid}")
    log.info("webhook: study %s enqueued", uid)
    return StudyAccepted(study_uid=uid, enqueued=True)


def _register_later(services: Any, uid: str) -> None:
    try:
        if register_study(services, uid, source="webhook"):
            log.info("webhook: study %s enqueued", uid)
        else:
            log.warning("webhook: the PACS does not know study %s (announced with Prefer: respond-async)", uid)
    except Exception as exc:  # the PACS or the database is down: the change feed finds the study later
        from integration.domain.redact import describe_exception

        log.warning("webhook: registering study %s failed (%s); the change feed picks it up", uid,
                    describe_exception(exc, []))


@router.post(
    "/fhir/subscription",
    response_model=NotificationAccepted,
    status_code=status.HTTP_202_ACCEPTED,
    summary="FHIR Subscription rest-hook notification: sync the vitals of the patients it references",
    openapi_extra={
        "requestBody": {
            "required": False,
            "description": "A Bundle of the changed resources, a single resource, or nothing (payload: none)",
            "content": {"application/fhir+json": {"schema": {"type": "object"}}},
        }
    },
)
async def fhir_subscription(request: Request, services: ServicesDep) -> NotificationAccepted:
    # Read the body ourselves: servers send application/fhir+json, and "payload: none" sends nothing at all.
    raw = await request.body()
    try:
        body = json.loads(raw) if raw.strip() else {}
    except ValueError as err:
        raise HTTPException(400, "the notification body is not JSON") from err
    if not isinstance(body, dict):
        raise HTTPException(400, "the notification body is not a FHIR resource")
    referenced = list(dict.fromkeys(patient_ids(body)))
    known = await run_in_threadpool(request_vitals_sync, services, referenced)
    request.state.audit_patients = known
    return NotificationAccepted(patients=known, ignored=[p for p in referenced if p not in known])


_PATIENT_REF = re.compile(r"(?:^|/)Patient/([A-Za-z0-9\-.]{1,64})(?:/_history/[^/]+)?$")


def _patient_from_reference(ref: object) -> str | None:
    if isinstance(ref, dict):
        ref = ref.get("reference")
    match = _PATIENT_REF.search(ref) if isinstance(ref, str) else None
    return match.group(1) if match else None


def patient_ids(resource: dict[str, Any]) -> Iterator[str]:
    """Patient ids a notification references: a Bundle (history, subscription-notification, ...) of resources,
    a single resource, or the SubscriptionStatus / Parameters of topic-based notifications (focus references)."""
    rtype = resource.get("resourceType")
    if rtype == "Bundle":
        for entry in resource.get("entry") or []:
            if isinstance(entry, dict):
                if isinstance(entry.get("resource"), dict):
                    yield from patient_ids(entry["resource"])
                elif pid := _patient_from_reference(entry.get("fullUrl")):
                    yield pid
        return
    if rtype == "Patient" and isinstance(resource.get("id"), str):
        yield resource["id"]
    for key in ("subject", "patient"):
        if pid := _patient_from_reference(resource.get(key)):
            yield pid
    for event in resource.get("notificationEvent") or []:  # SubscriptionStatus (R4B/R5)
        if isinstance(event, dict) and (pid := _patient_from_reference(event.get("focus"))):
            yield pid
    for param in resource.get("parameter") or []:  # Parameters (R4 Subscriptions Backport)
        for part in (param or {}).get("part") or []:
            pid = _patient_from_reference(part.get("valueReference")) if isinstance(part, dict) else None
            if pid and part.get("name") == "focus":
                yield pid
