"""Named, recorded failures (newest first), filterable by stage, outcome, subject and openness."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from integration.adapters.db import queries
from integration.entrypoints.api.deps import PagingDep, SessionsDep

router = APIRouter(prefix="/failures", tags=["failures"])


@router.get("", response_model=queries.Page[queries.FailureView], summary="Failures, newest first")
def list_failures(
    sessions: SessionsDep,
    paging: PagingDep,
    stage: Annotated[str | None, Query(description="detect|ingest|vitals|assess|publish")] = None,
    outcome: Annotated[str | None, Query(description="a named outcome, e.g. unmatched_patient")] = None,
    subject: Annotated[str | None, Query(description="study UID, patient FHIR id or assessment identifier")] = None,
    open: Annotated[bool, Query(description="only those not resolved by a later success")] = False,
) -> queries.Page[queries.FailureView]:
    return queries.list_failures(
        sessions,
        stage=stage,
        outcome=outcome,
        subject=subject,
        open_only=open,
        offset=paging.offset,
        limit=paging.limit,
    )
