"""The Store port (``integration.ports.Store``) on SQLAlchemy.

Every state change is a short transaction; claims are conditional UPDATEs; reads return the domain's
records (``integration.domain.records``), never ORM rows, so nothing outside this package sees a session.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Engine, delete, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from integration.adapters.db.models import (
    Assessment,
    Cursor,
    Failure,
    Patient,
    SeriesDecisionRow,
    Study,
    VitalRow,
)
from integration.adapters.db.rows import assessment_record, patient_record, study_record
from integration.domain.records import (
    STUDY_CLAIMABLE,
    AssessmentRecord,
    AssessmentStatus,
    BuiltVolume,
    NewAssessment,
    PatientRecord,
    StudyRecord,
    StudyStatus,
)
from integration.domain.types import Outcome, SeriesDecision, StudyRef, VitalValue


class SqlStore:
    """``integration.ports.Store`` on a SQLAlchemy engine (SQLite embedded, PostgreSQL distributed)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.sessions: sessionmaker[Session] = sessionmaker(engine, expire_on_commit=False)

    # -- cursors ----------------------------------------------------------------------
    def get_cursor(self, name: str) -> str | None:
        with self.sessions() as s:
            row = s.get(Cursor, name)
            return row.value if row else None

    def set_cursor(self, name: str, value: str) -> None:
        with self.sessions.begin() as s:
            row = s.get(Cursor, name)
            if row:
                row.value = value
            else:
                s.add(Cursor(name=name, value=value))

    # -- studies ----------------------------------------------------------------------
    def add_study(self, ref: StudyRef, source: str, now: datetime) -> bool:
        """Record a newly seen study. False if it was already known (de-duplication by StudyInstanceUID)."""
        try:
            with self.sessions.begin() as s:
                s.add(
                    Study(
                        study_uid=ref.study_uid,
                        dicom_patient_id=ref.patient_id or None,
                        issuer=ref.issuer,
                        study_datetime=ref.study_datetime,
                        source=source,
                        detected_at=now,
                    )
                )
            return True
        except IntegrityError:
            return False

    def known_studies(self, uids: Iterable[str]) -> set[str]:
        uids = list(uids)
        if not uids:
            return set()
        with self.sessions() as s:
            return set(s.scalars(select(Study.study_uid).where(Study.study_uid.in_(uids))))

    def get_study(self, uid: str) -> StudyRecord | None:
        with self.sessions() as s:
            return study_record(s.scalar(select(Study).where(Study.study_uid == uid)))

    def claim_study(self, uid: str, now: datetime) -> bool:
        with self.sessions.begin() as s:
            res = s.execute(
                update(Study)
                .where(Study.study_uid == uid, Study.status.in_([st.value for st in STUDY_CLAIMABLE]))
                .values(status="processing", claimed_at=now, attempts=Study.attempts + 1)
            )
            return bool(res.rowcount == 1)  # type: ignore[attr-defined]

    def _update_study(self, uid: str, **values: Any) -> None:
        with self.sessions.begin() as s:
            s.execute(update(Study).where(Study.study_uid == uid).values(**values))

    def set_study_volume(self, uid: str, volume: BuiltVolume) -> None:
        self._update_study(
            uid,
            volume_path=volume.path,
            volume_sha256=volume.sha256,
            chosen_series_uid=volume.series_uid,
            modality=volume.modality,
        )

    def set_study_ready(self, uid: str, patient_fhir_id: str) -> None:
        self._update_study(
            uid,
            status=StudyStatus.READY.value,
            outcome=None,
            reason=None,
            patient_fhir_id=patient_fhir_id,
            next_attempt_at=None,
            claimed_at=None,
        )

    def set_study_outcome(
        self, uid: str, status: StudyStatus, outcome: Outcome, reason: str, next_attempt_at: datetime | None
    ) -> None:
        self._update_study(
            uid,
            status=status.value,
            outcome=outcome.value,
            reason=reason,
            next_attempt_at=next_attempt_at,
            claimed_at=None,
        )

    def requeue_study(self, uid: str) -> bool:
        with self.sessions.begin() as s:
            res = s.execute(
                update(Study)
                .where(Study.study_uid == uid, Study.status != StudyStatus.PROCESSING.value)
                .values(status=StudyStatus.RETRY.value, next_attempt_at=None, attempts=0)
            )
            return bool(res.rowcount == 1)  # type: ignore[attr-defined]

    def record_series_decisions(
        self, uid: str, decisions: Sequence[SeriesDecision], chosen_uid: str | None
    ) -> None:
        with self.sessions.begin() as s:
            existing = {
                r.series_uid: r for r in s.scalars(select(SeriesDecisionRow).where(SeriesDecisionRow.study_uid == uid))
            }
            for d in decisions:
                row = existing.get(d.series.series_uid) or SeriesDecisionRow(
                    study_uid=uid, series_uid=d.series.series_uid
                )
                row.modality = d.series.modality
                row.n_instances = d.series.n_instances
                row.eligible = d.eligible
                row.chosen = d.series.series_uid == chosen_uid
                row.reason = d.reason
                s.add(row)

    def studies_due(self, now: datetime, limit: int = 100, grace_s: float = 30.0) -> list[str]:
        """Studies waiting for (another) attempt whose time has come.

        Freshly detected studies were enqueued when detected; they count as due only after ``grace_s``
        (their message was lost, or the broker restarted).
        """
        fresh_before = now - timedelta(seconds=grace_s)
        with self.sessions() as s:
            q = (
                select(Study.study_uid)
                .where(
                    Study.status.in_([st.value for st in STUDY_CLAIMABLE]),
                    (Study.next_attempt_at.is_(None)) | (Study.next_attempt_at <= now),
                    (Study.status != "detected") | (Study.detected_at < fresh_before),
                )
                .limit(limit)
            )
            return list(s.scalars(q))

    def release_stale_claims(self, older_than: datetime) -> int:
        """Reaper: a worker that died mid-task leaves 'processing'; put such rows back in the queue."""
        n = 0
        with self.sessions.begin() as s:
            for model in (Study,):
                res = s.execute(
                    update(model)
                    .where(model.status == "processing", model.claimed_at < older_than)
                    .values(status="retry", next_attempt_at=None)
                )
                n += res.rowcount  # type: ignore[attr-defined]
            res = s.execute(
                update(Patient)
                .where(Patient.status == "assessing", Patient.claimed_at < older_than)
                .values(status="idle", needs_assessment=True)
            )
            n += res.rowcount  # type: ignore[attr-defined]
            res = s.execute(
                update(Assessment)
                .where(Assessment.status == "publishing", Assessment.claimed_at < older_than)
                .values(status="scored")
            )
            n += res.rowcount  # type: ignore[attr-defined]
        return int(n)

    def latest_ready_study(self, patient_fhir_id: str) -> StudyRecord | None:
        with self.sessions() as s:
            q = (
                select(Study)
                .where(Study.patient_fhir_id == patient_fhir_id, Study.status == "ready")
                .order_by(Study.study_datetime.desc().nulls_last(), Study.id.desc())
                .limit(1)
            )
            return study_record(s.scalar(q))

    def held_patient_keys(self, limit: int = 1000) -> list[tuple[str | None, str]]:
        """Distinct (IssuerOfPatientID, PatientID) of studies held for an unmatched patient."""
        with self.sessions() as s:
            q = (
                select(Study.issuer, Study.dicom_patient_id)
                .where(Study.status == "held", Study.dicom_patient_id.is_not(None))
                .distinct()
                .limit(limit)
            )
            return [(issuer, pid) for issuer, pid in s.execute(q) if pid is not None]

    def release_held_studies(self, dicom_patient_id: str, issuer: str | None) -> list[str]:
        """Held studies of this patient back to 'retry', due now (conditional: only rows still held)."""
        with self.sessions.begin() as s:
            q = select(Study.study_uid).where(
                Study.dicom_patient_id == dicom_patient_id,
                Study.issuer.is_(None) if issuer is None else Study.issuer == issuer,
                Study.status == "held",
            )
            uids = list(s.scalars(q))
            if uids:
                s.execute(
                    update(Study)
                    .where(Study.study_uid.in_(uids), Study.status == "held")
                    .values(status="retry", next_attempt_at=None)
                )
            return uids

    # -- patients ---------------------------------------------------------------------
    def upsert_patient(self, fhir_id: str, birth_date: str | None, gender: str | None) -> None:
        with self.sessions.begin() as s:
            row = s.scalar(select(Patient).where(Patient.fhir_id == fhir_id))
            if row is None:
                try:
                    with s.begin_nested():
                        s.add(Patient(fhir_id=fhir_id, birth_date=birth_date, gender=gender))
                except IntegrityError:
                    pass
            else:
                row.birth_date, row.gender = birth_date, gender

    def get_patient(self, fhir_id: str) -> PatientRecord | None:
        with self.sessions() as s:
            return patient_record(s.scalar(select(Patient).where(Patient.fhir_id == fhir_id)))

    def all_patient_ids(self) -> list[str]:
        with self.sessions() as s:
            return list(s.scalars(select(Patient.fhir_id)))

    def mark_needs_assessment(self, fhir_id: str) -> None:
        with self.sessions.begin() as s:
            s.execute(update(Patient).where(Patient.fhir_id == fhir_id).values(needs_assessment=True))

    def patients_due(self, now: datetime, limit: int) -> list[str]:
        """Patients to score: flagged, idle, past any backoff, and with vitals synced since their last study."""
        with self.sessions() as s:
            q = (
                select(Patient.fhir_id)
                .where(
                    Patient.needs_assessment.is_(True),
                    Patient.vitals_synced_at.is_not(None),
                    Patient.status == "idle",
                    (Patient.next_attempt_at.is_(None)) | (Patient.next_attempt_at <= now),
                )
                .order_by(Patient.id)
                .limit(limit)
            )
            return list(s.scalars(q))

    def claim_patient(self, fhir_id: str, now: datetime) -> bool:
        with self.sessions.begin() as s:
            res = s.execute(
                update(Patient)
                .where(Patient.fhir_id == fhir_id, Patient.status == "idle", Patient.needs_assessment.is_(True))
                .values(status="assessing", claimed_at=now, needs_assessment=False, attempts=Patient.attempts + 1)
            )
            return bool(res.rowcount == 1)  # type: ignore[attr-defined]

    def release_patient(
        self, fhir_id: str, *, retry_at: datetime | None = None, outcome: str | None = None, reason: str | None = None
    ) -> None:
        values: dict[str, Any] = {"status": "idle", "claimed_at": None, "outcome": outcome, "reason": reason}
        if retry_at is not None:
            values.update(needs_assessment=True, next_attempt_at=retry_at)
        else:
            values.update(attempts=0, next_attempt_at=None)
        with self.sessions.begin() as s:
            s.execute(update(Patient).where(Patient.fhir_id == fhir_id).values(**values))

    def require_vitals_sync(self, fhir_id: str) -> None:
        """New imaging for the patient: sync vitals (and then assess) before scoring again."""
        with self.sessions.begin() as s:
            s.execute(update(Patient).where(Patient.fhir_id == fhir_id).values(vitals_synced_at=None))

    def patients_needing_vitals(self, limit: int = 1000) -> list[str]:
        with self.sessions() as s:
            return list(s.scalars(select(Patient.fhir_id).where(Patient.vitals_synced_at.is_(None)).limit(limit)))

    def set_vitals_cursor(self, fhir_id: str, cursor: datetime | None, synced_at: datetime) -> None:
        with self.sessions.begin() as s:
            values: dict[str, Any] = {"vitals_synced_at": synced_at}
            if cursor is not None:
                values["vitals_cursor"] = cursor
            s.execute(update(Patient).where(Patient.fhir_id == fhir_id).values(**values))

    # -- vitals -----------------------------------------------------------------------
    def replace_vitals(
        self, fhir_id: str, values: Sequence[VitalValue], removed_observation_ids: Iterable[str]
    ) -> int:
        """Upsert values by (observation, feature); drop rows of Observations now excluded. Returns #changed."""
        changed = 0
        with self.sessions.begin() as s:
            removed = list(set(removed_observation_ids))
            if removed:
                res = s.execute(
                    delete(VitalRow).where(VitalRow.patient_fhir_id == fhir_id, VitalRow.observation_id.in_(removed))
                )
                changed += res.rowcount  # type: ignore[attr-defined]
            ids = list({v.observation_id for v in values})
            existing: dict[tuple[str, str], VitalRow] = {}
            for start in range(0, len(ids), 500):
                chunk = ids[start : start + 500]
                for row in s.scalars(select(VitalRow).where(VitalRow.observation_id.in_(chunk))):
                    existing[(row.observation_id, row.feature)] = row
            for v in values:
                found = existing.get((v.observation_id, v.feature))
                if found is None:
                    row = VitalRow(
                        patient_fhir_id=fhir_id,
                        observation_id=v.observation_id,
                        feature=v.feature,
                        value=v.value,
                        effective=v.effective,
                    )
                    s.add(row)
                    existing[(v.observation_id, v.feature)] = row
                    changed += 1
                elif found.value != v.value or found.effective != v.effective:
                    found.value, found.effective = v.value, v.effective
                    changed += 1
        return changed

    def vitals_between(self, fhir_id: str, start: datetime, end: datetime) -> list[VitalValue]:
        with self.sessions() as s:
            q = (
                select(VitalRow)
                .where(VitalRow.patient_fhir_id == fhir_id, VitalRow.effective > start, VitalRow.effective <= end)
                .order_by(VitalRow.effective)
            )
            return [VitalValue(r.feature, r.value, r.effective, r.observation_id) for r in s.scalars(q)]

    def latest_vital_time(self, fhir_id: str, not_after: datetime) -> datetime | None:
        with self.sessions() as s:
            return s.scalar(
                select(func.max(VitalRow.effective)).where(
                    VitalRow.patient_fhir_id == fhir_id, VitalRow.effective <= not_after
                )
            )

    # -- assessments ------------------------------------------------------------------
    def get_assessment(self, identifier: str) -> AssessmentRecord | None:
        with self.sessions() as s:
            return assessment_record(s.scalar(select(Assessment).where(Assessment.identifier == identifier)))

    def latest_assessment(self, fhir_id: str) -> AssessmentRecord | None:
        with self.sessions() as s:
            q = (
                select(Assessment)
                .where(Assessment.patient_fhir_id == fhir_id, Assessment.superseded.is_(False))
                .order_by(Assessment.id.desc())
                .limit(1)
            )
            return assessment_record(s.scalar(q))

    def add_assessment(self, new: NewAssessment) -> bool:
        """Insert; False if an assessment with this identifier already exists."""
        row = Assessment(
            identifier=new.identifier,
            patient_fhir_id=new.patient_fhir_id,
            study_uid=new.study_uid,
            window_end=new.window_end,
            model_version=new.model_version,
            runtime=new.runtime,
            trained=new.trained,
            probability=new.probability,
            band=new.band,
            input_fingerprint=new.input_fingerprint,
            n_vitals=new.n_vitals,
            resource=new.resource,
            supersedes_identifier=new.supersedes_identifier,
        )
        try:
            with self.sessions.begin() as s:
                if row.supersedes_identifier:
                    s.execute(
                        update(Assessment)
                        .where(Assessment.identifier == row.supersedes_identifier)
                        .values(superseded=True)
                    )
                s.add(row)
            return True
        except IntegrityError:
            return False

    def claim_assessment(self, identifier: str, now: datetime) -> bool:
        with self.sessions.begin() as s:
            res = s.execute(
                update(Assessment)
                .where(Assessment.identifier == identifier, Assessment.status.in_(("scored", "retry")))
                .values(status="publishing", claimed_at=now, attempts=Assessment.attempts + 1)
            )
            return bool(res.rowcount == 1)  # type: ignore[attr-defined]

    def _update_assessment(self, identifier: str, **values: Any) -> None:
        with self.sessions.begin() as s:
            s.execute(update(Assessment).where(Assessment.identifier == identifier).values(**values))

    def set_assessment_published(self, identifier: str, fhir_id: str, at: datetime) -> None:
        self._update_assessment(
            identifier,
            status=AssessmentStatus.PUBLISHED.value,
            fhir_id=fhir_id,
            published_at=at,
            outcome=None,
            reason=None,
            claimed_at=None,
        )

    def set_assessment_outcome(
        self,
        identifier: str,
        status: AssessmentStatus,
        outcome: Outcome,
        reason: str,
        next_attempt_at: datetime | None,
    ) -> None:
        self._update_assessment(
            identifier,
            status=status.value,
            outcome=outcome.value,
            reason=reason,
            next_attempt_at=next_attempt_at,
            claimed_at=None,
        )

    def assessments_due(self, now: datetime, limit: int = 100) -> list[str]:
        with self.sessions() as s:
            q = (
                select(Assessment.identifier)
                .where(
                    Assessment.status.in_(("scored", "retry")),
                    (Assessment.next_attempt_at.is_(None)) | (Assessment.next_attempt_at <= now),
                )
                .limit(limit)
            )
            return list(s.scalars(q))

    # -- failures ---------------------------------------------------------------------
    def record_failure(
        self,
        stage: str,
        subject: str,
        outcome: Outcome,
        message: str,
        retryable: bool,
        details: dict[str, Any] | None = None,
    ) -> None:
        with self.sessions.begin() as s:
            s.add(
                Failure(
                    stage=stage,
                    subject=subject,
                    outcome=outcome.value,
                    message=message,
                    retryable=retryable,
                    details=details,
                )
            )

    def resolve_failures(self, stage: str, subject: str, now: datetime) -> None:
        with self.sessions.begin() as s:
            s.execute(
                update(Failure)
                .where(Failure.stage == stage, Failure.subject == subject, Failure.resolved_at.is_(None))
                .values(resolved_at=now)
            )

    # -- summaries --------------------------------------------------------------------
    def counts(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        with self.sessions() as s:
            for name, col in (
                ("studies", Study.status),
                ("patients", Patient.status),
                ("assessments", Assessment.status),
            ):
                rows = s.execute(select(col, func.count()).group_by(col)).all()
                out[name] = {str(k): int(v) for k, v in rows}
            rows = s.execute(
                select(Failure.outcome, func.count()).where(Failure.resolved_at.is_(None)).group_by(Failure.outcome)
            ).all()
            out["open_failures"] = {str(k): int(v) for k, v in rows}
        return out
