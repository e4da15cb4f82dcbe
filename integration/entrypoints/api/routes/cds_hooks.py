"""CDS Hooks 2.0: discovery and the patient-view service, so the EHR shows the risk where clinicians work.

Discovery is open (the spec); a hook call is verified first (``security.cds``: the EHR's signed JWT). The
``fhirAuthorization`` a client may send (an access token to its FHIR server) is never used, logged or stored.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

from fastapi import APIRouter, HTTPException, Request
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
    #: The client's token for its FHIR server: accepted so the request validates, then ignored (repr/dumps skip it).
    fhirAuthorization: dict[str, Any] | None = Field(default=None, exclude=True, repr=False)  # noqa: N815


@router.get("")
def services() -> dict[str, Any]:
    return discovery()


@router.post(f"/{SERVICE_ID}", responses={401: {"description": "No valid JWT from an allow-listed EHR"}})
def patient_view(hook: HookRequest, request: Request, svc: ServicesDep, settings: SettingsDep) -> dict[str, Any]:
    if hook.hook != "patient-view":
        raise HTTPException(400, f"this service answers the patient-view hook, not {hook.hook[:40]!r}")
    patient_id = hook.context.get("patientId")
    if not patient_id:
        raise HTTPException(400, "context.patientId is required")
    request.state.audit_patients = [str(patient_id)]
    base = settings.api_base_url.rstrip("/")
    smart = settings.dashboard.smart_client_id is not None and hook.fhirServer is not None
    return {"cards": patient_view_cards(
        svc, str(patient_id), settings.ehr.base_url,
        dashboard_url=f"{base}/dashboard/patients/{quote(str(patient_id), safe='')}",
        smart_launch_url=f"{base}/dashboard/launch" if smart else None,
    )}
