"""SQLAlchemy 2 models: the engine's record of what it saw, chose, wrote and why it failed.

Migrations live in integration/adapters/db/migrations (Alembic); ``alembic upgrade head`` or
``strokewatch db upgrade`` (also run by ``strokewatch run``) creates/updates the schema.
PHI lives only here (DICOM PatientID, FHIR ids), never in logs.
"""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator


def utcnow() -> datetime:
    return datetime.now(UTC)


class UtcDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite stores naive values)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: object) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: object) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    pass


class Study(Base):
    """A study seen on the PACS. ``status`` moves detected -> processing -> ready | held | failed."""

    __tablename__ = "studies"
    #: The EHR poll's "studies seen in the window" range (services.sweep.poll_ehr).
    __table_args__ = (Index("ix_studies_status_detected_at", "status", "detected_at"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    study_uid: Mapped[str] = mapped_column(String(64), unique=True)
    dicom_patient_id: Mapped[str | None] = mapped_column(String(64))
    issuer: Mapped[str | None] = mapped_column(String(64))
    study_datetime: Mapped[datetime | None] = mapped_column(UtcDateTime())
    source: Mapped[str] = mapped_column(String(32), default="qido")  # qido | orthanc-changes | api | cli
    status: Mapped[str] = mapped_column(String(24), default="detected", index=True)
    outcome: Mapped[str | None] = mapped_column(String(48))
    reason: Mapped[str | None] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime | None] = mapped_column(UtcDateTime())
    claimed_at: Mapped[datetime | None] = mapped_column(UtcDateTime())
    lost_claims: Mapped[int] = mapped_column(Integer, default=0, server_default="0")  # claims of dead workers
    chosen_series_uid: Mapped[str | None] = mapped_column(String(64))
    modality: Mapped[str | None] = mapped_column(String(8))
    patient_fhir_id: Mapped[str | None] = mapped_column(String(128), index=True)
    volume_path: Mapped[str | None] = mapped_column(Text)
    volume_sha256: Mapped[str | None] = mapped_column(String(64))
    detected_at: Mapped[datetime] = mapped_column(UtcDateTime(), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime(), default=utcnow, onupdate=utcnow)
    #: When the study became complete (Orthanc's StableStudy event, the C-STORE association's release); NULL when
    #: unknown (QIDO-RS polling, webhooks): the end-to-end time then starts at ``detected_at``.
    completed_at: Mapped[datetime | None] = mapped_column(UtcDateTime())
    #: When the first RiskAssessment based on it was written: set once, so its end-to-end time is counted once.
    first_published_at: Mapped[datetime | None] = mapped_column(UtcDateTime())


class SeriesDecisionRow(Base):
    __tablename__ = "series_decisions"
    __table_args__ = (UniqueConstraint("study_uid", "series_uid"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    study_uid: Mapped[str] = mapped_column(ForeignKey("studies.study_uid", ondelete="CASCADE"), index=True)
    series_uid: Mapped[str] = mapped_column(String(64))
    modality: Mapped[str] = mapped_column(String(16))
    n_instances: Mapped[int] = mapped_column(Integer)
    eligible: Mapped[bool] = mapped_column(Boolean)
    chosen: Mapped[bool] = mapped_column(Boolean, default=False)
    reason: Mapped[str] = mapped_column(Text)


class Patient(Base):
    """A FHIR Patient the engine follows; vitals are synced incrementally from ``vitals_cursor``."""

    __tablename__ = "patients"

    id: Mapped[int] = mapped_column(primary_key=True)
    fhir_id: Mapped[str] = mapped_column(String(128), unique=True)
    birth_date: Mapped[str | None] = mapped_column(String(10))
    gender: Mapped[str | None] = mapped_column(String(16))
    vitals_cursor: Mapped[datetime | None] = mapped_column(UtcDateTime())  # max meta.lastUpdated seen
    vitals_synced_at: Mapped[datetime | None] = mapped_column(UtcDateTime())
    status: Mapped[str] = mapped_column(String(24), default="idle", index=True)  # idle | assessing
    needs_assessment: Mapped[bool] = mapped_column(Boolean, default=False, index=True)
    claimed_at: Mapped[datetime | None] = mapped_column(UtcDateTime())
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime | None] = mapped_column(UtcDateTime())
    lost_claims: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    vitals_attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    vitals_next_attempt_at: Mapped[datetime | None] = mapped_column(UtcDateTime())
    outcome: Mapped[str | None] = mapped_column(String(48))
    reason: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime(), default=utcnow)


class VitalRow(Base):
    """One accepted vital value in the contract's canonical unit (latest version of its Observation)."""

    __tablename__ = "vitals"
    __table_args__ = (
        UniqueConstraint("patient_fhir_id", "observation_id", "feature", name="uq_vitals_patient_observation_feature"),
        Index("ix_vitals_patient_time", "patient_fhir_id", "effective"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    patient_fhir_id: Mapped[str] = mapped_column(String(128))
    observation_id: Mapped[str] = mapped_column(String(128))
    feature: Mapped[str] = mapped_column(String(16))
    value: Mapped[float] = mapped_column(Float)
    effective: Mapped[datetime] = mapped_column(UtcDateTime())


class Assessment(Base):
    """A scored assessment and where it was written. ``identifier`` is deterministic (see domain.identity)."""

    __tablename__ = "assessments"

    id: Mapped[int] = mapped_column(primary_key=True)
    identifier: Mapped[str] = mapped_column(String(80), unique=True)
    patient_fhir_id: Mapped[str] = mapped_column(String(128), index=True)
    study_uid: Mapped[str | None] = mapped_column(String(64))
    window_end: Mapped[datetime] = mapped_column(UtcDateTime())
    model_version: Mapped[str] = mapped_column(String(32))
    runtime: Mapped[str] = mapped_column(String(64))
    trained: Mapped[bool] = mapped_column(Boolean)
    probability: Mapped[float] = mapped_column(Float)
    band: Mapped[str] = mapped_column(String(16))
    input_fingerprint: Mapped[str] = mapped_column(String(64))
    n_vitals: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(24), default="scored", index=True)  # scored|publishing|published|failed
    resource: Mapped[dict[str, object]] = mapped_column(JSON)
    fhir_id: Mapped[str | None] = mapped_column(String(128))
    supersedes_identifier: Mapped[str | None] = mapped_column(String(80))
    superseded: Mapped[bool] = mapped_column(Boolean, default=False)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime | None] = mapped_column(UtcDateTime())
    claimed_at: Mapped[datetime | None] = mapped_column(UtcDateTime())
    lost_claims: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    outcome: Mapped[str | None] = mapped_column(String(48))
    reason: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime(), default=utcnow)
    published_at: Mapped[datetime | None] = mapped_column(UtcDateTime())


class Failure(Base):
    """Named failures, kept for audit even after a retry succeeds (``resolved_at`` set then).

    One open row per (stage, subject, outcome): a repeat of the same problem counts ``occurrences`` and moves
    ``last_seen_at`` instead of adding a row, so an idle engine re-polling the same bad value stays bounded.
    """

    __tablename__ = "failures"
    __table_args__ = (
        Index(
            "uq_failures_open",
            "stage",
            "subject",
            "outcome",
            unique=True,
            postgresql_where=text("resolved_at IS NULL"),
            sqlite_where=text("resolved_at IS NULL"),
        ),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    stage: Mapped[str] = mapped_column(String(24), index=True)  # detect|ingest|vitals|assess|publish|scp
    subject: Mapped[str] = mapped_column(String(128), index=True)  # study UID, patient FHIR id, identifier
    outcome: Mapped[str] = mapped_column(String(48), index=True)
    message: Mapped[str] = mapped_column(Text)
    retryable: Mapped[bool] = mapped_column(Boolean)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime(), default=utcnow)
    occurrences: Mapped[int] = mapped_column(Integer, default=1, server_default="1")
    last_seen_at: Mapped[datetime | None] = mapped_column(UtcDateTime())
    resolved_at: Mapped[datetime | None] = mapped_column(UtcDateTime(), index=True)
    details: Mapped[dict[str, object] | None] = mapped_column(JSON)


class Cursor(Base):
    """Persisted positions in external feeds (Orthanc /changes, QIDO last poll)."""

    __tablename__ = "cursors"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text)
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime(), default=utcnow, onupdate=utcnow)


class StageBucket(Base):
    """One bucket of the stage-duration histogram (``domain.stages``), shared by every process and host: the
    observations of ``stage`` that fell in the bucket with upper bound ``le`` (not cumulative) and their summed
    seconds. Only ever incremented (INSERT ... ON CONFLICT DO UPDATE), so the counters are monotonic as Prometheus
    requires; at most stages x buckets rows."""

    __tablename__ = "stage_seconds"

    stage: Mapped[str] = mapped_column(String(24), primary_key=True)
    le: Mapped[str] = mapped_column(String(16), primary_key=True)  # "0.005" ... "60.0", "+Inf"
    observations: Mapped[int] = mapped_column(BigInteger)
    seconds: Mapped[float] = mapped_column(Float)


class StageSnapshotRow(Base):
    """A copy of the whole stage histogram (``stage_seconds``) at one time, for the dashboard's latency
    percentiles over time (``domain.latency``): the sweep adds one every ``dashboard.latency_snapshot_s`` and
    deletes beyond ``dashboard.latency_snapshots_kept``, so the table is a bounded ring."""

    __tablename__ = "stage_snapshots"

    id: Mapped[int] = mapped_column(primary_key=True)
    taken_at: Mapped[datetime] = mapped_column(UtcDateTime(), index=True)
    #: stage -> {"counts": cumulative counts per bucket (+Inf last), "sum": seconds}
    histograms: Mapped[dict[str, object]] = mapped_column(JSON)
