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
    StageBucket,
    StageSnapshotRow,
    Study,
    VitalRow,
    utcnow,
)
from integration.adapters.db.rows import assessment_record, patient_record, study_record
from integration.domain import latency, stages
from integration.domain.records import (
    STUDY_CLAIMABLE,
    AssessmentRecord,
    AssessmentStatus,
    BuiltVolume,
    NewAssessment,
    PatientRecord,
    ReleasedClaims,
    StudyRecord,
    StudyStatus,
)
from integration.domain.types import Outcome, SeriesDecision, StudyRef, VitalValue
from integration.domain.window import study_anchor


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
    def add_study(self, ref: StudyRef, source: str, now: datetime, completed_at: datetime | None = None) -> bool:
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
                        completed_at=completed_at,
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
            lost_claims=0,
        )

    def clear_study_volume(self, uid: str, path: str) -> bool:
        with self.sessions.begin() as s:
            res = s.execute(
                update(Study)
                .where(
                    Study.study_uid == uid,
                    Study.volume_path == path,
                    Study.status != StudyStatus.PROCESSING.value,
                )
                .values(volume_path=None)
            )
            return bool(res.rowcount == 1)  # type: ignore[attr-defined]

    def studies_with_volumes(self, detected_before: datetime, after_uid: str, limit: int) -> list[StudyRecord]:
        with self.sessions() as s:
            q = (
                select(Study)
                .where(
                    Study.volume_path.is_not(None),
                    Study.status.in_([StudyStatus.READY.value, StudyStatus.FAILED.value]),
                    Study.detected_at < detected_before,
                    Study.study_uid > after_uid,
                )
                .order_by(Study.study_uid)
                .limit(limit)
            )
            return [r for r in (study_record(row) for row in s.scalars(q)) if r is not None]

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
                .values(status=StudyStatus.RETRY.value, next_attempt_at=None, attempts=0, lost_claims=0)
            )
            return bool(res.rowcount == 1)  # type: ignore[attr-defined]

    def mark_study_published(self, uid: str, at: datetime) -> datetime | None:
        """One conditional UPDATE ... RETURNING: the first caller sets ``first_published_at`` and gets the study's
        completion time; a concurrent or later one matches no row (PostgreSQL re-checks the WHERE once the first
        commits)."""
        with self.sessions.begin() as s:
            row = s.execute(
                update(Study)
                .where(Study.study_uid == uid, Study.first_published_at.is_(None))
                .values(first_published_at=at)
                .returning(Study.completed_at, Study.detected_at)
            ).first()
        if row is None:
            return None
        completed, detected = row
        return completed or detected

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
        with self.sessions() as s:
            return list(s.scalars(select(Study.study_uid).where(*_studies_due(now, grace_s)).limit(limit)))

    def lease_due_studies(self, now: datetime, until: datetime, limit: int = 100, grace_s: float = 30.0) -> list[str]:
        """``studies_due``, taken for enqueueing: their ``next_attempt_at`` moves to ``until`` in the same statement
        (see ``_lease``). The claim checks the status only, so the queued message still claims the study."""
        return self._lease(Study, Study.study_uid, _studies_due(now, grace_s), "next_attempt_at", until, limit)

    def _lease(
        self,
        model: type[Study] | type[Patient] | type[Assessment],
        key: Any,
        due: Sequence[Any],
        column: str,
        until: datetime,
        limit: int,
        order: Sequence[Any] = (),
    ) -> list[str]:
        """Up to ``limit`` rows matching ``due``, leased: ``column`` (their next-attempt time) pushed to ``until``
        by one UPDATE ... WHERE due AND id IN (SELECT ... LIMIT, FOR UPDATE SKIP LOCKED on PostgreSQL) ...
        RETURNING. The outer WHERE re-checks ``due`` on the locked row, so two sweepers never take the same row,
        and a taken row is not due again before ``until``: its message is re-sent then only if it was lost."""
        picked = (
            select(model.id).where(*due).order_by(*order, model.id).limit(limit).with_for_update(skip_locked=True)
        )
        with self.sessions.begin() as s:
            rows = s.execute(update(model).where(model.id.in_(picked), *due).values({column: until}).returning(key))
            return [str(k) for k in rows.scalars()]

    def release_stale_claims(self, older_than: datetime, max_lost_claims: int = 3) -> ReleasedClaims:
        """Reaper: a worker that died mid-task (killed, out of memory, past Celery's hard time limit) leaves its
        claim. Each such row counts a lost claim: back in the queue, or failed as ``worker_lost`` at the limit.

        One transaction; each UPDATE is conditional on the claim still being stale, so two reapers never
        count the same loss twice. The rows given up are returned (UPDATE ... RETURNING) for the failure ledger.
        """
        failed, retry = StudyStatus.FAILED.value, StudyStatus.RETRY.value
        with self.sessions.begin() as s:
            studies = _reap(
                s, Study, Study.study_uid, StudyStatus.PROCESSING.value, older_than, max_lost_claims,
                give_up={"status": failed, "next_attempt_at": None},
                put_back={"status": retry, "next_attempt_at": None},
            )
            patients = _reap(
                s, Patient, Patient.fhir_id, "assessing", older_than, max_lost_claims,
                give_up={"status": "idle", "needs_assessment": False, "next_attempt_at": None},
                put_back={"status": "idle", "needs_assessment": True},
            )
            assessments = _reap(
                s, Assessment, Assessment.identifier, AssessmentStatus.PUBLISHING.value, older_than, max_lost_claims,
                give_up={"status": AssessmentStatus.FAILED.value, "next_attempt_at": None},
                put_back={"status": AssessmentStatus.SCORED.value},
            )
        given_up = (
            [("ingest", uid) for uid in studies[1]]
            + [("assess", fhir_id) for fhir_id in patients[1]]
            + [("publish", identifier) for identifier in assessments[1]]
        )
        return ReleasedClaims(studies[0] + patients[0] + assessments[0], tuple(given_up))

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

    def mark_needs_assessment(self, fhir_id: str) -> None:
        with self.sessions.begin() as s:
            s.execute(update(Patient).where(Patient.fhir_id == fhir_id).values(needs_assessment=True))

    def patients_due(self, now: datetime, limit: int) -> list[str]:
        """Patients to score: flagged, idle, past any backoff, and with vitals synced since their last study."""
        with self.sessions() as s:
            return list(s.scalars(select(Patient.fhir_id).where(*_patients_due(now)).order_by(Patient.id).limit(limit)))

    def lease_due_patients(self, now: datetime, until: datetime, limit: int) -> list[str]:
        """``patients_due``, taken for enqueueing (``next_attempt_at`` moves to ``until``; see ``_lease``)."""
        return self._lease(Patient, Patient.fhir_id, _patients_due(now), "next_attempt_at", until, limit)

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
            values.update(attempts=0, next_attempt_at=None, lost_claims=0)
        with self.sessions.begin() as s:
            s.execute(update(Patient).where(Patient.fhir_id == fhir_id).values(**values))

    def requeue_patient(self, fhir_id: str) -> bool:
        with self.sessions.begin() as s:
            res = s.execute(
                update(Patient)
                .where(Patient.fhir_id == fhir_id, Patient.status != "assessing")
                .values(needs_assessment=True, attempts=0, lost_claims=0, next_attempt_at=None)
            )
            return bool(res.rowcount == 1)  # type: ignore[attr-defined]

    def require_vitals_sync(self, fhir_id: str, queued_until: datetime | None = None) -> None:
        """New imaging for the patient: sync vitals, then assess. The patient is flagged for scoring now (the sweep
        scores it once a sync has run, whoever ran it: a prefetch racing this call must not leave the new study
        unscored); ``queued_until`` leases the sync to the caller, who queues it (the sweep and the poll skip the
        patient until then)."""
        values: dict[str, Any] = {"vitals_synced_at": None, "needs_assessment": True}
        if queued_until is not None:
            values["vitals_next_attempt_at"] = queued_until
        with self.sessions.begin() as s:
            s.execute(update(Patient).where(Patient.fhir_id == fhir_id).values(**values))

    def patients_needing_vitals(self, now: datetime, limit: int = 1000) -> list[str]:
        """Patients whose vitals were never synced since their last study, past any sync backoff."""
        with self.sessions() as s:
            q = select(Patient.fhir_id).where(*_vitals_due(now), Patient.vitals_synced_at.is_(None)).limit(limit)
            return list(s.scalars(q))

    def lease_patients_needing_vitals(self, now: datetime, until: datetime, limit: int = 1000) -> list[str]:
        """``patients_needing_vitals``, taken for enqueueing (``vitals_next_attempt_at`` moves to ``until``)."""
        due = (*_vitals_due(now), Patient.vitals_synced_at.is_(None))
        return self._lease(Patient, Patient.fhir_id, due, "vitals_next_attempt_at", until, limit)

    def lease_patients_in_window(self, now: datetime, since: datetime, until: datetime, limit: int = 1000) -> list[str]:
        """Patients with a ready study taken at or after ``since`` (its anchor, ``min(study_datetime,
        detected_at)``), past any sync backoff and not already leased; least recently synced first, leased like
        ``lease_patients_needing_vitals``. Driven by the (status, detected_at) index: the anchor is never after
        detected_at, so only studies seen since ``since`` are read."""
        recent = select(Study.patient_fhir_id).where(
            Study.status == StudyStatus.READY.value,
            Study.detected_at >= since,
            Study.study_datetime.is_(None) | (Study.study_datetime >= since),
        )
        due = (*_vitals_due(now), Patient.fhir_id.in_(recent))
        order = (Patient.vitals_synced_at.asc().nulls_first(),)
        return self._lease(Patient, Patient.fhir_id, due, "vitals_next_attempt_at", until, limit, order)

    def set_vitals_retry(self, fhir_id: str, attempts: int, retry_at: datetime) -> None:
        """A failed vitals sync: its ``attempts``-th in a row; not due again before ``retry_at``."""
        with self.sessions.begin() as s:
            s.execute(
                update(Patient)
                .where(Patient.fhir_id == fhir_id)
                .values(vitals_attempts=attempts, vitals_next_attempt_at=retry_at)
            )

    def set_vitals_cursor(self, fhir_id: str, cursor: datetime | None, synced_at: datetime) -> None:
        with self.sessions.begin() as s:
            # a success ends any backoff of the sync (and the poll's lease)
            values: dict[str, Any] = {"vitals_synced_at": synced_at, "vitals_attempts": 0}
            values["vitals_next_attempt_at"] = None
            if cursor is not None:
                values["vitals_cursor"] = cursor
            s.execute(update(Patient).where(Patient.fhir_id == fhir_id).values(**values))

    # -- vitals -----------------------------------------------------------------------
    def replace_vitals(
        self, fhir_id: str, values: Sequence[VitalValue], removed_observation_ids: Iterable[str]
    ) -> int:
        """Upsert this patient's values by (observation, feature); drop rows of Observations now excluded.
        Returns #changed. Rows are matched within the patient only: another patient's Observation with the
        same id (another source, a reused id) is never touched."""
        changed = 0
        with self.sessions.begin() as s:
            removed = list(set(removed_observation_ids))
            if removed:
                res = s.execute(
                    delete(VitalRow).where(VitalRow.patient_fhir_id == fhir_id, VitalRow.observation_id.in_(removed))
                )
                changed += res.rowcount  # type: ignore[attr-defined]
            ids = list({v.observation_id for v in values})
            # Plain rows, not ORM objects: a first sync compares hundreds of values, a later one as many again.
            existing: dict[tuple[str, str], tuple[float, datetime]] = {}
            for start in range(0, len(ids), 500):
                chunk = ids[start : start + 500]
                found_rows = s.execute(
                    select(VitalRow.observation_id, VitalRow.feature, VitalRow.value, VitalRow.effective).where(
                        VitalRow.patient_fhir_id == fhir_id, VitalRow.observation_id.in_(chunk)
                    )
                )
                for observation_id, feature, value, effective in found_rows:
                    existing[(observation_id, feature)] = (value, effective)
            writes: dict[tuple[str, str], VitalValue] = {}
            for v in values:
                found = existing.get((v.observation_id, v.feature))
                if found is None or found != (v.value, v.effective):
                    writes[(v.observation_id, v.feature)] = v
            changed += len(writes)
            # INSERT ... ON CONFLICT DO UPDATE: a concurrent sync of the same patient (a redelivered message, the
            # sweep and the poll at once) that inserted the row first turns this insert into an update, never
            # into a unique-constraint error that would lose the whole sync.
            insert = _upsert_insert(self.engine.dialect.name)
            rows = [
                {
                    "patient_fhir_id": fhir_id,
                    "observation_id": v.observation_id,
                    "feature": v.feature,
                    "value": v.value,
                    "effective": v.effective,
                }
                for v in writes.values()
            ]
            if rows:  # one Core statement (not the ORM's bulk path) for every row: the driver batches it
                stmt = insert(VitalRow.__table__)
                stmt = stmt.on_conflict_do_update(
                    index_elements=[VitalRow.patient_fhir_id, VitalRow.observation_id, VitalRow.feature],
                    set_={"value": stmt.excluded.value, "effective": stmt.excluded.effective},
                )
                s.execute(stmt, rows)
        return changed

    def vitals_between(self, fhir_id: str, start: datetime, end: datetime) -> list[VitalValue]:
        with self.sessions() as s:
            q = (  # plain rows, not ORM objects: a window holds hundreds of values
                select(VitalRow.feature, VitalRow.value, VitalRow.effective, VitalRow.observation_id)
                .where(VitalRow.patient_fhir_id == fhir_id, VitalRow.effective > start, VitalRow.effective <= end)
                .order_by(VitalRow.effective)
            )
            return [VitalValue(*row) for row in s.execute(q)]

    def latest_vital_time(self, fhir_id: str, not_after: datetime) -> datetime | None:
        with self.sessions() as s:
            return s.scalar(
                select(func.max(VitalRow.effective)).where(
                    VitalRow.patient_fhir_id == fhir_id, VitalRow.effective <= not_after
                )
            )

    def prune_vitals(self, before: datetime, window: timedelta, batch_size: int, *, dry_run: bool = False) -> int:
        removed, after = 0, ""
        while True:
            with self.sessions() as s:
                q = (
                    select(VitalRow.patient_fhir_id)
                    .where(VitalRow.effective < before, VitalRow.patient_fhir_id > after)
                    .distinct()
                    .order_by(VitalRow.patient_fhir_id)
                    .limit(batch_size)
                )
                patients = list(s.scalars(q))
            for pid in patients:
                kept = [
                    ~((VitalRow.effective >= end - window) & (VitalRow.effective <= end))
                    for end in self._current_window_ends(pid)
                ]
                where = (VitalRow.patient_fhir_id == pid, VitalRow.effective < before, *kept)
                removed += self._delete_batched(VitalRow, where, batch_size, dry_run)
            if len(patients) < batch_size:
                return removed
            after = patients[-1]

    def _current_window_ends(self, fhir_id: str) -> list[datetime]:
        """Where the patient's current windows end: the latest input (what a re-scoring would read) and each
        current (non-superseded) assessment's window end."""
        study = self.latest_ready_study(fhir_id)
        with self.sessions() as s:
            newest = s.scalar(select(func.max(VitalRow.effective)).where(VitalRow.patient_fhir_id == fhir_id))
            ends = list(
                s.scalars(
                    select(Assessment.window_end).where(
                        Assessment.patient_fhir_id == fhir_id, Assessment.superseded.is_(False)
                    )
                )
            )
        inputs = [t for t in (study_anchor(study.study_datetime, study.detected_at) if study else None, newest) if t]
        return ends + ([max(inputs)] if inputs else [])  # not truncated to the second: keep, never lose, a value

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
            lost_claims=0,
        )

    def requeue_assessment(self, identifier: str) -> bool:
        with self.sessions.begin() as s:
            res = s.execute(
                update(Assessment)
                .where(Assessment.identifier == identifier, Assessment.status != AssessmentStatus.PUBLISHING.value)
                .values(status=AssessmentStatus.RETRY.value, attempts=0, lost_claims=0, next_attempt_at=None)
            )
            return bool(res.rowcount == 1)  # type: ignore[attr-defined]

    def prune_superseded_assessments(self, before: datetime, batch_size: int, *, dry_run: bool = False) -> int:
        where = (
            Assessment.superseded.is_(True),
            Assessment.created_at < before,
            Assessment.status != AssessmentStatus.PUBLISHING.value,
        )
        return self._delete_batched(Assessment, where, batch_size, dry_run)

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
            return list(s.scalars(select(Assessment.identifier).where(*_assessments_due(now)).limit(limit)))

    def lease_due_assessments(self, now: datetime, until: datetime, limit: int = 100) -> list[str]:
        """``assessments_due``, taken for enqueueing (``next_attempt_at`` moves to ``until``; see ``_lease``)."""
        return self._lease(Assessment, Assessment.identifier, _assessments_due(now), "next_attempt_at", until, limit)

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
        """One open row per (stage, subject, outcome): a repeat counts ``occurrences``, moves ``last_seen_at``
        and refreshes message, details and retryable. One INSERT ... ON CONFLICT DO UPDATE on the partial unique
        index ``uq_failures_open`` (PostgreSQL and SQLite): a concurrent insert of the same open failure becomes
        the update, atomically, so racing workers leave one row that counts them all."""
        now = utcnow()
        insert = _upsert_insert(self.engine.dialect.name)
        stmt = insert(Failure).values(
            stage=stage,
            subject=subject,
            outcome=outcome.value,
            message=message,
            retryable=retryable,
            details=details,
            created_at=now,
            last_seen_at=now,
            occurrences=1,
        )
        stmt = stmt.on_conflict_do_update(
            index_elements=[Failure.stage, Failure.subject, Failure.outcome],
            index_where=Failure.resolved_at.is_(None),
            set_={
                "occurrences": Failure.occurrences + 1,
                "last_seen_at": stmt.excluded.last_seen_at,
                "message": stmt.excluded.message,
                "retryable": stmt.excluded.retryable,
                "details": stmt.excluded.details,
            },
        )
        with self.sessions.begin() as s:
            s.execute(stmt)

    def prune_resolved_failures(self, before: datetime, batch_size: int, *, dry_run: bool = False) -> int:
        return self._delete_batched(Failure, (Failure.resolved_at < before,), batch_size, dry_run)

    def _delete_batched(
        self, model: type[Failure] | type[Assessment] | type[VitalRow], where: Sequence[Any], batch: int, dry_run: bool
    ) -> int:
        """DELETE of the rows matching ``where``, ``batch`` ids per transaction (a long purge never holds a lock
        or a huge transaction). Dry run: count them."""
        if dry_run:
            with self.sessions() as s:
                return int(s.scalar(select(func.count()).select_from(model).where(*where)) or 0)
        removed = 0
        while True:
            with self.sessions.begin() as s:
                ids = list(s.scalars(select(model.id).where(*where).order_by(model.id).limit(batch)))
                if ids:
                    s.execute(delete(model).where(model.id.in_(ids)))
            removed += len(ids)
            if len(ids) < batch:
                return removed

    def resolve_failures(self, stage: str, subject: str, now: datetime) -> None:
        with self.sessions.begin() as s:
            s.execute(
                update(Failure)
                .where(Failure.stage == stage, Failure.subject == subject, Failure.resolved_at.is_(None))
                .values(resolved_at=now)
            )

    # -- stage timings ----------------------------------------------------------------
    def observe_stages(self, observations: Sequence[stages.Observation]) -> None:
        """One INSERT ... ON CONFLICT DO UPDATE of every touched (stage, bucket) row, adding to its counters (the
        dialect's upsert, PostgreSQL and SQLite): atomic per row, so concurrent workers never lose an increment. The
        rows go in a fixed order (``stages.fold``), so two writers lock them in the same order and never deadlock."""
        increments = stages.fold(observations)
        if not increments:
            return
        insert = _upsert_insert(self.engine.dialect.name)
        stmt = insert(StageBucket).values(
            [{"stage": i.stage, "le": i.le, "observations": i.count, "seconds": i.seconds} for i in increments]
        )
        stmt = stmt.on_conflict_do_update(
            index_elements=[StageBucket.stage, StageBucket.le],
            set_={
                "observations": StageBucket.observations + stmt.excluded.observations,
                "seconds": StageBucket.seconds + stmt.excluded.seconds,
            },
        )
        with self.sessions.begin() as s:
            s.execute(stmt)

    def stage_histograms(self) -> list[stages.StageHistogram]:
        with self.sessions() as s:
            rows = s.execute(
                select(StageBucket.stage, StageBucket.le, StageBucket.observations, StageBucket.seconds)
            ).all()
        return stages.histograms(stages.BucketIncrement(st, le, int(n), float(t)) for st, le, n, t in rows)

    def snapshot_stages(self, now: datetime, every_s: float, keep: int) -> bool:
        """Copy the stage histogram into the ring ``stage_snapshots`` unless the newest copy is under ``every_s``
        old; then delete all but the newest ``keep``. False when no copy was due."""
        with self.sessions.begin() as s:
            newest = s.scalar(select(func.max(StageSnapshotRow.taken_at)))
            if newest is not None and (now - newest).total_seconds() < every_s:
                return False
            histograms = {h.stage: latency.to_json(h) for h in self.stage_histograms()}
            s.add(StageSnapshotRow(taken_at=now, histograms=histograms))
            s.flush()
            cutoff = s.scalar(
                select(StageSnapshotRow.id).order_by(StageSnapshotRow.id.desc()).offset(keep).limit(1)
            )
            if cutoff is not None:
                s.execute(delete(StageSnapshotRow).where(StageSnapshotRow.id <= cutoff))
        return True

    def stage_snapshots(self, limit: int) -> list[latency.StageSnapshot]:
        """The newest ``limit`` copies of the stage histogram, oldest first."""
        with self.sessions() as s:
            rows = s.execute(
                select(StageSnapshotRow.taken_at, StageSnapshotRow.histograms)
                .order_by(StageSnapshotRow.id.desc())
                .limit(limit)
            ).all()
        out = []
        for taken_at, stored in reversed(rows):
            hists = [latency.from_json(stage, v) for stage, v in (stored or {}).items()]
            out.append(latency.StageSnapshot(taken_at, tuple(h for h in hists if h is not None)))
        return out

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
            failures = s.execute(
                select(Failure.outcome, func.count(), func.sum(Failure.occurrences))
                .where(Failure.resolved_at.is_(None))
                .group_by(Failure.outcome)
            ).all()
            out["open_failures"] = {str(k): int(n) for k, n, _ in failures}  # rows: distinct open problems
            out["open_failure_occurrences"] = {str(k): int(seen or 0) for k, _, seen in failures}  # times seen
        return out


def _studies_due(now: datetime, grace_s: float) -> tuple[Any, ...]:
    """Claimable, past any backoff or lease; a freshly detected study (enqueued when detected) after ``grace_s``."""
    return (
        Study.status.in_([st.value for st in STUDY_CLAIMABLE]),
        Study.next_attempt_at.is_(None) | (Study.next_attempt_at <= now),
        (Study.status != StudyStatus.DETECTED.value) | (Study.detected_at < now - timedelta(seconds=grace_s)),
    )


def _patients_due(now: datetime) -> tuple[Any, ...]:
    return (
        Patient.needs_assessment.is_(True),
        Patient.vitals_synced_at.is_not(None),
        Patient.status == "idle",
        Patient.next_attempt_at.is_(None) | (Patient.next_attempt_at <= now),
    )


def _vitals_due(now: datetime) -> tuple[Any, ...]:
    return (Patient.vitals_next_attempt_at.is_(None) | (Patient.vitals_next_attempt_at <= now),)


def _assessments_due(now: datetime) -> tuple[Any, ...]:
    return (
        Assessment.status.in_((AssessmentStatus.SCORED.value, AssessmentStatus.RETRY.value)),
        Assessment.next_attempt_at.is_(None) | (Assessment.next_attempt_at <= now),
    )


def _upsert_insert(dialect: str) -> Any:
    """The dialect's INSERT with ON CONFLICT (the engine runs on PostgreSQL or SQLite only)."""
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as pg_insert

        return pg_insert
    if dialect == "sqlite":
        from sqlalchemy.dialects.sqlite import insert as sqlite_insert

        return sqlite_insert
    raise NotImplementedError(f"the store runs on PostgreSQL or SQLite, not {dialect}")


def _reap(
    s: Session,
    model: type[Study] | type[Patient] | type[Assessment],
    key: Any,
    busy: str,
    older_than: datetime,
    max_lost_claims: int,
    *,
    give_up: dict[str, Any],
    put_back: dict[str, Any],
) -> tuple[int, list[str]]:
    """Stale claims of one table: (how many went back to the queue, subjects given up as worker_lost)."""
    stale = (model.status == busy, model.claimed_at < older_than)
    reason = (
        f"the worker holding it died {max_lost_claims} time(s) (killed, out of memory or past the task time "
        "limit); not retried automatically: replay it once the cause is fixed"
    )
    rows = s.execute(
        update(model)
        .where(*stale, model.lost_claims >= max_lost_claims - 1)
        .values(
            lost_claims=model.lost_claims + 1,
            claimed_at=None,
            outcome=Outcome.WORKER_LOST.value,
            reason=reason,
            **give_up,
        )
        .returning(key)
    )
    given_up = [str(subject) for subject in rows.scalars()]
    res = s.execute(update(model).where(*stale).values(lost_claims=model.lost_claims + 1, **put_back))
    return int(res.rowcount), given_up  # type: ignore[attr-defined]
