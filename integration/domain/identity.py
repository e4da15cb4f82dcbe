"""Deterministic assessment identity: the same inputs always give the same RiskAssessment.identifier."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime


def assessment_identifier(patient_fhir_id: str, study_uid: str | None, window_end: datetime, model_version: str) -> str:
    """sha256 over (patient, study UID, vitals window end, model version), hex, 40 chars.

    A retry, a re-sent study or a replayed task computes the same value, so a conditional create on it
    never duplicates. New data (a new study, later vitals) or a new model gives a new identifier.
    """
    if window_end.tzinfo is None:
        raise ValueError("window_end must be timezone-aware")
    key = "|".join(
        [patient_fhir_id, study_uid or "-", window_end.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"), model_version]
    )
    return hashlib.sha256(key.encode()).hexdigest()[:40]


def pseudonym(value: str | None) -> str:
    """A short stable hash for logs, so PHI (PatientID, MRN) never appears in them."""
    if not value:
        return "-"
    return "p:" + hashlib.sha256(value.encode()).hexdigest()[:12]
