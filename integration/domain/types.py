"""Value objects shared by the domain, the ports and the services. No I/O here."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum


class Outcome(StrEnum):
    """Named, recorded outcomes. Every failure a user can see maps to one of these."""

    # studies / series
    NO_ELIGIBLE_SERIES = "no_eligible_series"  # nothing CT/MR brain with enough slices
    NOT_IMAGE = "not_image"
    NOT_BRAIN = "not_brain"
    TOO_FEW_SLICES = "too_few_slices"
    INCONSISTENT_GEOMETRY = "inconsistent_geometry"
    INCONSISTENT_SPACING = "inconsistent_spacing"
    CORRUPT_PIXEL_DATA = "corrupt_pixel_data"
    UNSUPPORTED_TRANSFER_SYNTAX = "unsupported_transfer_syntax"
    # patients / vitals
    UNMATCHED_PATIENT = "unmatched_patient"  # held; retried on a slow timer and when the Patient appears
    AMBIGUOUS_PATIENT = "ambiguous_patient"
    INSUFFICIENT_DATA = "insufficient_data"
    IMPLAUSIBLE_VALUE = "implausible_value"
    MISSING_UNIT = "missing_unit"
    UNKNOWN_UNIT = "unknown_unit"
    # peers
    PACS_UNAVAILABLE = "pacs_unavailable"
    EHR_UNAVAILABLE = "ehr_unavailable"
    EHR_REJECTED = "ehr_rejected"  # 4xx other than 408/429: not retried
    PACS_REJECTED = "pacs_rejected"  # the PACS refused the results written back (STOW-RS 4xx, C-STORE failure)
    MODEL_UNAVAILABLE = "model_unavailable"
    MODEL_MISMATCH = "model_mismatch"
    INTERNAL_ERROR = "internal_error"
    # running for weeks, hostile input
    WORKER_LOST = "worker_lost"  # the worker holding it died (OOM, hard time limit) too many times
    TOO_LARGE = "too_large"  # an object beyond a configured limit (refused before allocation)
    INVALID_UID = "invalid_uid"  # a DICOM UID that is not a PS3.5 UID (pattern, <= 64 characters)
    VOLUME_MISSING = "volume_missing"  # the study's volume file is gone (retention, lost disk): re-ingested
    TIMED_OUT = "timed_out"  # the task ran past its soft time limit (slow peers): retried with backoff


#: Outcomes worth retrying automatically (the peer may come back / the data may appear).
RETRYABLE: frozenset[Outcome] = frozenset(
    {
        Outcome.UNMATCHED_PATIENT,
        Outcome.PACS_UNAVAILABLE,
        Outcome.EHR_UNAVAILABLE,
        Outcome.MODEL_UNAVAILABLE,
        Outcome.VOLUME_MISSING,
        Outcome.TIMED_OUT,
    }
)


class DomainError(Exception):
    """An input or peer problem with a named outcome; services record it and move on."""

    def __init__(self, outcome: Outcome, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.outcome = outcome
        self.message = message
        #: Seconds the peer asked to wait: a finite, non-negative number or None (``inf``/``nan``/below zero: no hint).
        finite = retry_after is not None and math.isfinite(retry_after) and retry_after >= 0
        self.retry_after = retry_after if finite else None

    @property
    def retryable(self) -> bool:
        return self.outcome in RETRYABLE


@dataclass(frozen=True)
class StudyRef:
    """A study as the PACS lists it (QIDO-RS study-level attributes)."""

    study_uid: str
    patient_id: str  # DICOM PatientID (PHI: never log it raw)
    issuer: str | None  # IssuerOfPatientID
    study_datetime: datetime | None = None  # timezone-aware (the PACS's zone when the study has no offset)
    modalities: tuple[str, ...] = ()
    description: str = ""
    date_only: bool = False  # StudyDate without StudyTime: the study stands for its whole local day


@dataclass(frozen=True)
class StableStudy:
    """A change feed's "study is complete" event: the study and when the PACS says it became complete (None when
    the feed does not say)."""

    study_uid: str
    stable_at: datetime | None = None


@dataclass(frozen=True)
class SeriesRef:
    """A series with the attributes series selection needs (QIDO-RS series level + one instance)."""

    study_uid: str
    series_uid: str
    modality: str
    n_instances: int
    body_part: str = ""
    series_description: str = ""
    study_description: str = ""
    sop_class_uid: str = ""
    # From one instance of the series (QIDO-RS instance level); empty/None when the PACS does not say.
    image_type: tuple[str, ...] = ()  # e.g. ("ORIGINAL", "PRIMARY", "AXIAL")
    slice_thickness: float | None = None  # mm
    convolution_kernel: str = ""  # CT reconstruction kernel
    orientation: tuple[float, ...] | None = None  # ImageOrientationPatient (6 direction cosines)
    frames_per_instance: int = 1  # NumberOfFrames (Enhanced CT/MR hold a whole volume in one instance)
    rows: int | None = None  # Rows / Columns of that instance: the series' size checked before retrieval
    columns: int | None = None

    @property
    def n_slices(self) -> int:
        """Image planes in the series: instances x frames (multi-frame objects count their frames)."""
        return self.n_instances * max(1, self.frames_per_instance)


@dataclass(frozen=True)
class SeriesDecision:
    series: SeriesRef
    eligible: bool
    reason: str  # human-readable, recorded for every series
    score: float = 0.0  # higher is preferred among eligible series
    outcome: Outcome | None = None  # why it was rejected (None when eligible)


@dataclass(frozen=True)
class PatientInfo:
    """The FHIR Patient the DICOM PatientID maps to."""

    fhir_id: str
    birth_date: str | None = None  # FHIR date (YYYY, YYYY-MM or YYYY-MM-DD)
    gender: str | None = None
    identifiers: tuple[tuple[str, str], ...] = ()  # (system or "", value) of Patient.identifier (PHI)

    def carries(self, system: str | None, value: str) -> bool:
        """True when an identifier has this value (ignoring case, as servers differ) in ``system``
        (any system when None): how a DICOM PatientID is matched to the Patient."""
        return any(
            v.casefold() == value.casefold() and (system is None or s == system) for s, v in self.identifiers
        )


@dataclass(frozen=True)
class VitalValue:
    """One accepted vital-sign value in the contract's canonical unit."""

    feature: str  # contract VitalFeature.key
    value: float
    effective: datetime  # timezone-aware
    observation_id: str  # FHIR logical id (for RiskAssessment.basis)


@dataclass(frozen=True)
class RejectedValue:
    observation_id: str
    outcome: Outcome
    reason: str


@dataclass
class ParsedObservations:
    accepted: list[VitalValue] = field(default_factory=list)
    rejected: list[RejectedValue] = field(default_factory=list)
    ignored: int = 0  # not a vital we use (other code), or status excluded
