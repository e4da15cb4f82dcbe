"""Use case: pull a patient's vital-sign Observations from the EHR incrementally and keep them normalised."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from integration.domain.identity import pseudonym
from integration.domain.types import DomainError
from integration.domain.vitals import parse_observations, vital_codes
from integration.domain.window import study_anchor, sync_since
from integration.services.context import Services

log = logging.getLogger(__name__)

#: Re-read a little before the cursor: servers' lastUpdated has coarse resolution and ties.
CURSOR_OVERLAP = timedelta(seconds=2)


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


def sync_vitals(svc: Services, patient_fhir_id: str) -> VitalsResult:
    patient = svc.store.get_patient(patient_fhir_id)
    if patient is None:
        return VitalsResult(patient_fhir_id, 0, 0, 0, 0, "skipped", "unknown patient")
    now = svc.clock.now()
    study = svc.store.latest_ready_study(patient_fhir_id)
    since = sync_since(now, study_anchor(study.study_datetime, study.detected_at) if study else None)
    updated_since = patient.vitals_cursor - CURSOR_OVERLAP if patient.vitals_cursor else None
    try:
        resources = svc.ehr.search_observations(patient_fhir_id, vital_codes(), since, updated_since)
    except DomainError as err:
        svc.store.record_failure("vitals", patient_fhir_id, err.outcome, err.message, err.retryable)
        log.warning("vitals sync for %s failed: %s", pseudonym(patient_fhir_id), err.outcome.value)
        raise
    parsed = parse_observations(resources)
    for rej in parsed.rejected:
        svc.store.record_failure(
            "vitals", rej.observation_id, rej.outcome, rej.reason, False, {"patient": patient_fhir_id}
        )
    accepted_ids = {v.observation_id for v in parsed.accepted}
    removed = {str(r.get("id")) for r in resources if r.get("id") and str(r.get("id")) not in accepted_ids}
    changed = svc.store.replace_vitals(patient_fhir_id, parsed.accepted, removed)
    stamps = [t for t in (_last_updated(r) for r in resources) if t is not None]
    cursor = max(stamps) if stamps else None
    if patient.vitals_cursor and cursor and cursor < patient.vitals_cursor:
        cursor = patient.vitals_cursor
    svc.store.set_vitals_cursor(patient_fhir_id, cursor, now)
    first_time = patient.vitals_synced_at is None
    if changed or first_time:
        svc.store.mark_needs_assessment(patient_fhir_id)
        svc.enqueue("assess", [patient_fhir_id])
    log.info(
        "vitals for %s: %d fetched, %d accepted, %d rejected, %d changed",
        pseudonym(patient_fhir_id),
        len(resources),
        len(parsed.accepted),
        len(parsed.rejected),
        changed,
    )
    return VitalsResult(patient_fhir_id, len(resources), len(parsed.accepted), len(parsed.rejected), changed)



def request_vitals_sync(svc: Services, patient_ids: list[str]) -> list[str]:
    """An EHR notification named these patients: queue a vitals sync for those the engine follows.
    Returns them (the others are ignored: the engine follows a patient from their first study)."""
    known = [pid for pid in dict.fromkeys(patient_ids) if svc.store.get_patient(pid) is not None]
    svc.enqueue("vitals", known)
    if known:
        log.info("EHR notification: vitals sync queued for %d patient(s)", len(known))
    return known
