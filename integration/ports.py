"""The ports the services need. Adapters implement them; unit tests use small in-memory fakes.

Errors: adapters raise ``integration.domain.types.DomainError`` with a named ``Outcome``
(PACS_UNAVAILABLE, EHR_UNAVAILABLE with ``retry_after``, EHR_REJECTED, CORRUPT_PIXEL_DATA, ...),
never library exceptions, so services can record them without knowing the library.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import date, datetime, timedelta
from typing import TYPE_CHECKING, Any, Protocol

from inference.preprocess import Slice
from inference.runtime.base import ModelInputs, Prediction
from integration.domain.checks import CheckResult
from integration.domain.deid import PatientContext
from integration.domain.latency import StageSnapshot
from integration.domain.push import InstanceHeader, ReceivedInstance, SpooledStudy
from integration.domain.records import (
    AssessmentRecord,
    AssessmentStatus,
    BuiltVolume,
    NewAssessment,
    PatientRecord,
    ReleasedClaims,
    StudyRecord,
    StudyStatus,
)
from integration.domain.stages import Observation, StageHistogram
from integration.domain.types import (
    Outcome,
    PatientInfo,
    SeriesDecision,
    SeriesRef,
    StableStudy,
    StudyRef,
    VitalValue,
)

if TYPE_CHECKING:
    from pydicom import Dataset


class Pacs(Protocol):
    """A DICOMweb PACS (QIDO-RS / WADO-RS)."""

    def find_studies(self, first: date, last: date) -> list[StudyRef]:
        """Studies whose StudyDate (the PACS's local date) lies in [first, last], as QIDO-RS date-range
        matching gives them; ``study_datetime`` timezone-aware (naive ones read in the PACS's zone)."""
        ...

    def get_study(self, study_uid: str) -> StudyRef | None: ...

    def list_series(self, study_uid: str) -> list[SeriesRef]: ...

    def retrieve_series(self, study_uid: str, series_uid: str) -> tuple[str, list[Slice]]:
        """(modality, decoded slices: HU for CT; planes finer than the model's grid as block means with
        ``Slice.plane_centre`` set, see ``inference.preprocess.block_means``). Raises DomainError for corrupt or
        undecodable data."""
        ...


class SourceImages(Protocol):
    """Where the instances of a scored series can be read whole (pixel data included): the source PACS, or the
    C-STORE spool for a pushed study."""

    def source_instances(self, study_uid: str, series_uid: str) -> list[Dataset]:
        """Every instance of the series, with its pixel data, in any order (bounded by the image limits).
        DomainError NO_ELIGIBLE_SERIES when there is none."""
        ...


class ResultsArchive(Protocol):
    """Where the engine's DICOM results go: the source PACS (STOW-RS, or C-STORE for a DIMSE-only PACS), read back
    by the same standard services. Errors: PACS_UNAVAILABLE (retried), PACS_REJECTED (the PACS refused an object)."""

    def source_instances(self, study_uid: str, series_uid: str) -> list[Dataset]:
        """Every instance of the series, with its pixel data, in any order (bounded by the image limits)."""
        ...

    def store(self, datasets: Sequence[Dataset]) -> None:
        """Store the instances in the PACS (all of them, or raise)."""
        ...

    def find_instance(self, study_uid: str, sop_instance_uid: str) -> dict[str, str] | None:
        """The instance's series and SOP class (``SeriesInstanceUID``, ``SOPClassUID``), or None if not stored."""
        ...


class ChangeFeed(Protocol):
    """A PACS-specific feed of 'study is complete' events with a persisted integer cursor (Orthanc /changes)."""

    def stable_studies(self, since: int, limit: int = 100) -> tuple[list[StableStudy], int, bool]:
        """(studies that became stable, each once, with the event's time when the feed gives it; new cursor, done)."""
        ...

    def latest_cursor(self) -> int:
        """The current end of the feed (where to start without replaying history)."""
        ...

    def is_stable(self, study_uid: str) -> bool | None:
        """Whether the PACS considers the study complete (no instance received for its stable age); None when
        it does not hold the study. For reconciling events the feed lost (a PACS restarted before one fired)."""
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
    def now(self) -> datetime:
        """The current time, timezone-aware."""
        ...


class Store(Protocol):
    """The engine's record: studies, patients, vitals, assessments, failures and feed cursors.

    Every state change is atomic; the ``claim_*`` methods are conditional updates that succeed for exactly
    one caller, so concurrent workers never process the same item twice. Reads return domain records.
    """

    # -- feed cursors --
    def get_cursor(self, name: str) -> str | None: ...

    def set_cursor(self, name: str, value: str) -> None: ...

    # -- studies --
    def add_study(self, ref: StudyRef, source: str, now: datetime, completed_at: datetime | None = None) -> bool:
        """Record a study first seen ``now``; False when it is already known (de-duplication by UID).
        ``completed_at``: when it became complete (a feed's event, a C-STORE association's release), if known."""
        ...

    def known_studies(self, uids: Iterable[str]) -> set[str]: ...

    def get_study(self, uid: str) -> StudyRecord | None: ...

    def claim_study(self, uid: str, now: datetime) -> bool:
        """detected | retry | held -> processing (attempts + 1), for one caller only."""
        ...

    def record_series_decisions(self, uid: str, decisions: Sequence[SeriesDecision], chosen_uid: str | None) -> None:
        ...

    def set_study_volume(self, uid: str, volume: BuiltVolume) -> None: ...

    def set_study_ready(self, uid: str, patient_fhir_id: str) -> None: ...

    def set_study_outcome(
        self, uid: str, status: StudyStatus, outcome: Outcome, reason: str, next_attempt_at: datetime | None
    ) -> None:
        """A failed attempt: held, retry (at ``next_attempt_at``) or failed for good; releases the claim."""
        ...

    def requeue_study(self, uid: str) -> bool:
        """Operator retry: back in the queue now with a fresh attempt count; False if unknown or processing."""
        ...

    def studies_due(self, now: datetime, limit: int = 100, grace_s: float = 30.0) -> list[str]: ...

    def lease_due_studies(self, now: datetime, until: datetime, limit: int = 100, grace_s: float = 30.0) -> list[str]:
        """``studies_due``, taken for enqueueing: each returned row's next-attempt time moves to ``until``
        atomically, so it is handed out once per lease (again at ``until`` only if its message was lost).
        The other ``lease_*`` methods do the same for their ``*_due`` query."""
        ...

    def release_stale_claims(self, older_than: datetime, max_lost_claims: int = 3) -> ReleasedClaims:
        """Reaper: claims taken before ``older_than`` belong to workers that died. Each such row counts a lost
        claim; with fewer than ``max_lost_claims`` it goes back to the queue, else it is failed with outcome
        ``worker_lost`` (studies failed, patients not re-flagged, assessments failed) and listed in ``given_up``."""
        ...

    def requeue_patient(self, fhir_id: str) -> bool:
        """Operator replay: flag the patient for scoring now with fresh attempt and lost-claim counts; False if
        unknown or being assessed."""
        ...

    def requeue_assessment(self, identifier: str) -> bool:
        """Operator replay: the assessment back to ``retry``, due now, with fresh attempt and lost-claim counts
        (a published one is re-sent: the conditional create finds it); False if unknown or being published."""
        ...

    def clear_study_volume(self, uid: str, path: str) -> bool:
        """Forget the study's volume file (retention removed it, or it is lost) so that an ingest rebuilds it.
        Conditional: only while the row still names ``path`` and is not being processed."""
        ...

    def studies_with_volumes(self, detected_before: datetime, after_uid: str, limit: int) -> list[StudyRecord]:
        """Studies (ready or failed) that name a volume file and were first seen before ``detected_before``,
        by study UID after ``after_uid`` (paging)."""
        ...

    def latest_ready_study(self, patient_fhir_id: str) -> StudyRecord | None: ...

    def held_patient_keys(self, limit: int = 1000) -> list[tuple[str | None, str]]: ...

    def release_held_studies(self, dicom_patient_id: str, issuer: str | None) -> list[str]: ...

    # -- patients --
    def upsert_patient(self, fhir_id: str, birth_date: str | None, gender: str | None) -> None: ...

    def get_patient(self, fhir_id: str) -> PatientRecord | None: ...

    def mark_needs_assessment(self, fhir_id: str) -> None: ...

    def patients_due(self, now: datetime, limit: int) -> list[str]: ...

    def lease_due_patients(self, now: datetime, until: datetime, limit: int) -> list[str]: ...

    def claim_patient(self, fhir_id: str, now: datetime) -> bool: ...

    def release_patient(
        self,
        fhir_id: str,
        *,
        retry_at: datetime | None = None,
        outcome: str | None = None,
        reason: str | None = None,
    ) -> None: ...

    def require_vitals_sync(self, fhir_id: str, queued_until: datetime | None = None) -> None:
        """New imaging: sync the vitals again, and score the patient (flagged now, scored once a sync has run).
        With ``queued_until`` the caller has queued the sync itself: the sweep and the EHR poll leave the patient
        alone until then (a lease), so the sync is not queued twice."""

    def patients_needing_vitals(self, now: datetime, limit: int = 1000) -> list[str]:
        """Never synced since their last study, and past any sync backoff (``vitals_next_attempt_at``)."""
        ...

    def lease_patients_needing_vitals(self, now: datetime, until: datetime, limit: int = 1000) -> list[str]: ...

    def lease_patients_in_window(self, now: datetime, since: datetime, until: datetime, limit: int = 1000) -> list[str]:
        """Patients with a ready study whose anchor (``domain.window.study_anchor``) is at or after ``since``, past
        any sync backoff, least recently synced first; leased (``vitals_next_attempt_at`` := ``until``)."""
        ...

    def set_vitals_retry(self, fhir_id: str, attempts: int, retry_at: datetime) -> None:
        """A failed vitals sync, the ``attempts``-th in a row: not due before ``retry_at`` (a success resets both)."""
        ...

    def set_vitals_cursor(self, fhir_id: str, cursor: datetime | None, synced_at: datetime) -> None: ...

    # -- vitals --
    def replace_vitals(self, fhir_id: str, values: Sequence[VitalValue], removed_observation_ids: Iterable[str]) -> int:
        """Upsert this patient's rows by (Observation, feature), drop removed Observations; returns how many rows
        changed. Matched within the patient: another patient's Observation with the same id is never touched."""
        ...

    def vitals_between(self, fhir_id: str, start: datetime, end: datetime) -> list[VitalValue]:
        """Values with start < effective <= end, oldest first."""
        ...

    def latest_vital_time(self, fhir_id: str, not_after: datetime) -> datetime | None: ...

    def prune_vitals(self, before: datetime, window: timedelta, batch_size: int, *, dry_run: bool = False) -> int:
        """Delete vitals taken before ``before`` outside each patient's current windows: the ``window`` before
        their latest input (newest ready study's anchor or newest vital) and before each of their current
        (non-superseded) assessments' window ends. ``batch_size`` rows per transaction; returns how many (would) go."""
        ...

    # -- assessments --
    def get_assessment(self, identifier: str) -> AssessmentRecord | None: ...

    def latest_assessment(self, fhir_id: str) -> AssessmentRecord | None:
        """The patient's newest assessment that nothing supersedes."""
        ...

    def add_assessment(self, new: NewAssessment) -> bool:
        """Insert (marking the one it supersedes); False when the identifier is already recorded."""
        ...

    def claim_assessment(self, identifier: str, now: datetime) -> bool: ...

    def set_assessment_published(self, identifier: str, fhir_id: str, at: datetime) -> None: ...

    def set_assessment_outcome(
        self,
        identifier: str,
        status: AssessmentStatus,
        outcome: Outcome,
        reason: str,
        next_attempt_at: datetime | None,
    ) -> None: ...

    def assessments_due(self, now: datetime, limit: int = 100) -> list[str]: ...

    def lease_due_assessments(self, now: datetime, until: datetime, limit: int = 100) -> list[str]: ...

    def prune_superseded_assessments(self, before: datetime, batch_size: int, *, dry_run: bool = False) -> int:
        """Delete assessments that a newer one superseded and that were scored before ``before`` (none being
        published). Returns how many (would) go."""
        ...

    # -- failures and summaries --
    def record_failure(
        self,
        stage: str,
        subject: str,
        outcome: Outcome,
        message: str,
        retryable: bool,
        details: dict[str, Any] | None = None,
    ) -> None:
        """One open row per (stage, subject, outcome): a repeat counts ``occurrences`` and moves ``last_seen_at``
        (refreshing message, details, retryable) instead of adding a row."""
        ...

    def resolve_failures(self, stage: str, subject: str, now: datetime) -> None: ...

    def prune_resolved_failures(self, before: datetime, batch_size: int, *, dry_run: bool = False) -> int:
        """Delete failures resolved before ``before`` (open ones stay). Returns how many (would) go."""
        ...

    def counts(self) -> dict[str, dict[str, int]]:
        """Studies, patients and assessments by status; open failures by outcome (``open_failures``: rows, i.e.
        distinct problems; ``open_failure_occurrences``: how often they were seen)."""
        ...

    # -- stage timings (``domain.stages``) --
    def observe_stages(self, observations: Sequence[Observation]) -> None:
        """Add (stage, seconds) observations to the cumulative histogram every process shares: one counter row per
        stage and bucket, incremented atomically (concurrent writers never lose an increment), in one statement."""
        ...

    def stage_histograms(self) -> list[StageHistogram]:
        """The cumulative histogram of every stage (``domain.stages.STAGES``), zeros for those never observed."""
        ...

    def snapshot_stages(self, now: datetime, every_s: float, keep: int) -> bool:
        """Keep a copy of the stage histogram at ``now`` unless the newest is under ``every_s`` old; at most
        ``keep`` copies are kept (the oldest go). True when a copy was added."""
        ...

    def stage_snapshots(self, limit: int) -> list[StageSnapshot]:
        """The newest ``limit`` copies, oldest first (``domain.latency``)."""
        ...

    def mark_study_published(self, uid: str, at: datetime) -> datetime | None:
        """The first RiskAssessment based on the study was written at ``at``. Returns when the study became complete
        (``completed_at``, else when it was first seen) to the one caller that marks it (a conditional UPDATE);
        None when it was marked before (a republish, a re-scoring) or the study is unknown."""
        ...




class Spool(Protocol):
    """Where instances pushed by C-STORE are kept until their study is ingested (``data_dir/spool``).

    The writing side, for the SCP. ``put`` is durable when it returns (written, flushed, renamed into place, its
    directory flushed), so an instance acknowledged after it is never lost. The same spool is read through the
    ``Pacs`` port (``list_series``/``retrieve_series``) by the ingest of a study registered from it.
    """

    def parse(self, received: ReceivedInstance) -> InstanceHeader:
        """The UIDs and image size the data set declares (header only). DomainError for an unreadable data set."""
        ...

    def contains(self, header: InstanceHeader) -> bool:
        """Whether this SOP instance of this study and series is kept already (a duplicate)."""
        ...

    def usage(self, study_uid: str, series_uid: str) -> tuple[int, int]:
        """(image planes, bytes) the series holds in the spool: what the series limits are checked against."""
        ...

    def free_bytes(self) -> int:
        """Free space of the file system the spool is on."""
        ...

    def reopen(self, study_uid: str) -> None:
        """New instances are coming for a study marked complete: drop the mark (durably) before they are written."""
        ...

    def put(self, header: InstanceHeader, received: ReceivedInstance) -> bool:
        """Keep the instance as a DICOM file; True when new, False when it was there already. OSError when it
        cannot be written (disk full)."""
        ...

    def study_ref(self, study_uid: str) -> StudyRef | None:
        """The study as its instances describe it (patient, date, modalities); None when the spool holds none."""
        ...

    def mark_complete(self, study_uid: str) -> None:
        """The study was completed and registered (durably): not pending at the next start."""
        ...

    def studies(self, *, pending_only: bool = False) -> list[SpooledStudy]:
        """Every study the spool holds (retention), or only those not marked complete (recovery at start-up)."""
        ...

    def remove(self, key: str, not_after: datetime, *, dry_run: bool = False) -> int:
        """Delete the study kept under ``key`` (``SpooledStudy.key``) unless an instance of it was written after
        ``not_after`` (checked while writers wait). Returns how many files (would) go."""
        ...

    def remove_partial(self, before: datetime, *, dry_run: bool = False) -> int:
        """Writes (and removals) that a killed process left half done before ``before``. Returns how many."""
        ...


class BrokerMessages(Protocol):
    """The embedded broker's message table (kombu's SQLAlchemy transport keeps every delivered message)."""

    def delete_delivered(self, before: datetime, batch_size: int, *, dry_run: bool = False) -> int:
        """Delete messages delivered before ``before``; returns how many (would) go."""
        ...


class Probe(Protocol):
    """One peer checked with the client, credentials and settings the engine itself uses (``strokewatch doctor``,
    ``/health/ready``). Never raises for the peer's fault: each result says what is wrong and which
    ``STROKEWATCH_*`` setting to change. ``quick`` (readiness): one cheap request, one result."""

    @property
    def name(self) -> str:
        """What the first result is called ("database", "pacs", ...), also used when the probe times out."""
        ...

    def probe(self, *, quick: bool) -> list[CheckResult]: ...


class ExportCatalogue(Protocol):
    """What the engine's record says about whom it scored, for the de-identified export (``services.deid``)."""

    def assessed_patients(self) -> list[str]:
        """FHIR ids of the patients the engine has scored (any assessment recorded), sorted."""
        ...

    def patient_studies(self, fhir_id: str) -> list[str]:
        """Study UIDs the engine matched to the patient (studies ready for scoring), oldest first."""
        ...


class ExportTarget(Protocol):
    """Where a de-identified export is written: nothing is visible under the output path until ``commit``."""

    def add_instance(self, dataset: Dataset, patient: PatientContext) -> tuple[str, str, str]:
        """De-identify the instance (PS3.15 Annex E) and write it. Returns its new (study, series, SOP instance)
        UIDs. DomainError (not retryable) when the instance is not exportable (SOP class, burned-in annotation)."""
        ...

    def add_resource(self, resource: dict[str, Any]) -> None:
        """Append an already de-identified FHIR resource to its type's NDJSON file."""
        ...

    def commit(self, manifest: dict[str, Any]) -> str:
        """Write the manifest (with every file's SHA-256) and put the export in place at once; returns its path."""
        ...

    def abort(self) -> None:
        """Remove what was written (an export that failed leaves nothing behind)."""
        ...
