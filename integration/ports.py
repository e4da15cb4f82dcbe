"""The ports the services need. Adapters implement them; unit tests use small in-memory fakes.

Errors: adapters raise ``integration.domain.types.DomainError`` with a named ``Outcome``
(PACS_UNAVAILABLE, EHR_UNAVAILABLE with ``retry_after``, EHR_REJECTED, CORRUPT_PIXEL_DATA, ...),
never library exceptions, so services can record them without knowing the library.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import date, datetime
from typing import Any, Protocol

from inference.preprocess import Slice
from inference.runtime import ModelInputs, Prediction
from integration.domain.types import PatientInfo, SeriesRef, StudyRef


class Pacs(Protocol):
    """A DICOMweb PACS (QIDO-RS / WADO-RS)."""

    def find_studies(self, first: date, last: date) -> list[StudyRef]:
        """Studies whose StudyDate (the PACS's local date) lies in [first, last], as QIDO-RS date-range
        matching gives them; ``study_datetime`` timezone-aware (naive ones read in the PACS's zone)."""
        ...

    def get_study(self, study_uid: str) -> StudyRef | None: ...

    def list_series(self, study_uid: str) -> list[SeriesRef]: ...

    def retrieve_series(self, study_uid: str, series_uid: str) -> tuple[str, list[Slice]]:
        """(modality, decoded slices: HU for CT). Raises DomainError for corrupt/undecodable data."""
        ...


class ChangeFeed(Protocol):
    """A PACS-specific feed of 'study is complete' events with a persisted integer cursor (Orthanc /changes)."""

    def stable_studies(self, since: int, limit: int = 100) -> tuple[list[str], int, bool]:
        """(StudyInstanceUIDs that became stable, new cursor, done)."""
        ...

    def latest_cursor(self) -> int:
        """The current end of the feed (where to start without replaying history)."""
        ...


class Ehr(Protocol):
    """A FHIR R4 server."""

    def find_patient(self, system: str | None, value: str) -> PatientInfo | None:
        """Patient by identifier; raises DomainError(AMBIGUOUS_PATIENT) when several match."""
        ...

    def patients_updated_since(self, since: datetime) -> list[PatientInfo]:
        """Patients created or changed after ``since`` (with their identifiers), all pages followed."""
        ...

    def search_observations(
        self, patient_id: str, codes: Sequence[str], since: datetime | None, updated_since: datetime | None
    ) -> list[dict[str, Any]]:
        """Raw Observation resources (JSON dicts) for the patient, all pages followed."""
        ...

    def conditional_create(
        self, resource: dict[str, Any], identifier_system: str, identifier_value: str
    ) -> tuple[str, bool]:
        """Create unless a resource with that identifier exists. Returns (logical id, created)."""
        ...

    def update(self, resource: dict[str, Any]) -> None: ...

    def search(self, resource_type: str, params: dict[str, str]) -> list[dict[str, Any]]: ...


class RiskModel(Protocol):
    """Scores a batch of patients (inference.runtime: OnnxRuntimeModel, TritonModel)."""

    @property
    def model_version(self) -> str: ...

    @property
    def trained(self) -> bool: ...

    @property
    def runtime_name(self) -> str: ...

    def predict(self, batch: Sequence[ModelInputs]) -> list[Prediction]: ...


class Clock(Protocol):
    def now(self) -> datetime: ...
