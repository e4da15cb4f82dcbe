"""CDS Hooks 2.0: discovery and the patient-view service, so the EHR shows the risk where clinicians work."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, HTTPException
from pydantic import BaseModel, Field

from integration.domain.cds import SERVICE_ID, discovery
from integration.entrypoints.api.deps import ServicesDep, SettingsDep
from integration.services.cds import patient_view_cards

router = APIRouter(prefix="/cds-services", tags=["cds-hooks"])


class HookRequest(BaseModel):
    hook: str
    hookInstance: str  # noqa: N815 - CDS Hooks field name
    context: dict[str, Any] = Field(default_factory=dict)
    fhirServer: str | None = None  # noqa: N815
    prefetch: dict[str, Any] | None = None


@router.get("")
def services() -> dict[str, Any]:
    return discovery()


@router.post(f"/{SERVICE_ID}")
def patient_view(request: HookRequest, svc: ServicesDep, settings: SettingsDep) -> dict[str, Any]:
    if request.hook != "patient-view":
        raise HTTPException(400, f"this service answers the patient-view hook, not {request.hook!r}")
    patient_id = request.context.get("patientId")
    if not patient_id:
        raise HTTPException(400, "context.patientId is required")
    return {"cards": patient_view_cards(svc, str(patient_id), settings.ehr.base_url)}
