"""Use case: pull a patient's vital-sign Observations from the EHR incrementally and keep them normalised."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from integration.domain import stages
from integration.domain.identity import pseudonym
from integration.domain.ids import is_dicom_uid, opaque_name
from integration.domain.retry import backoff_at
from integration.domain.types import DomainError, Outcome, RejectedValue
from integration.domain.vitals import parse_observations, vital_codes
from integration.domain.window import study_anchor, sync_since
from integration.services.context import Services
from integration.services.timing import record

log = logging.getLogger(__name__)

#: Re-read a little before the cursor: servers' lastUpdated has coarse resolution and ties, and a transaction may
#: commit after a later-stamped one was read.
CURSOR_OVERLAP = timedelta(seconds=2)
#: A cursor this old has settled: nothing still commits at or before it, so the overlap is dropped. Without this, a
#: batch written in one transaction (one lastUpdated for hundreds of Observations: an interface engine's bulk load)
#: would lie inside the overlap for ever and be read again at every poll.
CURSOR_SETTLED = timedelta(minutes=15)
#: A failing sync (EHR down, 429, a 4xx) is retried at retry_backoff_s doubling, at most this far apart.
RETRY_CAP_S = 3600.0
#: The failure ledger's subject column.
_SUBJECT_MAX = 128


@dataclass(frozen=True)
class VitalsResult:
    patient_fhir_id: str
    fetched: int
    accepted: int
    rejected: int
    changed: int
    outcome: str | None = None
    reason: str | None = None


def _last_updated(resource: dict[str, Any]) -> datetime | None:
    raw = (resource.get("meta") or {}).get("lastUpdated")
    if not raw:
        return None
    try:
        return datetime.fromisoformat(str(raw).replace("Z", "+00:00"))
    except ValueError:
        return None


def sync_vitals(
    svc: Services, patient_fhir_id: str, *, study_at: datetime | None = None, assess: bool = True
) -> VitalsResult:
    """Read what changed in the patient's vitals window since the last sync, normalise it, store it. ``study_at``:
    the window's anchor when no ready study gives it (a prefetch for a study still arriving). ``assess``: flag the
    patient for scoring when anything changed (or on a first sync since a new study); a prefetch does not, the
    study's own sync does once the study is ready."""
    started = svc.timer()
    patient = svc.store.get_patient(patient_fhir_id)
    if patient is None:
        return VitalsResult(patient_fhir_id, 0, 0, 0, 0, "skipped", "unknown patient")
    now = svc.clock.now()
    study = svc.store.latest_ready_study(patient_fhir_id)
    anchor = study_anchor(study.study_datetime, study.detected_at) if study else None
    if study_at is not None:
        anchor = study_at if anchor is None else min(anchor, study_at)
    since = sync_since(now, anchor)
    updated_since = incremental_since(patient.vitals_cursor, now)
    try:
        resources = svc.ehr.search_observations(patient_fhir_id, vital_codes(), since, updated_since)
    except DomainError as err:
        # Backoff per patient (the sweep and the EHR poll skip it until then), honouring the EHR's Retry-After.
        attempts = patient.vitals_attempts + 1
        retry_at = backoff_at(now, attempts, svc.retry_backoff_s, err.retry_after, cap_s=RETRY_CAP_S)
        svc.store.set_vitals_retry(patient_fhir_id, attempts, retry_at)
        svc.store.record_failure("vitals", patient_fhir_id, err.outcome, err.message, err.retryable)
        log.warning("vitals sync for %s failed (%d in a row): %s", pseudonym(patient_fhir_id), attempts,
                    err.outcome.value)
        raise
    parsed = parse_observations(resources)
    for (observation_id, outcome), reason in _rejections(parsed.rejected).items():
        svc.store.record_failure(
            "vitals", rejected_subject(patient_fhir_id, observation_id), outcome, reason, False,
            {"patient": patient_fhir_id, "observation": observation_id},
        )
    accepted_ids = {v.observation_id for v in parsed.accepted}
    removed = {str(r.get("id")) for r in resources if r.get("id") and str(r.get("id")) not in accepted_ids}
    changed = svc.store.replace_vitals(patient_fhir_id, parsed.accepted, removed)
    stamps = [t for t in (_last_updated(r) for r in resources) if t is not None]
    cursor = max(stamps) if stamps else None
    if patient.vitals_cursor and cursor and cursor < patient.vitals_cursor:
        cursor = patient.vitals_cursor
    svc.store.set_vitals_cursor(patient_fhir_id, cursor, now)
    # Any open failure of this patient's sync is over, also one a concurrent sync recorded after this one read
    # the patient (the attempt counter read above may be stale): an unconditional, indexed UPDATE.
    svc.store.resolve_failures("vitals", patient_fhir_id, now)
    first_time = patient.vitals_synced_at is None
    # A prefetch (``assess=False``) still flags a patient already followed for a ready study: what changed would
    # otherwise never be scored with it (the cursor has moved past it).
    flag = (assess or study is not None) and bool(changed or first_time)
    if flag:
        svc.store.mark_needs_assessment(patient_fhir_id)
    if flag or (assess and patient.needs_assessment):  # flagged by the study's ingest: scored now, with these vitals
        svc.enqueue("assess", [patient_fhir_id])
    record(svc.store, [(stages.VITALS, svc.timer() - started)])  # after the hand-off: the next stage never waits for it
    log.info(
        "vitals for %s: %d fetched, %d accepted, %d rejected, %d changed",
        pseudonym(patient_fhir_id),
        len(resources),
        len(parsed.accepted),
        len(parsed.rejected),
        changed,
    )
    return VitalsResult(patient_fhir_id, len(resources), len(parsed.accepted), len(parsed.rejected), changed)



def prefetch_vitals(svc: Services, study_uid: str) -> VitalsResult | None:
    """A study is arriving (its first instance pushed to the SCP): match its patient and sync their vitals now,
    while the rest of the study is still on the wire, so that when it completes its ingest reads only what changed
    since. Not flagged for scoring here (the study's ingest does that once its volume is ready). None when there is
    nothing to do: no such study, no Patient in the EHR yet (the ingest holds the study), or the EHR failing (the
    ingest's own sync tries again). Never raises for a peer's failure."""
    if not is_dicom_uid(study_uid):
        return None
    if svc.store.get_study(study_uid) is not None:
        return None  # already complete (registered): its ingest's own sync reads the vitals (a backlog, a re-send)
    ref = svc.spool.get_study(study_uid) if svc.spool is not None else None
    if ref is None or not ref.patient_id:
        return None
    try:
        patient = svc.ehr.find_patient(svc.identifier_system_for(ref.issuer), ref.patient_id)
    except DomainError as err:
        log.info("vitals prefetch for study %s skipped: %s", study_uid, err.outcome.value)
        return None
    if patient is None:
        return None
    svc.store.upsert_patient(patient.fhir_id, patient.birth_date, patient.gender)
    now = svc.clock.now()
    anchor = study_anchor(ref.study_datetime, now)
    try:
        return sync_vitals(svc, patient.fhir_id, study_at=anchor, assess=False)
    except DomainError:
        return None  # recorded by the sync (failure row, backoff); the ingest's sync tries again


def incremental_since(cursor: datetime | None, now: datetime) -> datetime | None:
    """The ``_lastUpdated`` lower bound (exclusive) of the next sync: the cursor less the overlap while it is
    recent, the cursor itself once settled; None (read everything in the window) before the first sync."""
    if cursor is None:
        return None
    return cursor if cursor <= now - CURSOR_SETTLED else cursor - CURSOR_OVERLAP


def rejected_subject(patient_fhir_id: str, observation_id: str) -> str:
    """The failure ledger's subject for a rejected Observation: ``{patient}/{observation}``, so each patient's
    bad value has one open row (per outcome) however often it is polled, and two patients' Observations with the
    same id never share one. Both ids shown (FHIR ids, no PHI); over the column's 128 characters (two 64-character
    ids) the Observation part becomes a digest of both."""
    subject = f"{patient_fhir_id}/{observation_id}"
    if len(subject) <= _SUBJECT_MAX:
        return subject
    return f"{patient_fhir_id[:_SUBJECT_MAX - 66]}/{opaque_name(subject)[:64]}"


def _rejections(rejected: list[RejectedValue]) -> dict[tuple[str, Outcome], str]:
    """One entry per (Observation, outcome): a blood-pressure panel with both components implausible is one
    problem of that Observation (its reasons joined), counted once per sync."""
    out: dict[tuple[str, Outcome], str] = {}
    for rej in rejected:
        key = (rej.observation_id, rej.outcome)
        out[key] = rej.reason if key not in out or rej.reason in out[key] else f"{out[key]}; {rej.reason}"
    return out


def request_vitals_sync(svc: Services, patient_ids: list[str]) -> list[str]:
    """An EHR notification named these patients: queue a vitals sync for those the engine follows.
    Returns them (the others are ignored: the engine follows a patient from their first study)."""
    known = [pid for pid in dict.fromkeys(patient_ids) if svc.store.get_patient(pid) is not None]
    svc.enqueue("vitals", known)
    if known:
        log.info("EHR notification: vitals sync queued for %d patient(s)", len(known))
    return known
