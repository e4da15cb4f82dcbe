"""Read-side queries of the dashboard's pages. Every query is bounded (a LIMIT, or a GROUP BY over a status column
with a handful of values), so a page costs the same with ten patients or a million."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from integration.adapters.db.models import Assessment, Failure, Patient, Study, VitalRow
from integration.adapters.db.queries import AssessmentView, StudyDetail, _assessment_view, _series_of, _study_detail
from integration.domain.records import AssessmentStatus, PatientStatus, StudyStatus
from integration.domain.window import window_start

Sessions = sessionmaker[Session]

#: Patients listed on the overview (the most recently followed first).
RECENT_PATIENTS = 50
#: Studies shown on a patient page (the newest first).
PATIENT_STUDIES = 20


@dataclass(frozen=True)
class QueueDepth:
    """Work of one stage that the database holds: waiting (due or backing off) and being worked on now."""

    stage: str
    waiting: int
    running: int


@dataclass(frozen=True)
class PatientRow:
    fhir_id: str
    status: str
    probability: float | None
    band: str | None
    assessed_at: datetime | None
    created_at: datetime


@dataclass(frozen=True)
class VitalPoint:
    feature: str
    effective: datetime
    value: float
    observation_id: str


@dataclass(frozen=True)
class PatientPage:
    fhir_id: str
    status: str
    birth_date: str | None
    gender: str | None
    outcome: str | None
    reason: str | None
    #: Newest first, at most ``max_assessments``; ``total_assessments`` says how many there are.
    assessments: list[AssessmentView]
    total_assessments: int
    #: The latest assessment that is not superseded (the one the EHR shows), if any.
    current: AssessmentView | None
    #: The current RiskAssessment's note (it names the drivers) and the Observations in its basis.
    current_note: str
    current_observations: list[str]
    studies: list[StudyDetail] = field(default_factory=list)
    #: The vital values in the current assessment's window (what the model saw), oldest first.
    vitals: list[VitalPoint] = field(default_factory=list)
    vitals_truncated: bool = False
    window_start: datetime | None = None
    window_end: datetime | None = None


def queue_depths(sessions: Sessions) -> list[QueueDepth]:
    """Studies to ingest, patients to score, assessments to publish: the database is the queue of record."""
    with sessions() as s:
        studies = dict(s.execute(select(Study.status, func.count()).group_by(Study.status)).all())
        due_patients = s.scalar(
            select(func.count()).select_from(Patient).where(
                Patient.needs_assessment.is_(True), Patient.status == PatientStatus.IDLE.value
            )
        )
        assessing = s.scalar(
            select(func.count()).select_from(Patient).where(Patient.status == PatientStatus.ASSESSING.value)
        )
        assessments = dict(s.execute(select(Assessment.status, func.count()).group_by(Assessment.status)).all())
    return [
        QueueDepth(
            "ingest",
            int(studies.get(StudyStatus.DETECTED.value, 0)) + int(studies.get(StudyStatus.RETRY.value, 0)),
            int(studies.get(StudyStatus.PROCESSING.value, 0)),
        ),
        QueueDepth("held (patient not in the EHR)", int(studies.get(StudyStatus.HELD.value, 0)), 0),
        QueueDepth("assess", int(due_patients or 0), int(assessing or 0)),
        QueueDepth(
            "publish",
            int(assessments.get(AssessmentStatus.SCORED.value, 0))
            + int(assessments.get(AssessmentStatus.RETRY.value, 0)),
            int(assessments.get(AssessmentStatus.PUBLISHING.value, 0)),
        ),
    ]


def recent_patients(sessions: Sessions, limit: int = RECENT_PATIENTS) -> list[PatientRow]:
    """The most recently followed patients with their current (not superseded) assessment."""
    with sessions() as s:
        patients = list(s.scalars(select(Patient).order_by(Patient.id.desc()).limit(limit)))
        ids = [p.fhir_id for p in patients]
        current: dict[str, Assessment] = {}
        if ids:
            rows = s.scalars(
                select(Assessment)
                .where(Assessment.patient_fhir_id.in_(ids), Assessment.superseded.is_(False))
                .order_by(Assessment.id)
                .limit(limit * 4)  # normally one current assessment each; bounded whatever happens
            )
            for a in rows:
                current[a.patient_fhir_id] = a  # the newest wins
        return [
            PatientRow(
                p.fhir_id,
                p.status,
                current[p.fhir_id].probability if p.fhir_id in current else None,
                current[p.fhir_id].band if p.fhir_id in current else None,
                current[p.fhir_id].window_end if p.fhir_id in current else None,
                p.created_at,
            )
            for p in patients
        ]


def patient_page(
    sessions: Sessions, fhir_id: str, *, ehr_base_url: str | None, max_assessments: int, max_vitals: int
) -> PatientPage | None:
    with sessions() as s:
        p = s.scalar(select(Patient).where(Patient.fhir_id == fhir_id))
        if p is None:
            return None
        total = s.scalar(select(func.count()).select_from(Assessment).where(Assessment.patient_fhir_id == fhir_id))
        rows = list(
            s.scalars(
                select(Assessment)
                .where(Assessment.patient_fhir_id == fhir_id)
                .order_by(Assessment.id.desc())
                .limit(max_assessments)
            )
        )
        current_row = next((a for a in rows if not a.superseded), None)
        if current_row is None:
            current_row = s.scalar(
                select(Assessment)
                .where(Assessment.patient_fhir_id == fhir_id, Assessment.superseded.is_(False))
                .order_by(Assessment.id.desc())
                .limit(1)
            )
        studies = list(
            s.scalars(
                select(Study)
                .where(Study.patient_fhir_id == fhir_id)
                .order_by(Study.detected_at.desc())
                .limit(PATIENT_STUDIES)
            )
        )
        series = _series_of(s, [st.study_uid for st in studies])
        vitals: list[VitalPoint] = []
        start = end = None
        truncated = False
        if current_row is not None:
            end = current_row.window_end
            start = window_start(end)
            q = (
                select(VitalRow.feature, VitalRow.effective, VitalRow.value, VitalRow.observation_id)
                .where(VitalRow.patient_fhir_id == fhir_id, VitalRow.effective >= start, VitalRow.effective <= end)
                .order_by(VitalRow.effective.desc())
                .limit(max_vitals + 1)
            )
            found = [VitalPoint(str(f), t, float(v), str(o)) for f, t, v, o in s.execute(q)]
            truncated = len(found) > max_vitals
            vitals = list(reversed(found[:max_vitals]))  # the newest kept when there are too many
        return PatientPage(
            fhir_id=p.fhir_id,
            status=p.status,
            birth_date=p.birth_date,
            gender=p.gender,
            outcome=p.outcome,
            reason=p.reason,
            assessments=[_assessment_view(a, ehr_base_url) for a in rows],
            total_assessments=int(total or 0),
            current=_assessment_view(current_row, ehr_base_url) if current_row is not None else None,
            current_note=_note(current_row.resource) if current_row is not None else "",
            current_observations=_observations(current_row.resource) if current_row is not None else [],
            studies=[_study_detail(st, series[st.study_uid]) for st in studies],
            vitals=vitals,
            vitals_truncated=truncated,
            window_start=start,
            window_end=end,
        )


def _note(resource: dict[str, object]) -> str:
    notes = resource.get("note")
    first = notes[0] if isinstance(notes, list) and notes else None
    return str(first.get("text", "")) if isinstance(first, dict) else ""


def _observations(resource: dict[str, object]) -> list[str]:
    """``Observation/{id}`` references of the RiskAssessment's basis, in order."""
    basis = resource.get("basis")
    refs = [b.get("reference") for b in basis if isinstance(b, dict)] if isinstance(basis, list) else []
    return [str(r) for r in refs if isinstance(r, str) and r.startswith("Observation/")]


def failure(sessions: Sessions, failure_id: int) -> tuple[str, str] | None:
    """(stage, subject) of one failure row; None when unknown."""
    with sessions() as s:
        row = s.execute(select(Failure.stage, Failure.subject).where(Failure.id == failure_id)).first()
    return (str(row[0]), str(row[1])) if row is not None else None
