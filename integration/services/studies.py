"""Use cases on the imaging side: detect new studies, ingest one (select, retrieve, preprocess, match)."""

from __future__ import annotations

import hashlib
import logging
import os
import traceback
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np

from inference.preprocess import PreprocessError, series_tensor
from integration.domain import stages
from integration.domain.identity import pseudonym
from integration.domain.ids import is_dicom_uid, opaque_name, shown
from integration.domain.push import SCP_SOURCE
from integration.domain.records import BuiltVolume, StudyStatus
from integration.domain.redact import describe_exception
from integration.domain.retry import backoff_at
from integration.domain.series import choose
from integration.domain.studytime import StudyWindow, detection_window
from integration.domain.types import DomainError, Outcome, SeriesRef
from integration.ports import Pacs
from integration.services.context import Services
from integration.services.timing import StageTimes, record

log = logging.getLogger(__name__)

ORTHANC_CURSOR = "orthanc_changes"
QIDO_CURSOR = "qido_last_poll"
RECONCILE_CURSOR = "orthanc_reconcile"
#: Unknown studies one reconcile asks the PACS about (the rest are found by the next one).
RECONCILE_BATCH = 200
PATIENTS_CURSOR = "ehr_patients_seen"
#: Patients are read back this far before the last poll: the EHR's clock and ours differ, and
#: lastUpdated has coarse resolution on some servers.
PATIENTS_OVERLAP = timedelta(minutes=5)


@dataclass(frozen=True)
class IngestResult:
    study_uid: str
    status: str  # ready | held | failed | retry | skipped
    outcome: str | None = None
    reason: str | None = None
    patient_fhir_id: str | None = None


def detect_studies(svc: Services) -> list[str]:
    """Find studies not seen before; record them as 'detected'. Returns their UIDs (to enqueue).

    Orthanc: its /changes feed (StableStudy) from a persisted cursor. Any DICOMweb PACS: QIDO-RS over a
    moving window (``lookback_hours`` behind now, ``clock_skew_s`` ahead of it, in any time zone: see
    ``domain.studytime``), de-duplicated by StudyInstanceUID against the database.
    """
    now = svc.clock.now()
    window = detection_window(now, timedelta(hours=svc.lookback_hours), timedelta(seconds=svc.clock_skew_s))
    new: list[str] = []
    detected: list[stages.Observation] = []  # completion -> registration, where the feed says when it completed
    if svc.feed is not None:
        stored = svc.store.get_cursor(ORTHANC_CURSOR)
        if stored is None and not svc.changes_from_beginning:
            # First start against a PACS with history: do not replay years of changes. Take the studies of
            # the lookback window by QIDO-RS once, then follow the feed from its current end.
            cursor = svc.feed.latest_cursor()
            new += _studies_in_window(svc, window, "qido")
            svc.store.set_cursor(ORTHANC_CURSOR, str(cursor))
        else:
            cursor = int(stored or 0)
        while True:
            events, cursor, done = svc.feed.stable_studies(cursor, 200)
            read_at = svc.clock.now()
            first: dict[str, datetime | None] = {}
            for event in events:  # each study once, at its first event
                first.setdefault(event.study_uid, event.stable_at)
            for uid, stable_at in first.items():
                if not _valid_study_uid(svc, uid, "orthanc-changes"):
                    continue
                ref = svc.pacs.get_study(uid)
                completed = min(stable_at, read_at) if stable_at is not None else None  # the PACS's clock may be ahead
                if ref is not None and svc.store.add_study(ref, "orthanc-changes", now, completed):
                    new.append(uid)
                    if completed is not None:
                        detected.append((stages.DETECT, (read_at - completed).total_seconds()))
            svc.store.set_cursor(ORTHANC_CURSOR, str(cursor))
            if done:
                break
        new += _reconcile_feed(svc, window, now)
        record(svc.store, detected)
    else:
        new += _studies_in_window(svc, window, "qido")
        svc.store.set_cursor(QIDO_CURSOR, now.isoformat())
    if new:
        log.info("detected %d new stud%s", len(new), "y" if len(new) == 1 else "ies")
        svc.enqueue("ingest", new)
    return new


def _reconcile_feed(svc: Services, window: StudyWindow, now: datetime) -> list[str]:
    """Studies of the lookback window the change feed never announced, every ``feed_reconcile_s``.

    A PACS that restarts between a study's last instance and its StableStudy event never emits the event (Orthanc
    keeps its stability timers in memory), so a feed alone would lose that study. The window is read by QIDO-RS as
    in polling; an unknown study is registered once the PACS calls it stable (a study still arriving is left for
    its event or the next reconcile). A failing PACS only postpones it: the feed's progress is kept.
    """
    if svc.feed is None or svc.feed_reconcile_s <= 0:
        return []
    last = svc.store.get_cursor(RECONCILE_CURSOR)
    if last is not None:
        try:
            if now - datetime.fromisoformat(last) < timedelta(seconds=svc.feed_reconcile_s):
                return []
        except (TypeError, ValueError):
            pass  # an unreadable stamp: reconcile now and write a good one
    svc.store.set_cursor(RECONCILE_CURSOR, now.isoformat())
    added: list[str] = []
    try:
        refs = [r for r in svc.pacs.find_studies(*window.query_dates()) if window.contains(r)]
        refs = [r for r in refs if _valid_study_uid(svc, r.study_uid, "orthanc-reconcile")]
        known = svc.store.known_studies(r.study_uid for r in refs)
        for ref in [r for r in refs if r.study_uid not in known][:RECONCILE_BATCH]:
            if svc.feed.is_stable(ref.study_uid) and svc.store.add_study(ref, "orthanc-reconcile", now):
                added.append(ref.study_uid)
    except DomainError as err:
        log.warning("reconciling the change feed with QIDO-RS failed (%s): %s; next try in %.0f s",
                    err.outcome.value, err.message, svc.feed_reconcile_s)
    if added:
        log.warning("%d stud%s the change feed never announced (PACS restarted before StableStudy?) found by QIDO-RS",
                    len(added), "y" if len(added) == 1 else "ies")
    return added


def _studies_in_window(svc: Services, window: StudyWindow, source: str) -> list[str]:
    """Studies taken within the window and not seen before, for both detection paths.

    The PACS is asked for every StudyDate the window can have in any civil zone; the answers are then
    kept exactly on their aware datetimes. The lookback is re-read at every poll; the store de-duplicates.
    """
    now = svc.clock.now()
    refs = [r for r in svc.pacs.find_studies(*window.query_dates()) if window.contains(r)]
    refs = [r for r in refs if _valid_study_uid(svc, r.study_uid, source)]
    known = svc.store.known_studies(r.study_uid for r in refs)
    return [r.study_uid for r in refs if r.study_uid not in known and svc.store.add_study(r, source, now)]


def _valid_study_uid(svc: Services, uid: str, source: str) -> bool:
    """A study UID from the PACS goes into URLs and the database: anything but a PS3.5 UID is recorded as
    ``invalid_uid`` (under a derived subject: the value itself may be 200 characters or ``../``) and dropped."""
    if is_dicom_uid(uid):
        return True
    message = f"the PACS ({source}) lists a study whose StudyInstanceUID {shown(uid)} is not a DICOM UID (PS3.5 9.1)"
    svc.store.record_failure("detect", f"uid:{opaque_name(uid)[:40]}", Outcome.INVALID_UID, message, False)
    log.warning("%s; skipped", message)
    return False


def register_study(svc: Services, study_uid: str, source: str = "api") -> bool:
    """Record a study announced from outside (webhook, C-STORE SCP, CLI) and queue its ingestion.
    False if the PACS does not know it, or it is not a DICOM UID (it would go into a PACS URL)."""
    if not is_dicom_uid(study_uid):
        log.warning("refused to register %s: not a DICOM UID", shown(study_uid))
        return False
    ref = svc.pacs.get_study(study_uid)
    if ref is None:
        return False
    svc.store.add_study(ref, source, svc.clock.now())
    svc.enqueue("ingest", [study_uid])
    return True


_PREPROCESS_OUTCOMES = {
    "too_few_slices": Outcome.TOO_FEW_SLICES,
    "inconsistent_spacing": Outcome.INCONSISTENT_SPACING,
    "duplicate_slices": Outcome.INCONSISTENT_GEOMETRY,
    "inconsistent_geometry": Outcome.INCONSISTENT_GEOMETRY,
    "bad_geometry": Outcome.INCONSISTENT_GEOMETRY,
    "unsupported_modality": Outcome.NOT_IMAGE,
    "empty_volume": Outcome.CORRUPT_PIXEL_DATA,
}


def ingest_study(svc: Services, study_uid: str) -> IngestResult:
    """Claim the study, choose its series, build the volume tensor, match the patient. Idempotent."""
    now = svc.clock.now()
    if not svc.store.claim_study(study_uid, now):
        row = svc.store.get_study(study_uid)
        return IngestResult(study_uid, "skipped", reason="unknown study" if row is None else f"status {row.status}")
    row = svc.store.get_study(study_uid)
    attempts = row.attempts if row is not None else 1
    times = StageTimes(svc.timer)
    try:
        result = _ingest_claimed(svc, study_uid, times)
    except DomainError as err:
        return _study_failed(svc, study_uid, attempts, err)
    except svc.interruptions as exc:  # the soft time limit: slow peers, not a bug; retried while attempts last
        limit = DomainError(Outcome.TIMED_OUT, f"ingest ran past the task's time limit ({type(exc).__name__})")
        return _study_failed(svc, study_uid, attempts, limit)
    except Exception as exc:  # a bug or an unforeseen input: record it, never lose the study
        # Never repr(exc): a driver's message can carry bound values (MRNs) and URLs with credentials. The type,
        # a redacted first line with the study's PatientID pseudonymised, and the frames (code, not values).
        message = describe_exception(exc, [row.dicom_patient_id if row is not None else None])
        frames = "".join(traceback.format_tb(exc.__traceback__))
        log.error("ingest of study %s crashed: %s\n%s", study_uid, message, frames)
        return _study_failed(svc, study_uid, attempts, DomainError(Outcome.INTERNAL_ERROR, message))
    finally:
        times.flush(svc.store)  # the stages that completed, also when a later one failed
    svc.store.resolve_failures("ingest", study_uid, svc.clock.now())
    return result


def _ingest_claimed(svc: Services, study_uid: str, times: StageTimes) -> IngestResult:
    row = svc.store.get_study(study_uid)
    if row is None:
        raise DomainError(Outcome.INTERNAL_ERROR, "the study vanished from the database while claimed")
    if row.volume_path is None:
        svc.store.set_study_volume(study_uid, _build_volume(svc, study_uid, row.source, times=times))

    # Patient matching: DICOM PatientID (+ IssuerOfPatientID) -> FHIR Patient.identifier.
    if not row.dicom_patient_id:
        raise DomainError(Outcome.UNMATCHED_PATIENT, "the study has no PatientID")
    system = svc.identifier_system_for(row.issuer)
    patient = svc.ehr.find_patient(system, row.dicom_patient_id)
    if patient is None:
        raise DomainError(
            Outcome.UNMATCHED_PATIENT,
            f"no FHIR Patient with identifier system {system or '(any)'} and the study's PatientID "
            f"({pseudonym(row.dicom_patient_id)}); held until the Patient appears",
        )
    svc.store.upsert_patient(patient.fhir_id, patient.birth_date, patient.gender)
    svc.store.set_study_ready(study_uid, patient.fhir_id)
    # The vitals sync then flags the patient for scoring. Queued here, leased so the sweep does not queue it again.
    svc.store.require_vitals_sync(patient.fhir_id, svc.clock.now() + timedelta(seconds=svc.redeliver_after_s))
    log.info("study %s ready for patient %s", study_uid, pseudonym(patient.fhir_id))
    svc.enqueue("vitals", [patient.fhir_id])
    # Earlier studies of this patient held while the Patient was missing: it is here now.
    svc.enqueue("ingest", svc.store.release_held_studies(row.dicom_patient_id, row.issuer))
    return IngestResult(study_uid, "ready", patient_fhir_id=patient.fhir_id)


def _series_source(svc: Services, study_uid: str, source: str) -> tuple[Pacs, list[SeriesRef]]:
    """Where a study's instances are read from, and its series: a study pushed by C-STORE from the spool (no PACS
    round trip); any other, or a pushed one whose instances retention removed, from the PACS."""
    if source == SCP_SOURCE and svc.spool is not None:
        series = svc.spool.list_series(study_uid)
        if series:
            return svc.spool, series
        log.info("study %s: its pushed instances are no longer in the spool; reading it from the PACS", study_uid)
    return svc.pacs, svc.pacs.list_series(study_uid)


def _build_volume(svc: Services, study_uid: str, source: str = "", *, times: StageTimes) -> BuiltVolume:
    """Choose the series, retrieve it, build the model's volume tensor and write it atomically."""
    if not is_dicom_uid(study_uid):  # it goes into PACS URLs: "../x" must not reach one
        raise DomainError(Outcome.INVALID_UID, f"refused {shown(study_uid)}: not a DICOM UID")
    pacs, series = _series_source(svc, study_uid, source)
    chosen, decisions = choose(series, svc.rules)
    svc.store.record_series_decisions(study_uid, decisions, chosen.series.series_uid if chosen else None)
    if chosen is None:
        reasons = "; ".join(d.reason for d in decisions) or "the study has no series"
        raise DomainError(Outcome.NO_ELIGIBLE_SERIES, f"no eligible brain CT/MR series: {reasons}")
    svc.limits.check_series(chosen.series)  # the counts the PACS declared, before a byte is retrieved
    modality, slices = times.timed(stages.RETRIEVE, pacs.retrieve_series, study_uid, chosen.series.series_uid)
    started = svc.timer()
    try:
        image = series_tensor(slices, modality)
    except PreprocessError as err:
        raise DomainError(_PREPROCESS_OUTCOMES.get(err.code, Outcome.CORRUPT_PIXEL_DATA), str(err)) from err
    if not np.isfinite(image).all():
        raise DomainError(Outcome.CORRUPT_PIXEL_DATA, "volume contains non-finite values")
    path = volume_path(svc.volumes_dir, study_uid)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npy")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)  # PHI: the engine's user only
    os.fchmod(fd, 0o600)  # also when a crashed attempt left the file behind with another mode
    with os.fdopen(fd, "wb") as handle:
        np.save(handle, image)
    tmp.replace(path)  # atomic: a reader never sees half a volume
    digest = hashlib.sha256(image.tobytes()).hexdigest()
    times.since(stages.PREPROCESS, started)
    return BuiltVolume(str(path), digest, chosen.series.series_uid, modality)


def volume_path(volumes_dir: Path, study_uid: str) -> Path:
    """Where a study's volume is written: a name derived from the UID (SHA-256), never the UID itself, and
    checked to lie directly in ``volumes_dir`` once resolved (a symlinked file is refused too)."""
    directory = volumes_dir.resolve()
    path = directory / f"{opaque_name(study_uid)}.npy"
    if path.resolve().parent != directory:
        raise DomainError(Outcome.INTERNAL_ERROR, f"the volume of study {shown(study_uid)} would leave {directory}")
    return path


def _study_failed(svc: Services, study_uid: str, attempts: int, err: DomainError) -> IngestResult:
    now = svc.clock.now()
    svc.store.record_failure("ingest", study_uid, err.outcome, err.message, err.retryable)
    status: StudyStatus
    if err.outcome is Outcome.UNMATCHED_PATIENT:
        # Held, not failed: retried on a slow schedule, and at once when the EHR poll sees the Patient.
        status, retry_at = StudyStatus.HELD, backoff_at(now, attempts, svc.held_retry_s, cap_s=3600)
    elif err.retryable and attempts < svc.max_retries:
        status, retry_at = StudyStatus.RETRY, backoff_at(now, attempts, svc.retry_backoff_s, err.retry_after)
    else:
        status, retry_at = StudyStatus.FAILED, None
    svc.store.set_study_outcome(study_uid, status, err.outcome, err.message, retry_at)
    log.warning("study %s: %s (%s): %s", study_uid, status.value, err.outcome.value, err.message)
    return IngestResult(study_uid, status.value, err.outcome.value, err.message)


def release_held_studies(svc: Services) -> list[str]:
    """Held (unmatched) studies whose Patient has appeared in the EHR since the last look: back in the
    queue now, not at their next slow retry. One ``_lastUpdated`` search per EHR poll, and none at all
    while nothing is held. Returns the released study UIDs (enqueued for ingest)."""
    now = svc.clock.now()
    held = svc.store.held_patient_keys()
    stored = svc.store.get_cursor(PATIENTS_CURSOR)
    if not held:
        svc.store.set_cursor(PATIENTS_CURSOR, now.isoformat())
        return []
    since = datetime.fromisoformat(stored) if stored else now - timedelta(hours=svc.lookback_hours)
    try:
        patients = svc.ehr.patients_updated_since(since - PATIENTS_OVERLAP)
    except DomainError as err:  # the held studies' own timer still retries them
        log.warning("looking for the Patients of %d held stud(ies) failed: %s", len(held), err.outcome.value)
        return []
    released: list[str] = []
    for issuer, patient_id in held:
        system = svc.identifier_system_for(issuer)
        if any(p.carries(system, patient_id) for p in patients):
            released += svc.store.release_held_studies(patient_id, issuer)
    svc.store.set_cursor(PATIENTS_CURSOR, now.isoformat())
    if released:
        log.info("released %d held stud%s: the Patient appeared", len(released), "y" if len(released) == 1 else "ies")
        svc.enqueue("ingest", released)
    return released


def retry_study(svc: Services, study_uid: str) -> bool:
    """Operator action: put a failed/held study back in the queue now. False if unknown or in progress."""
    if not svc.store.requeue_study(study_uid):
        return False
    svc.enqueue("ingest", [study_uid])
    return True
