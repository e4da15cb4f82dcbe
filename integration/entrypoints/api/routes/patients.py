"""Patients the engine follows, with their studies, series decisions, assessments and vitals counts."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException

from integration.adapters.db import queries
from integration.entrypoints.api.deps import PagingDep, SessionsDep, SettingsDep

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
