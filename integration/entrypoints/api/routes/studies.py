"""Studies seen on the PACS, their series decisions, and the operator's retry."""

from __future__ import annotations

import logging
from typing import Annotated

from fastapi import APIRouter, HTTPException, Query, status
from pydantic import BaseModel

from integration.adapters.db import queries
from integration.entrypoints.api.deps import PagingDep, ServicesDep, SessionsDep
from integration.services.studies import retry_study

log = logging.getLogger(__name__)
router = APIRouter(prefix="/studies", tags=["studies"])


class Accepted(BaseModel):
    study_uid: str
    status: str


@router.get("", response_model=queries.Page[queries.StudySummary], summary="Studies, newest first")
def list_studies(
    sessions: SessionsDep,
    paging: PagingDep,
    status_: Annotated[
        str | None, Query(alias="status", description="detected|processing|ready|held|retry|failed")
    ] = None,
) -> queries.Page[queries.StudySummary]:
    return queries.list_studies(sessions, status=status_, offset=paging.offset, limit=paging.limit)


@router.get(
    "/{study_uid}",
    response_model=queries.StudyDetail,
    summary="One study with a decision (and its reason) for every series",
    responses={404: {"description": "Unknown study"}},
)
def get_study(study_uid: str, sessions: SessionsDep) -> queries.StudyDetail:
    detail = queries.study_detail(sessions, study_uid)
    if detail is None:
        raise HTTPException(404, f"unknown study {study_uid}")
    return detail


@router.post(
    "/{study_uid}/retry",
    response_model=Accepted,
    status_code=status.HTTP_202_ACCEPTED,
    summary="Put a failed or held study back in the queue now",
    responses={404: {"description": "Unknown study"}, 409: {"description": "The study is being processed"}},
)
def retry(study_uid: str, sessions: SessionsDep, services: ServicesDep) -> Accepted:
    if queries.study_detail(sessions, study_uid) is None:
        raise HTTPException(404, f"unknown study {study_uid}")
    if not retry_study(services, study_uid):
        raise HTTPException(409, f"study {study_uid} is being processed; retry when it has finished")
    log.info("operator retry of study %s", study_uid)
    return Accepted(study_uid=study_uid, status="retry")
