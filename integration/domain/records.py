"""What the engine records about studies, patients and assessments: the Store port's value types.

Plain frozen dataclasses and status enums, so services and their unit tests never see ORM rows.
The state machines:

    study:       detected -> processing -> ready | held | retry | failed     (held/retry -> processing)
    patient:     idle -> assessing -> idle                                   (needs_assessment flags work)
    assessment:  scored -> publishing -> published | retry | failed          (retry -> publishing)
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any


class StudyStatus(StrEnum):
    DETECTED = "detected"
    PROCESSING = "processing"
    READY = "ready"
    HELD = "held"  # the Patient is not (yet) in the EHR
    RETRY = "retry"
    FAILED = "failed"


#: States from which a study may be (re)claimed for ingestion.
STUDY_CLAIMABLE: tuple[StudyStatus, ...] = (StudyStatus.DETECTED, StudyStatus.RETRY, StudyStatus.HELD)


class PatientStatus(StrEnum):
    IDLE = "idle"
    ASSESSING = "assessing"


class AssessmentStatus(StrEnum):
    SCORED = "scored"
    PUBLISHING = "publishing"
    PUBLISHED = "published"
    RETRY = "retry"
    FAILED = "failed"


@dataclass(frozen=True)
class StudyRecord:
    study_uid: str
    dicom_patient_id: str | None
    issuer: str | None
    study_datetime: datetime | None
    source: str
    status: StudyStatus
    detected_at: datetime
    attempts: int = 0
    outcome: str | None = None
    reason: str | None = None
    next_attempt_at: datetime | None = None
    claimed_at: datetime | None = None
    chosen_series_uid: str | None = None
    modality: str | None = None
    patient_fhir_id: str | None = None
    volume_path: str | None = None
    volume_sha256: str | None = None
    lost_claims: int = 0  # claims released by the reaper since the last success (a worker died holding it)
    completed_at: datetime | None = None  # when it became complete (feed event, C-STORE release), if known
    first_published_at: datetime | None = None  # when the first RiskAssessment based on it was written


@dataclass(frozen=True)
class BuiltVolume:
    """The model-ready volume of a study, written to disk, and the series it came from."""

    path: str
    sha256: str
    series_uid: str
    modality: str


@dataclass(frozen=True)
class PatientRecord:
    fhir_id: str
    birth_date: str | None
    gender: str | None
    status: PatientStatus = PatientStatus.IDLE
    needs_assessment: bool = False
    vitals_cursor: datetime | None = None
    vitals_synced_at: datetime | None = None
    attempts: int = 0
    next_attempt_at: datetime | None = None
    claimed_at: datetime | None = None
    outcome: str | None = None
    reason: str | None = None
    lost_claims: int = 0
    vitals_attempts: int = 0  # failed vitals syncs in a row (reset by a success)
    vitals_next_attempt_at: datetime | None = None  # no vitals sync before (backoff, or a queued sync's lease)


@dataclass(frozen=True)
class NewAssessment:
    """A scored assessment, before it is written to the EHR."""

    identifier: str
    patient_fhir_id: str
    study_uid: str | None
    window_end: datetime
    model_version: str
    runtime: str
    trained: bool
    probability: float
    band: str
    input_fingerprint: str
    n_vitals: int
    resource: dict[str, Any]  # the RiskAssessment as built by domain.assessment (written as is)
    supersedes_identifier: str | None = None


@dataclass(frozen=True, kw_only=True)
class AssessmentRecord(NewAssessment):
    """A recorded assessment: what was scored, and where publishing it stands."""

    status: AssessmentStatus
    created_at: datetime
    superseded: bool = False
    fhir_id: str | None = None
    attempts: int = 0
    next_attempt_at: datetime | None = None
    claimed_at: datetime | None = None
    outcome: str | None = None
    reason: str | None = None
    published_at: datetime | None = None
    lost_claims: int = 0


@dataclass(frozen=True)
class ReleasedClaims:
    """What the reaper did with claims of workers that died (killed, out of memory, past the hard time limit).

    ``released``: put back in the queue. ``given_up``: (stage, subject) of work that had lost
    ``max_lost_claims`` claims and was failed with outcome ``worker_lost`` instead: stage ``ingest`` (a study
    UID), ``assess`` (a patient's FHIR id) or ``publish`` (an assessment identifier).
    """

    released: int = 0
    given_up: tuple[tuple[str, str], ...] = ()
