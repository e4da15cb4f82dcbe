"""Patients the engine follows, with their studies, series decisions, assessments and vitals counts, and the
operator's reassessment."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException, status
from pydantic import BaseModel

from integration.adapters.db import queries
from integration.entrypoints.api.deps import PagingDep, ServicesDep, SessionsDep, SettingsDep
from integration.services.assess import reassess_patient

router = APIRouter(prefix="/patients", tags=["patients"])


@router.get("", response_model=queries.Page[queries.PatientSummary], summary="Patients, oldest first")
def list_patients(sessions: SessionsDep, paging: PagingDep) -> queries.Page[queries.PatientSummary]:
    return queries.list_patients(sessions, offset=paging.offset, limit=paging.limit)


@router.get(
    "/{fhir_id}",
    response_model=queries.PatientDetail,
    summary="One patient by FHIR id",
    responses={404: {"description": "The engine does not follow this patient"}},
)
def get_patient(fhir_id: str, sessions: SessionsDep, settings: SettingsDep) -> queries.PatientDetail:
    detail = queries.patient_detail(sessions, fhir_id, ehr_base_url=settings.ehr.base_url)
    if detail is None:
        raise HTTPException(404, f"no patient with FHIR id {fhir_id}")
    return detail


class Reassessing(BaseModel):
    fhir_id: str
    status: str


@router.post(
    "/{fhir_id}/reassess",
    response_model=Reassessing,
    status_code=status.HTTP_202_ACCEPTED,
    summary="Score the patient again now (e.g. after a given-up assessment); the same inputs are not duplicated",
    responses={
        404: {"description": "The engine does not follow this patient"},
        409: {"description": "The patient is being assessed"},
    },
)
def reassess(fhir_id: str, services: ServicesDep) -> Reassessing:
    if services.store.get_patient(fhir_id) is None:
        raise HTTPException(404, f"no patient with FHIR id {fhir_id}")
    if not reassess_patient(services, fhir_id):
        raise HTTPException(409, f"patient {fhir_id} is being assessed; try again when it has finished")
    return Reassessing(fhir_id=fhir_id, status="queued")
