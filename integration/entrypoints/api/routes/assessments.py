"""Scored assessments: the operator's re-publish of one that the EHR did not take (or that was given up)."""

from __future__ import annotations

import logging

from fastapi import APIRouter, HTTPException, Request, status
from pydantic import BaseModel

from integration.entrypoints.api.deps import ServicesDep
from integration.services.assess import republish as requeue_publish

log = logging.getLogger(__name__)
router = APIRouter(prefix="/assessments", tags=["assessments"])


class Republished(BaseModel):
    identifier: str
    status: str


@router.post(
    "/{identifier}/republish",
    response_model=Republished,
    status_code=status.HTTP_202_ACCEPTED,
    summary="Write an assessment to the EHR again (after a rejection or a given-up publish); idempotent",
    responses={404: {"description": "Unknown assessment"}, 409: {"description": "It is being published"}},
)
def republish(identifier: str, request: Request, services: ServicesDep) -> Republished:
    row = services.store.get_assessment(identifier)
    if row is None:
        raise HTTPException(404, f"unknown assessment {identifier}")
    request.state.audit_patients = [row.patient_fhir_id]  # the audit trail names whose assessment it was
    request.state.audit_studies = [row.study_uid] if row.study_uid else []
    if not requeue_publish(services, identifier):
        raise HTTPException(409, f"assessment {identifier} is being published; try again when it has finished")
    return Republished(identifier=identifier, status="retry")
