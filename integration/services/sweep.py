"""Use cases on a timer: the sweep (dead claims, due retries) and the EHR poll.

Retries live in the database (``next_attempt_at``), not in the broker: the sweep re-enqueues whatever is
due, so a lost message, a restarted broker or a killed worker loses nothing.

The database stays the source of truth, and the queue holds one message per piece of work: what the sweep and
the poll enqueue they lease first (its next-attempt time moves ``redeliver_after_s`` ahead in the same
statement that selects it), so a backlog longer than the sweep's period does not multiply messages, and a
message lost on the way is sent again after the lease, never sooner. Claims check the status, not the time,
so the queued message still claims its leased row; a success or a failure sets the next-attempt time anew.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta

from integration.domain.identity import pseudonym
from integration.domain.records import ReleasedClaims
from integration.domain.types import Outcome
from integration.domain.window import followed_since
from integration.services.context import Services
from integration.services.studies import release_held_studies

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SweepResult:
    released: int
    studies: int
    patients: int
    publish: int
    #: Work failed as ``worker_lost``: its claim was lost to a dying worker ``max_lost_claims`` times.
    given_up: int = 0
    #: Patients whose vitals sync was queued (never synced since their last study, past any backoff).
    vitals: int = 0


#: Patients the EHR poll queues per run (least recently synced first, so a longer list rotates).
POLL_BATCH = 1000


def sweep(svc: Services) -> SweepResult:
    """Release claims of workers that died, and queue every study, patient and assessment now due, each leased
    for ``redeliver_after_s`` as it is taken (see the module's docstring)."""
    now = svc.clock.now()
    reaped = reap_dead_claims(svc, now)
    released = reaped.released
    until = now + timedelta(seconds=svc.redeliver_after_s)
    studies = svc.store.lease_due_studies(now, until)
    svc.enqueue("ingest", studies)
    vitals = svc.store.lease_patients_needing_vitals(now, until)
    svc.enqueue("vitals", vitals)
    patients = svc.store.lease_due_patients(now, until, 1000)
    svc.enqueue("assess", patients)
    publish = svc.store.lease_due_assessments(now, until)
    svc.enqueue("publish", publish)
    record_latency_snapshot(svc, now)
    return SweepResult(released, len(studies), len(patients), len(publish), given_up=len(reaped.given_up),
                       vitals=len(vitals))


def record_latency_snapshot(svc: Services, now: datetime) -> bool:
    """A copy of the stage histogram for the dashboard's percentiles over time, when one is due. A database error
    here is logged and never stops the sweep's real work (done above)."""
    try:
        return svc.store.snapshot_stages(now, svc.latency_snapshot_s, svc.latency_snapshots_kept)
    except Exception as exc:  # noqa: BLE001 - any driver's error; the next sweep tries again
        log.warning("stage latency snapshot skipped: %s", type(exc).__name__)
        return False


def reap_dead_claims(svc: Services, now: datetime) -> ReleasedClaims:
    """Claims of workers that died (SIGKILL, out of memory, Celery's hard time limit: the pool child is killed
    and the claim stays) go back to the queue; work that lost ``max_lost_claims`` claims is a poison input and
    is failed as ``worker_lost`` instead, with a failure row so ``/failures`` shows it and an operator can
    replay it (study retry, patient reassess, assessment republish)."""
    reaped = svc.store.release_stale_claims(now - timedelta(seconds=svc.stale_claim_s), svc.max_lost_claims)
    for stage, subject in reaped.given_up:
        message = (
            f"the worker processing it died {svc.max_lost_claims} time(s) (killed, out of memory or past the task "
            f"time limit); not retried automatically: {_REPLAY[stage]} once the cause is fixed"
        )
        svc.store.record_failure(stage, subject, Outcome.WORKER_LOST, message, False)
        log.error("%s of %s given up: %s", stage, _shown(stage, subject), Outcome.WORKER_LOST.value)
    return reaped


_REPLAY = {
    "ingest": "replay with POST /studies/{uid}/retry",
    "assess": "replay with POST /patients/{fhir_id}/reassess",
    "publish": "replay with POST /assessments/{identifier}/republish or `strokewatch republish`",
}


def _shown(stage: str, subject: str) -> str:
    return pseudonym(subject) if stage == "assess" else subject  # patient ids stay out of logs


def poll_ehr(svc: Services) -> int:
    """Queue an incremental vitals sync for each patient with work in their window; release held studies whose
    Patient has appeared. Returns how many syncs were queued.

    Followed: (a) patients whose vitals were never synced since their last ready study, and (b) patients whose
    newest ready study's anchor (``domain.window.study_anchor``: its date/time, never after it was first seen)
    is at or after ``domain.window.followed_since(now)``, i.e. inside the model's window (``WINDOW_HOURS``)
    of a vital sign taken now, so a new value still changes the assessment of that study's episode. Both skip a
    patient whose sync is backing off after a failure or already queued (leased, ``vitals_next_attempt_at``).
    Everyone else is not re-synced by the poll: a FHIR Subscription notification still syncs them, and their
    next study brings them back. At most ``POLL_BATCH`` per kind and run, the least recently synced first.
    """
    release_held_studies(svc)
    now = svc.clock.now()
    until = now + timedelta(seconds=svc.redeliver_after_s)
    ids = svc.store.lease_patients_needing_vitals(now, until, POLL_BATCH)
    ids += svc.store.lease_patients_in_window(now, followed_since(now), until, POLL_BATCH)
    svc.enqueue("vitals", ids)
    return len(ids)
