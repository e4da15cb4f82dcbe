"""ORM rows to the domain's records: what ``SqlStore`` returns, so no session or row leaves the adapter."""

from __future__ import annotations

from integration.adapters.db.models import Assessment, Patient, Study
from integration.domain.records import (
    AssessmentRecord,
    AssessmentStatus,
    PatientRecord,
    PatientStatus,
    StudyRecord,
    StudyStatus,
)


def study_record(row: Study | None) -> StudyRecord | None:
    if row is None:
        return None
    return StudyRecord(
        study_uid=row.study_uid,
        dicom_patient_id=row.dicom_patient_id,
        issuer=row.issuer,
        study_datetime=row.study_datetime,
        source=row.source,
        status=StudyStatus(row.status),
        detected_at=row.detected_at,
        attempts=row.attempts,
        outcome=row.outcome,
        reason=row.reason,
        next_attempt_at=row.next_attempt_at,
        claimed_at=row.claimed_at,
        chosen_series_uid=row.chosen_series_uid,
        modality=row.modality,
        patient_fhir_id=row.patient_fhir_id,
        volume_path=row.volume_path,
        volume_sha256=row.volume_sha256,
        lost_claims=row.lost_claims or 0,
        completed_at=row.completed_at,
        first_published_at=row.first_published_at,
    )


def patient_record(row: Patient | None) -> PatientRecord | None:
    if row is None:
        return None
    return PatientRecord(
        fhir_id=row.fhir_id,
        birth_date=row.birth_date,
        gender=row.gender,
        status=PatientStatus(row.status),
        needs_assessment=row.needs_assessment,
        vitals_cursor=row.vitals_cursor,
        vitals_synced_at=row.vitals_synced_at,
        attempts=row.attempts,
        next_attempt_at=row.next_attempt_at,
        claimed_at=row.claimed_at,
        outcome=row.outcome,
        reason=row.reason,
        lost_claims=row.lost_claims or 0,
        vitals_attempts=row.vitals_attempts or 0,
        vitals_next_attempt_at=row.vitals_next_attempt_at,
    )


def assessment_record(row: Assessment | None) -> AssessmentRecord | None:
    if row is None:
        return None
    return AssessmentRecord(
        identifier=row.identifier,
        patient_fhir_id=row.patient_fhir_id,
        study_uid=row.study_uid,
        window_end=row.window_end,
        model_version=row.model_version,
        runtime=row.runtime,
        trained=row.trained,
        probability=row.probability,
        band=row.band,
        input_fingerprint=row.input_fingerprint,
        n_vitals=row.n_vitals,
        resource=dict(row.resource),
        status=AssessmentStatus(row.status),
        created_at=row.created_at,
        supersedes_identifier=row.supersedes_identifier,
        superseded=row.superseded,
        fhir_id=row.fhir_id,
        attempts=row.attempts,
        next_attempt_at=row.next_attempt_at,
        claimed_at=row.claimed_at,
        outcome=row.outcome,
        reason=row.reason,
        published_at=row.published_at,
        lost_claims=row.lost_claims or 0,
    )
