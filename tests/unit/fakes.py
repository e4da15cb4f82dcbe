"""In-memory fakes of every port (Store, Pacs, ChangeFeed, Ehr, RiskModel, Clock) for the services' unit tests.

``FakeStore`` keeps the same semantics as ``SqlStore`` (conditional claims, de-duplication, supersession);
``tests/unit/test_store_contract.py`` runs one set of checks against both, so the fake cannot drift.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields, replace
from datetime import UTC, date, datetime, timedelta
from typing import Any

import numpy as np

from inference.preprocess import Slice
from inference.runtime import ModelInputs, ModelUnavailableError, Prediction
from integration.domain import latency, stages
from integration.domain.records import (
    STUDY_CLAIMABLE,
    AssessmentRecord,
    AssessmentStatus,
    BuiltVolume,
    NewAssessment,
    PatientRecord,
    PatientStatus,
    ReleasedClaims,
    StudyRecord,
    StudyStatus,
)
from integration.domain.types import (
    DomainError,
    Outcome,
    PatientInfo,
    SeriesDecision,
    SeriesRef,
    StableStudy,
    StudyRef,
    VitalValue,
)
from integration.domain.window import study_anchor

NOW = datetime(2026, 11, 20, 12, 0, tzinfo=UTC)


class FakeClock:
    def __init__(self, t: datetime = NOW) -> None:
        self.t = t

    def now(self) -> datetime:
        return self.t


@dataclass
class _Failure:
    stage: str
    subject: str
    outcome: Outcome
    message: str
    retryable: bool
    details: dict[str, Any] | None
    resolved_at: datetime | None = None
    occurrences: int = 1
    created_at: datetime | None = None
    last_seen_at: datetime | None = None


class FakeStore:
    """The Store port in memory. ``clock`` stamps detected_at/created_at like the database's defaults."""

    def __init__(self, clock: FakeClock | None = None) -> None:
        self.clock = clock or FakeClock()
        self.cursors: dict[str, str] = {}
        self.studies: dict[str, StudyRecord] = {}
        self.decisions: dict[str, dict[str, tuple[SeriesDecision, bool]]] = {}
        self.patients: dict[str, PatientRecord] = {}
        self.vitals: dict[tuple[str, str, str], tuple[str, VitalValue]] = {}  # (patient, obs, feature) -> (patient, v)
        self.assessments: dict[str, AssessmentRecord] = {}
        self.failures: list[_Failure] = []
        self.stage_rows: dict[tuple[str, str], tuple[int, float]] = {}  # (stage, le) -> (observations, seconds)
        self.snapshots: list[latency.StageSnapshot] = []  # the ring of stage histogram copies, oldest first
        self._order = itertools.count()
        self._assessment_order: dict[str, int] = {}

    # -- cursors --
    def get_cursor(self, name: str) -> str | None:
        return self.cursors.get(name)

    def set_cursor(self, name: str, value: str) -> None:
        self.cursors[name] = value

    # -- studies --
    def add_study(self, ref: StudyRef, source: str, now: datetime, completed_at: datetime | None = None) -> bool:
        if ref.study_uid in self.studies:
            return False
        self.studies[ref.study_uid] = StudyRecord(
            ref.study_uid, ref.patient_id or None, ref.issuer, ref.study_datetime, source, StudyStatus.DETECTED, now,
            completed_at=completed_at)
        return True

    def mark_study_published(self, uid: str, at: datetime) -> datetime | None:
        row = self.studies.get(uid)
        if row is None or row.first_published_at is not None:
            return None
        self._set(uid, first_published_at=at)
        return row.completed_at or row.detected_at

    def known_studies(self, uids: Iterable[str]) -> set[str]:
        return {u for u in uids if u in self.studies}

    def get_study(self, uid: str) -> StudyRecord | None:
        return self.studies.get(uid)

    def _set(self, uid: str, **values: Any) -> None:
        if uid in self.studies:
            self.studies[uid] = replace(self.studies[uid], **values)

    def claim_study(self, uid: str, now: datetime) -> bool:
        row = self.studies.get(uid)
        if row is None or row.status not in STUDY_CLAIMABLE:
            return False
        self._set(uid, status=StudyStatus.PROCESSING, claimed_at=now, attempts=row.attempts + 1)
        return True

    def record_series_decisions(self, uid: str, decisions: Sequence[SeriesDecision], chosen_uid: str | None) -> None:
        kept = self.decisions.setdefault(uid, {})
        for d in decisions:
            kept[d.series.series_uid] = (d, d.series.series_uid == chosen_uid)

    def set_study_volume(self, uid: str, volume: BuiltVolume) -> None:
        self._set(uid, volume_path=volume.path, volume_sha256=volume.sha256, chosen_series_uid=volume.series_uid,
                  modality=volume.modality)

    def set_study_ready(self, uid: str, patient_fhir_id: str) -> None:
        self._set(uid, status=StudyStatus.READY, outcome=None, reason=None, patient_fhir_id=patient_fhir_id,
                  next_attempt_at=None, claimed_at=None, lost_claims=0)

    def clear_study_volume(self, uid: str, path: str) -> bool:
        row = self.studies.get(uid)
        if row is None or row.volume_path != path or row.status is StudyStatus.PROCESSING:
            return False
        self._set(uid, volume_path=None)
        return True

    def studies_with_volumes(self, detected_before: datetime, after_uid: str, limit: int) -> list[StudyRecord]:
        found = sorted(
            (s for s in self.studies.values()
             if s.volume_path is not None and s.status in (StudyStatus.READY, StudyStatus.FAILED)
             and s.detected_at < detected_before and s.study_uid > after_uid),
            key=lambda s: s.study_uid)
        return found[:limit]

    def set_study_outcome(self, uid: str, status: StudyStatus, outcome: Outcome, reason: str,
                          next_attempt_at: datetime | None) -> None:
        self._set(uid, status=status, outcome=outcome.value, reason=reason, next_attempt_at=next_attempt_at,
                  claimed_at=None)

    def requeue_study(self, uid: str) -> bool:
        row = self.studies.get(uid)
        if row is None or row.status is StudyStatus.PROCESSING:
            return False
        self._set(uid, status=StudyStatus.RETRY, next_attempt_at=None, attempts=0, lost_claims=0)
        return True

    def studies_due(self, now: datetime, limit: int = 100, grace_s: float = 30.0) -> list[str]:
        fresh_before = now - timedelta(seconds=grace_s)
        due = [
            s.study_uid for s in self.studies.values()
            if s.status in STUDY_CLAIMABLE
            and (s.next_attempt_at is None or s.next_attempt_at <= now)
            and (s.status is not StudyStatus.DETECTED or s.detected_at < fresh_before)
        ]
        return due[:limit]

    def _lease(self, ids: list[str], until: datetime, lease: Any) -> list[str]:
        for key in ids:
            lease(key, until)
        return ids

    def lease_due_studies(self, now: datetime, until: datetime, limit: int = 100, grace_s: float = 30.0) -> list[str]:
        return self._lease(self.studies_due(now, limit, grace_s), until,
                           lambda uid, t: self._set(uid, next_attempt_at=t))

    def release_stale_claims(self, older_than: datetime, max_lost_claims: int = 3) -> ReleasedClaims:
        n, given_up = 0, []
        lost = Outcome.WORKER_LOST.value
        for s in list(self.studies.values()):
            if s.status is StudyStatus.PROCESSING and s.claimed_at is not None and s.claimed_at < older_than:
                if s.lost_claims + 1 >= max_lost_claims:
                    self._set(s.study_uid, status=StudyStatus.FAILED, next_attempt_at=None, claimed_at=None,
                              outcome=lost, reason="worker lost", lost_claims=s.lost_claims + 1)
                    given_up.append(("ingest", s.study_uid))
                    continue
                self._set(s.study_uid, status=StudyStatus.RETRY, next_attempt_at=None, lost_claims=s.lost_claims + 1)
                n += 1
        for p in list(self.patients.values()):
            if p.status is PatientStatus.ASSESSING and p.claimed_at is not None and p.claimed_at < older_than:
                if p.lost_claims + 1 >= max_lost_claims:
                    self.patients[p.fhir_id] = replace(p, status=PatientStatus.IDLE, needs_assessment=False,
                                                       next_attempt_at=None, claimed_at=None, outcome=lost,
                                                       reason="worker lost", lost_claims=p.lost_claims + 1)
                    given_up.append(("assess", p.fhir_id))
                    continue
                self.patients[p.fhir_id] = replace(p, status=PatientStatus.IDLE, needs_assessment=True,
                                                   lost_claims=p.lost_claims + 1)
                n += 1
        for a in list(self.assessments.values()):
            if a.status is AssessmentStatus.PUBLISHING and a.claimed_at is not None and a.claimed_at < older_than:
                if a.lost_claims + 1 >= max_lost_claims:
                    self.assessments[a.identifier] = replace(a, status=AssessmentStatus.FAILED, next_attempt_at=None,
                                                             claimed_at=None, outcome=lost, reason="worker lost",
                                                             lost_claims=a.lost_claims + 1)
                    given_up.append(("publish", a.identifier))
                    continue
                self.assessments[a.identifier] = replace(a, status=AssessmentStatus.SCORED,
                                                         lost_claims=a.lost_claims + 1)
                n += 1
        return ReleasedClaims(n, tuple(given_up))

    def latest_ready_study(self, patient_fhir_id: str) -> StudyRecord | None:
        ready = [s for s in self.studies.values()
                 if s.patient_fhir_id == patient_fhir_id and s.status is StudyStatus.READY]
        order = {uid: k for k, uid in enumerate(self.studies)}
        ready.sort(key=lambda s: (s.study_datetime is not None, s.study_datetime or NOW, order[s.study_uid]))
        return ready[-1] if ready else None

    def held_patient_keys(self, limit: int = 1000) -> list[tuple[str | None, str]]:
        keys = {(s.issuer, s.dicom_patient_id) for s in self.studies.values()
                if s.status is StudyStatus.HELD and s.dicom_patient_id}
        return [(issuer, pid) for issuer, pid in sorted(keys, key=str) if pid][:limit]

    def release_held_studies(self, dicom_patient_id: str, issuer: str | None) -> list[str]:
        uids = [s.study_uid for s in self.studies.values() if s.status is StudyStatus.HELD
                and s.dicom_patient_id == dicom_patient_id and s.issuer == issuer]
        for uid in uids:
            self._set(uid, status=StudyStatus.RETRY, next_attempt_at=None)
        return uids

    # -- patients --
    def upsert_patient(self, fhir_id: str, birth_date: str | None, gender: str | None) -> None:
        row = self.patients.get(fhir_id)
        self.patients[fhir_id] = (PatientRecord(fhir_id, birth_date, gender) if row is None
                                  else replace(row, birth_date=birth_date, gender=gender))

    def get_patient(self, fhir_id: str) -> PatientRecord | None:
        return self.patients.get(fhir_id)

    def _patient(self, fhir_id: str, **values: Any) -> None:
        if fhir_id in self.patients:
            self.patients[fhir_id] = replace(self.patients[fhir_id], **values)

    def mark_needs_assessment(self, fhir_id: str) -> None:
        self._patient(fhir_id, needs_assessment=True)

    def patients_due(self, now: datetime, limit: int) -> list[str]:
        return [p.fhir_id for p in self.patients.values()
                if p.needs_assessment and p.vitals_synced_at is not None and p.status is PatientStatus.IDLE
                and (p.next_attempt_at is None or p.next_attempt_at <= now)][:limit]

    def lease_due_patients(self, now: datetime, until: datetime, limit: int) -> list[str]:
        return self._lease(self.patients_due(now, limit), until, lambda pid, t: self._patient(pid, next_attempt_at=t))

    def claim_patient(self, fhir_id: str, now: datetime) -> bool:
        p = self.patients.get(fhir_id)
        if p is None or p.status is not PatientStatus.IDLE or not p.needs_assessment:
            return False
        self._patient(fhir_id, status=PatientStatus.ASSESSING, claimed_at=now, needs_assessment=False,
                      attempts=p.attempts + 1)
        return True

    def release_patient(self, fhir_id: str, *, retry_at: datetime | None = None, outcome: str | None = None,
                        reason: str | None = None) -> None:
        values: dict[str, Any] = {"status": PatientStatus.IDLE, "claimed_at": None, "outcome": outcome,
                                  "reason": reason}
        if retry_at is not None:
            values.update(needs_assessment=True, next_attempt_at=retry_at)
        else:
            values.update(attempts=0, next_attempt_at=None, lost_claims=0)
        self._patient(fhir_id, **values)

    def requeue_patient(self, fhir_id: str) -> bool:
        p = self.patients.get(fhir_id)
        if p is None or p.status is PatientStatus.ASSESSING:
            return False
        self._patient(fhir_id, needs_assessment=True, attempts=0, lost_claims=0, next_attempt_at=None)
        return True

    def require_vitals_sync(self, fhir_id: str, queued_until: datetime | None = None) -> None:
        if queued_until is None:
            self._patient(fhir_id, vitals_synced_at=None, needs_assessment=True)
        else:
            self._patient(fhir_id, vitals_synced_at=None, needs_assessment=True, vitals_next_attempt_at=queued_until)

    @staticmethod
    def _vitals_due(p: PatientRecord, now: datetime) -> bool:
        return p.vitals_next_attempt_at is None or p.vitals_next_attempt_at <= now

    def patients_needing_vitals(self, now: datetime, limit: int = 1000) -> list[str]:
        return [p.fhir_id for p in self.patients.values()
                if p.vitals_synced_at is None and self._vitals_due(p, now)][:limit]

    def _lease_vitals(self, fhir_id: str, until: datetime) -> None:
        self._patient(fhir_id, vitals_next_attempt_at=until)

    def lease_patients_needing_vitals(self, now: datetime, until: datetime, limit: int = 1000) -> list[str]:
        return self._lease(self.patients_needing_vitals(now, limit), until, self._lease_vitals)

    def lease_patients_in_window(self, now: datetime, since: datetime, until: datetime, limit: int = 1000) -> list[str]:
        recent = {s.patient_fhir_id for s in self.studies.values()
                  if s.status is StudyStatus.READY and study_anchor(s.study_datetime, s.detected_at) >= since}
        order = {pid: k for k, pid in enumerate(self.patients)}
        found = sorted((p for p in self.patients.values() if p.fhir_id in recent and self._vitals_due(p, now)),
                       key=lambda p: (p.vitals_synced_at is not None, p.vitals_synced_at or NOW, order[p.fhir_id]))
        return self._lease([p.fhir_id for p in found][:limit], until, self._lease_vitals)

    def set_vitals_retry(self, fhir_id: str, attempts: int, retry_at: datetime) -> None:
        self._patient(fhir_id, vitals_attempts=attempts, vitals_next_attempt_at=retry_at)

    def set_vitals_cursor(self, fhir_id: str, cursor: datetime | None, synced_at: datetime) -> None:
        reset: dict[str, Any] = {"vitals_attempts": 0, "vitals_next_attempt_at": None}
        if cursor is None:
            self._patient(fhir_id, vitals_synced_at=synced_at, **reset)
        else:
            self._patient(fhir_id, vitals_synced_at=synced_at, vitals_cursor=cursor, **reset)

    # -- vitals --
    def replace_vitals(self, fhir_id: str, values: Sequence[VitalValue], removed_observation_ids: Iterable[str]) -> int:
        changed = 0
        removed = set(removed_observation_ids)
        for key in [k for k in self.vitals if k[0] == fhir_id and k[1] in removed]:
            del self.vitals[key]
            changed += 1
        for v in values:  # matched within the patient only, like the database's unique key
            old = self.vitals.get((fhir_id, v.observation_id, v.feature))
            if old is None or old[1].value != v.value or old[1].effective != v.effective:
                changed += 1
                self.vitals[(fhir_id, v.observation_id, v.feature)] = (fhir_id, v)
        return changed

    def vitals_between(self, fhir_id: str, start: datetime, end: datetime) -> list[VitalValue]:
        found = [v for pid, v in self.vitals.values() if pid == fhir_id and start < v.effective <= end]
        return sorted(found, key=lambda v: v.effective)

    def latest_vital_time(self, fhir_id: str, not_after: datetime) -> datetime | None:
        times = [v.effective for pid, v in self.vitals.values() if pid == fhir_id and v.effective <= not_after]
        return max(times, default=None)

    def prune_vitals(self, before: datetime, window: timedelta, batch_size: int, *, dry_run: bool = False) -> int:
        ends: dict[str, list[datetime]] = {}
        for pid in {pid for pid, _ in self.vitals.values()}:
            study = self.latest_ready_study(pid)
            newest = max((v.effective for p, v in self.vitals.values() if p == pid), default=None)
            anchor = study_anchor(study.study_datetime, study.detected_at) if study else None
            inputs = [t for t in (anchor, newest) if t]
            ends[pid] = [a.window_end for a in self.assessments.values()
                         if a.patient_fhir_id == pid and not a.superseded] + ([max(inputs)] if inputs else [])
        gone = [key for key, (pid, v) in self.vitals.items()
                if v.effective < before and not any(end - window <= v.effective <= end for end in ends[pid])]
        if not dry_run:
            for key in gone:
                del self.vitals[key]
        return len(gone)

    # -- assessments --
    def get_assessment(self, identifier: str) -> AssessmentRecord | None:
        return self.assessments.get(identifier)

    def latest_assessment(self, fhir_id: str) -> AssessmentRecord | None:
        live = [a for a in self.assessments.values() if a.patient_fhir_id == fhir_id and not a.superseded]
        return max(live, key=lambda a: self._assessment_order[a.identifier], default=None)

    def add_assessment(self, new: NewAssessment) -> bool:
        if new.identifier in self.assessments:
            return False
        if new.supersedes_identifier and new.supersedes_identifier in self.assessments:
            old = self.assessments[new.supersedes_identifier]
            self.assessments[old.identifier] = replace(old, superseded=True)
        self.assessments[new.identifier] = AssessmentRecord(
            **{f.name: getattr(new, f.name) for f in fields(NewAssessment)},
            status=AssessmentStatus.SCORED, created_at=self.clock.now())
        self._assessment_order[new.identifier] = next(self._order)
        return True

    def claim_assessment(self, identifier: str, now: datetime) -> bool:
        a = self.assessments.get(identifier)
        if a is None or a.status not in (AssessmentStatus.SCORED, AssessmentStatus.RETRY):
            return False
        self.assessments[identifier] = replace(a, status=AssessmentStatus.PUBLISHING, claimed_at=now,
                                               attempts=a.attempts + 1)
        return True

    def set_assessment_published(self, identifier: str, fhir_id: str, at: datetime) -> None:
        a = self.assessments[identifier]
        self.assessments[identifier] = replace(a, status=AssessmentStatus.PUBLISHED, fhir_id=fhir_id,
                                               published_at=at, outcome=None, reason=None, claimed_at=None,
                                               lost_claims=0)

    def requeue_assessment(self, identifier: str) -> bool:
        a = self.assessments.get(identifier)
        if a is None or a.status is AssessmentStatus.PUBLISHING:
            return False
        self.assessments[identifier] = replace(a, status=AssessmentStatus.RETRY, attempts=0, lost_claims=0,
                                               next_attempt_at=None)
        return True

    def prune_superseded_assessments(self, before: datetime, batch_size: int, *, dry_run: bool = False) -> int:
        gone = [a.identifier for a in self.assessments.values()
                if a.superseded and a.created_at < before and a.status is not AssessmentStatus.PUBLISHING]
        if not dry_run:
            for identifier in gone:
                del self.assessments[identifier]
        return len(gone)

    def set_assessment_outcome(self, identifier: str, status: AssessmentStatus, outcome: Outcome, reason: str,
                               next_attempt_at: datetime | None) -> None:
        a = self.assessments[identifier]
        self.assessments[identifier] = replace(a, status=status, outcome=outcome.value, reason=reason,
                                               next_attempt_at=next_attempt_at, claimed_at=None)

    def assessments_due(self, now: datetime, limit: int = 100) -> list[str]:
        return [a.identifier for a in self.assessments.values()
                if a.status in (AssessmentStatus.SCORED, AssessmentStatus.RETRY)
                and (a.next_attempt_at is None or a.next_attempt_at <= now)][:limit]

    def lease_due_assessments(self, now: datetime, until: datetime, limit: int = 100) -> list[str]:
        def lease(identifier: str, t: datetime) -> None:
            self.assessments[identifier] = replace(self.assessments[identifier], next_attempt_at=t)

        return self._lease(self.assessments_due(now, limit), until, lease)

    # -- failures and summaries --
    def record_failure(self, stage: str, subject: str, outcome: Outcome, message: str, retryable: bool,
                       details: dict[str, Any] | None = None) -> None:
        now = self.clock.now()
        for f in self.failures:  # one open row per (stage, subject, outcome), like the partial unique index
            if (f.stage, f.subject, f.outcome, f.resolved_at) == (stage, subject, outcome, None):
                f.occurrences += 1
                f.last_seen_at, f.message, f.retryable, f.details = now, message, retryable, details
                return
        self.failures.append(_Failure(stage, subject, outcome, message, retryable, details, created_at=now,
                                      last_seen_at=now))

    def prune_resolved_failures(self, before: datetime, batch_size: int, *, dry_run: bool = False) -> int:
        kept = [f for f in self.failures if f.resolved_at is None or f.resolved_at >= before]
        gone = len(self.failures) - len(kept)
        if not dry_run:
            self.failures = kept
        return gone

    def resolve_failures(self, stage: str, subject: str, now: datetime) -> None:
        for f in self.failures:
            if f.stage == stage and f.subject == subject and f.resolved_at is None:
                f.resolved_at = now

    def observe_stages(self, observations: Sequence[stages.Observation]) -> None:
        for inc in stages.fold(observations):  # validates every stage before a row changes, like the one statement
            n, total = self.stage_rows.get((inc.stage, inc.le), (0, 0.0))
            self.stage_rows[(inc.stage, inc.le)] = (n + inc.count, total + inc.seconds)

    def stage_histograms(self) -> list[stages.StageHistogram]:
        return stages.histograms(stages.BucketIncrement(st, le, n, t) for (st, le), (n, t) in self.stage_rows.items())

    def snapshot_stages(self, now: datetime, every_s: float, keep: int) -> bool:
        if self.snapshots and (now - self.snapshots[-1].taken_at).total_seconds() < every_s:
            return False
        self.snapshots.append(latency.StageSnapshot(now, tuple(self.stage_histograms())))
        del self.snapshots[:-keep]
        return True

    def stage_snapshots(self, limit: int) -> list[latency.StageSnapshot]:
        return list(self.snapshots[-limit:])

    def counts(self) -> dict[str, dict[str, int]]:
        def tally(values: Iterable[str]) -> dict[str, int]:
            out: dict[str, int] = {}
            for v in values:
                out[v] = out.get(v, 0) + 1
            return out

        seen: dict[str, int] = {}
        for f in self.failures:
            if f.resolved_at is None:
                seen[f.outcome.value] = seen.get(f.outcome.value, 0) + f.occurrences
        return {
            "studies": tally(s.status.value for s in self.studies.values()),
            "patients": tally(p.status.value for p in self.patients.values()),
            "assessments": tally(a.status.value for a in self.assessments.values()),
            "open_failures": tally(f.outcome.value for f in self.failures if f.resolved_at is None),
            "open_failure_occurrences": seen,
        }


# -- the peers -------------------------------------------------------------------------------------------------
STUDY = "1.2.826.0.1.3680043.8.498.1"
SERIES = "1.2.826.0.1.3680043.8.498.1.1"


def ct_slices(n: int = 24) -> list[Slice]:
    rng = np.random.default_rng(0)
    out = []
    for k in rng.permutation(n):  # file order is not geometry order
        px = np.full((64, 64), 30.0, dtype=np.float32)
        px[20:40, 20:40] = 60.0
        out.append(Slice(px, (-110.0, -110.0, 5.0 * float(k)), (1, 0, 0, 0, 1, 0), (3.5, 3.5)))
    return out


class FakePacs:
    """One head CT study of patient MRN1 (taken an hour before NOW)."""

    def __init__(self) -> None:
        self.series = [SeriesRef(STUDY, SERIES, "CT", 24, body_part="HEAD", series_description="AX BRAIN 5mm",
                                 study_description="CT HEAD WO", sop_class_uid="1.2.840.10008.5.1.4.1.1.2")]
        self.down = False
        self.retrievals = 0

    def find_studies(self, first: date, last: date) -> list[StudyRef]:
        return [StudyRef(STUDY, "MRN1", None, NOW)]

    def get_study(self, uid: str) -> StudyRef | None:
        return StudyRef(STUDY, "MRN1", None, NOW - timedelta(hours=1)) if uid == STUDY else None

    def list_series(self, uid: str) -> list[SeriesRef]:
        if self.down:
            raise DomainError(Outcome.PACS_UNAVAILABLE, "connection refused")
        return self.series

    def retrieve_series(self, study_uid: str, series_uid: str) -> tuple[str, list[Slice]]:
        self.retrievals += 1
        return "CT", ct_slices()


def obs(oid: str, code: str, value: float, unit: str, when: datetime) -> dict[str, Any]:
    return {
        "resourceType": "Observation", "id": oid, "status": "final",
        "meta": {"lastUpdated": NOW.isoformat()},
        "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category",
                                  "code": "vital-signs"}]}],
        "code": {"coding": [{"system": "http://loinc.org", "code": code}]},
        "subject": {"reference": "Patient/pat-1"},
        "effectiveDateTime": when.isoformat(),
        "valueQuantity": {"value": value, "unit": unit, "system": "http://unitsofmeasure.org", "code": unit},
    }


class FakeEhr:
    """Patient MRN1 -> pat-1 with three vital signs; conditional creates keyed by identifier."""

    def __init__(self) -> None:
        self.patients: dict[str, PatientInfo] = {"MRN1": PatientInfo("pat-1", "1950-03-04", "female")}
        self.observations = [
            obs("o1", "8867-4", 80, "/min", NOW - timedelta(hours=30)),
            obs("o2", "8480-6", 150, "mm[Hg]", NOW - timedelta(hours=20)),
            obs("o3", "8310-5", 98.6, "[degF]", NOW - timedelta(hours=10)),
        ]
        self.created: dict[str, tuple[str, dict[str, Any]]] = {}
        self.fail_create: DomainError | None = None

    def find_patient(self, system: str | None, value: str) -> PatientInfo | None:
        return self.patients.get(value)

    def patients_updated_since(self, since: datetime) -> list[PatientInfo]:
        return [PatientInfo(p.fhir_id, p.birth_date, p.gender, (("", mrn),)) for mrn, p in self.patients.items()]

    def search_observations(self, patient_id: str, codes: Sequence[str], since: datetime | None,
                            updated_since: datetime | None) -> list[dict[str, Any]]:
        return list(self.observations)

    def conditional_create(self, resource: dict[str, Any], system: str, value: str) -> tuple[str, bool]:
        if self.fail_create is not None:
            raise self.fail_create
        key = f"{resource['resourceType']}|{system}|{value}"
        if key in self.created:
            return self.created[key][0], False
        fid = f"{resource['resourceType'].lower()}-{len(self.created) + 1}"
        self.created[key] = (fid, resource)
        return fid, True

    def update(self, resource: dict[str, Any]) -> None:
        raise AssertionError("not used")

    def search(self, resource_type: str, params: dict[str, str]) -> list[dict[str, Any]]:
        return []

    def assessments(self) -> list[dict[str, Any]]:
        return [r for k, (_, r) in self.created.items() if k.startswith("RiskAssessment|")]


class FakeModel:
    """p = 0.1 + 0.25 with an image + 0.01 per observed vital value; ``down`` raises ModelUnavailableError."""

    model_version = "9.9.9"
    trained = True
    runtime_name = "fake"

    def __init__(self) -> None:
        self.calls: list[int] = []
        self.down = False

    def predict(self, batch: Sequence[ModelInputs]) -> list[Prediction]:
        if self.down:
            raise ModelUnavailableError("triton is down")
        self.calls.append(len(batch))
        return [Prediction(0.1 + 0.5 * float(b.image_present[0]) * 0.5 + 0.01 * float(b.vitals_mask.sum()), 0.0,
                           self.model_version, "fake") for b in batch]


class FakeFeed:
    """Orthanc's /changes: StableStudy events for UIDs, with an integer cursor."""

    def __init__(self) -> None:
        self.events: list[str] = []
        #: what is_stable answers per UID (absent: the PACS does not hold the study)
        self.stable: dict[str, bool] = {}
        #: when each study's event says it became stable (absent: the event carries no time)
        self.stable_at: dict[str, datetime] = {}

    def stable_studies(self, since: int, limit: int = 100) -> tuple[list[StableStudy], int, bool]:
        end = min(len(self.events), since + limit)
        page = [StableStudy(uid, self.stable_at.get(uid)) for uid in self.events[since:end]]
        return page, end, end >= len(self.events)

    def latest_cursor(self) -> int:
        return len(self.events)

    def is_stable(self, study_uid: str) -> bool | None:
        return self.stable.get(study_uid)
