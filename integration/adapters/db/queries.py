"""Read-side queries for the API and the CLI: plain, typed views of what the engine recorded.

The write side (claims, state changes) is in ``store.py``; here nothing is modified. Every function
takes the store's ``sessionmaker`` and returns frozen dataclasses, so callers never hold ORM rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Generic, TypeVar

from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from integration.adapters.db.models import Assessment, Failure, Patient, SeriesDecisionRow, Study, VitalRow

T = TypeVar("T")
Sessions = sessionmaker[Session]

MAX_PAGE = 500


@dataclass(frozen=True)
class Page(Generic[T]):
    items: list[T]
    total: int
    offset: int
    limit: int


@dataclass(frozen=True)
class SeriesDecisionView:
    series_uid: str
    modality: str
    n_instances: int
    eligible: bool
    chosen: bool
    reason: str


@dataclass(frozen=True)
class StudySummary:
    study_uid: str
    status: str
    source: str
    modality: str | None
    study_datetime: datetime | None
    patient_fhir_id: str | None
    outcome: str | None
    reason: str | None
    attempts: int
    next_attempt_at: datetime | None
    detected_at: datetime
    updated_at: datetime


@dataclass(frozen=True)
class StudyDetail(StudySummary):
    chosen_series_uid: str | None = None
    series: list[SeriesDecisionView] = field(default_factory=list)


@dataclass(frozen=True)
class AssessmentView:
    identifier: str
    fhir_id: str | None
    #: The RiskAssessment in the EHR (None until published).
    fhir_url: str | None
    status: str
    superseded: bool
    probability: float
    band: str
    model_version: str
    runtime: str
    trained: bool
    study_uid: str | None
    window_end: datetime
    n_vitals: int
    outcome: str | None
    reason: str | None
    created_at: datetime
    published_at: datetime | None


@dataclass(frozen=True)
class PatientSummary:
    fhir_id: str
    status: str
    needs_assessment: bool
    outcome: str | None
    reason: str | None
    vitals_synced_at: datetime | None
    created_at: datetime


@dataclass(frozen=True)
class PatientDetail(PatientSummary):
    studies: list[StudyDetail] = field(default_factory=list)
    assessments: list[AssessmentView] = field(default_factory=list)
    #: Accepted vital values on record, by contract feature key.
    vitals: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class FailureView:
    id: int
    stage: str
    subject: str
    outcome: str
    message: str
    retryable: bool
    created_at: datetime  # first seen
    resolved_at: datetime | None
    #: How often this problem was seen while open (one row per stage, subject and outcome), and when last.
    occurrences: int = 1
    last_seen_at: datetime | None = None


@dataclass(frozen=True)
class OpenFailureSummary:
    """Open failures of one stage and outcome: distinct problems, how often they were seen, when last."""

    stage: str
    outcome: str
    rows: int
    occurrences: int
    last_seen_at: datetime | None


def open_failure_summary(sessions: Sessions) -> list[OpenFailureSummary]:
    """Open failures grouped by (stage, outcome), most recently seen first (``strokewatch status``)."""
    seen = func.max(func.coalesce(Failure.last_seen_at, Failure.created_at))
    q = (
        select(Failure.stage, Failure.outcome, func.count(), func.sum(Failure.occurrences), seen)
        .where(Failure.resolved_at.is_(None))
        .group_by(Failure.stage, Failure.outcome)
        .order_by(seen.desc())
    )
    with sessions() as s:
        return [
            OpenFailureSummary(str(stage), str(outcome), int(n), int(total or 0), last)
            for stage, outcome, n, total, last in s.execute(q)
        ]


def _page_bounds(offset: int, limit: int) -> tuple[int, int]:
    return max(0, offset), max(1, min(limit, MAX_PAGE))


def _study_summary(row: Study) -> StudySummary:
    return StudySummary(
        study_uid=row.study_uid,
        status=row.status,
        source=row.source,
        modality=row.modality,
        study_datetime=row.study_datetime,
        patient_fhir_id=row.patient_fhir_id,
        outcome=row.outcome,
        reason=row.reason,
        attempts=row.attempts,
        next_attempt_at=row.next_attempt_at,
        detected_at=row.detected_at,
        updated_at=row.updated_at,
    )


def _series_of(s: Session, study_uids: list[str]) -> dict[str, list[SeriesDecisionView]]:
    out: dict[str, list[SeriesDecisionView]] = {uid: [] for uid in study_uids}
    if not study_uids:
        return out
    q = (
        select(SeriesDecisionRow)
        .where(SeriesDecisionRow.study_uid.in_(study_uids))
        .order_by(SeriesDecisionRow.chosen.desc(), SeriesDecisionRow.id)
    )
    for r in s.scalars(q):
        out[r.study_uid].append(
            SeriesDecisionView(r.series_uid, r.modality, r.n_instances, r.eligible, r.chosen, r.reason)
        )
    return out


def _study_detail(row: Study, series: list[SeriesDecisionView]) -> StudyDetail:
    summary = _study_summary(row)
    return StudyDetail(**summary.__dict__, chosen_series_uid=row.chosen_series_uid, series=series)


def _assessment_view(row: Assessment, ehr_base_url: str | None) -> AssessmentView:
    url = f"{ehr_base_url.rstrip('/')}/RiskAssessment/{row.fhir_id}" if ehr_base_url and row.fhir_id else None
    return AssessmentView(
        identifier=row.identifier,
        fhir_id=row.fhir_id,
        fhir_url=url,
        status=row.status,
        superseded=row.superseded,
        probability=row.probability,
        band=row.band,
        model_version=row.model_version,
        runtime=row.runtime,
        trained=row.trained,
        study_uid=row.study_uid,
        window_end=row.window_end,
        n_vitals=row.n_vitals,
        outcome=row.outcome,
        reason=row.reason,
        created_at=row.created_at,
        published_at=row.published_at,
    )


def _patient_fields(row: Patient) -> dict[str, object]:
    return {
        "fhir_id": row.fhir_id,
        "status": row.status,
        "needs_assessment": row.needs_assessment,
        "outcome": row.outcome,
        "reason": row.reason,
        "vitals_synced_at": row.vitals_synced_at,
        "created_at": row.created_at,
    }


# -- patients -----------------------------------------------------------------------------
def list_patients(sessions: Sessions, *, offset: int = 0, limit: int = 50) -> Page[PatientSummary]:
    offset, limit = _page_bounds(offset, limit)
    with sessions() as s:
        total = s.scalar(select(func.count()).select_from(Patient)) or 0
        rows = s.scalars(select(Patient).order_by(Patient.id).offset(offset).limit(limit))
        items = [PatientSummary(**_patient_fields(r)) for r in rows]  # type: ignore[arg-type]
    return Page(items, total, offset, limit)


def patient_detail(sessions: Sessions, fhir_id: str, *, ehr_base_url: str | None = None) -> PatientDetail | None:
    """The patient with its studies (and their series decisions), assessments (newest first), vitals counts."""
    with sessions() as s:
        row = s.scalar(select(Patient).where(Patient.fhir_id == fhir_id))
        if row is None:
            return None
        studies = list(
            s.scalars(select(Study).where(Study.patient_fhir_id == fhir_id).order_by(Study.detected_at.desc()))
        )
        series = _series_of(s, [st.study_uid for st in studies])
        assessments = s.scalars(
            select(Assessment).where(Assessment.patient_fhir_id == fhir_id).order_by(Assessment.id.desc())
        )
        vitals = s.execute(
            select(VitalRow.feature, func.count()).where(VitalRow.patient_fhir_id == fhir_id).group_by(VitalRow.feature)
        ).all()
        return PatientDetail(
            **_patient_fields(row),  # type: ignore[arg-type]
            studies=[_study_detail(st, series[st.study_uid]) for st in studies],
            assessments=[_assessment_view(a, ehr_base_url) for a in assessments],
            vitals={str(k): int(v) for k, v in vitals},
        )


# -- studies ------------------------------------------------------------------------------
def list_studies(
    sessions: Sessions, *, status: str | None = None, offset: int = 0, limit: int = 50
) -> Page[StudySummary]:
    offset, limit = _page_bounds(offset, limit)
    where = [Study.status == status] if status else []
    with sessions() as s:
        total = s.scalar(select(func.count()).select_from(Study).where(*where)) or 0
        rows = s.scalars(select(Study).where(*where).order_by(Study.id.desc()).offset(offset).limit(limit))
        items = [_study_summary(r) for r in rows]
    return Page(items, total, offset, limit)


def study_detail(sessions: Sessions, study_uid: str) -> StudyDetail | None:
    with sessions() as s:
        row = s.scalar(select(Study).where(Study.study_uid == study_uid))
        if row is None:
            return None
        return _study_detail(row, _series_of(s, [study_uid])[study_uid])


# -- failures -----------------------------------------------------------------------------
def list_failures(
    sessions: Sessions,
    *,
    stage: str | None = None,
    outcome: str | None = None,
    subject: str | None = None,
    open_only: bool = False,
    offset: int = 0,
    limit: int = 50,
) -> Page[FailureView]:
    """Failures, the most recently seen first; ``open_only`` keeps those not resolved by a later success."""
    offset, limit = _page_bounds(offset, limit)
    where = []
    if stage:
        where.append(Failure.stage == stage)
    if outcome:
        where.append(Failure.outcome == outcome)
    if subject:
        where.append(Failure.subject == subject)
    if open_only:
        where.append(Failure.resolved_at.is_(None))
    with sessions() as s:
        total = s.scalar(select(func.count()).select_from(Failure).where(*where)) or 0
        seen = func.coalesce(Failure.last_seen_at, Failure.created_at)
        q = select(Failure).where(*where).order_by(seen.desc(), Failure.id.desc()).offset(offset).limit(limit)
        items = [
            FailureView(
                r.id,
                r.stage,
                r.subject,
                r.outcome,
                r.message,
                r.retryable,
                r.created_at,
                r.resolved_at,
                occurrences=r.occurrences or 1,
                last_seen_at=r.last_seen_at or r.created_at,
            )
            for r in s.scalars(q)
        ]
    return Page(items, total, offset, limit)
