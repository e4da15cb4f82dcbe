"""Use cases on a timer: the sweep (dead claims, due retries) and the EHR poll.

Retries live in the database (``next_attempt_at``), not in the broker: the sweep re-enqueues whatever is
due, so a lost message, a restarted broker or a killed worker loses nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from integration.services.context import Services
from integration.services.studies import release_held_studies


@dataclass(frozen=True)
class SweepResult:
    released: int
    studies: int
    patients: int
    publish: int


def sweep(svc: Services) -> SweepResult:
    """Release claims of workers that died, and queue every study, patient and assessment now due."""
    now = svc.clock.now()
    released = svc.store.release_stale_claims(now - timedelta(seconds=svc.stale_claim_s))
    studies = svc.store.studies_due(now)
    svc.enqueue("ingest", studies)
    svc.enqueue("vitals", svc.store.patients_needing_vitals())
    patients = svc.store.patients_due(now, 1000)
    svc.enqueue("assess", patients)
    publish = svc.store.assessments_due(now)
    svc.enqueue("publish", publish)
    return SweepResult(released, len(studies), len(patients), len(publish))


def poll_ehr(svc: Services) -> int:
    """Every followed patient's vitals, synced incrementally; held studies whose Patient has appeared."""
    release_held_studies(svc)
    ids = svc.store.all_patient_ids()
    svc.enqueue("vitals", ids)
    return len(ids)
