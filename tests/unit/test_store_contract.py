"""The Store port's contract, checked on both implementations: SqlStore (SQLite) and the unit tests' FakeStore.

If the fake drifts from the database, these fail; the service tests that use the fake stay honest.
"""

from __future__ import annotations

import math
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from integration.adapters.db.session import make_engine, upgrade
from integration.adapters.db.store import SqlStore
from integration.domain.records import AssessmentStatus, BuiltVolume, NewAssessment, ReleasedClaims, StudyStatus
from integration.domain.types import Outcome, StudyRef, VitalValue
from integration.ports import Store
from tests.unit.fakes import NOW, FakeClock, FakeStore


@pytest.fixture(params=["sql", "fake"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    if request.param == "fake":
        return FakeStore(FakeClock(NOW))
    url = f"sqlite:///{tmp_path / 'contract.db'}"
    upgrade(url)
    return SqlStore(make_engine(url))


def study(uid: str, pid: str = "MRN1", issuer: str | None = None, hours_ago: float = 1.0) -> StudyRef:
    return StudyRef(uid, pid, issuer, NOW - timedelta(hours=hours_ago))


def test_studies_are_deduplicated_claimed_once_and_follow_their_states(store: Store) -> None:
    assert store.add_study(study("1.1"), "qido", NOW) and not store.add_study(study("1.1"), "api", NOW)
    assert store.known_studies(["1.1", "1.2"]) == {"1.1"}
    row = store.get_study("1.1")
    assert row is not None and row.status is StudyStatus.DETECTED and row.source == "qido"
    assert store.claim_study("1.1", NOW) and not store.claim_study("1.1", NOW)
    assert not store.requeue_study("1.1")  # being processed
    store.set_study_volume("1.1", BuiltVolume("/v/1.1.npy", "ab" * 32, "1.1.9", "CT"))
    store.set_study_outcome("1.1", StudyStatus.RETRY, Outcome.PACS_UNAVAILABLE, "down", NOW + timedelta(minutes=1))
    row = store.get_study("1.1")
    assert row is not None and row.status is StudyStatus.RETRY and row.attempts == 1 and row.claimed_at is None
    assert row.volume_path == "/v/1.1.npy" and row.modality == "CT" and row.outcome == "pacs_unavailable"
    assert store.studies_due(NOW) == [] and store.studies_due(NOW + timedelta(minutes=2)) == ["1.1"]
    assert store.claim_study("1.1", NOW)
    store.set_study_ready("1.1", "pat-1")
    ready = store.latest_ready_study("pat-1")
    assert ready is not None and ready.study_uid == "1.1" and ready.outcome is None
    assert store.requeue_study("1.1") and store.get_study("1.1").attempts == 0  # type: ignore[union-attr]
    assert not store.requeue_study("9.9")


def test_latest_ready_study_is_the_newest_taken(store: Store) -> None:
    for uid, hours in (("2.1", 5), ("2.2", 1), ("2.3", 3)):
        store.add_study(study(uid, hours_ago=hours), "qido", NOW)
        store.claim_study(uid, NOW)
        store.set_study_ready(uid, "pat-2")
    assert store.latest_ready_study("pat-2").study_uid == "2.2"  # type: ignore[union-attr]


def test_fresh_studies_are_due_only_after_the_grace_period(store: Store) -> None:
    store.add_study(study("3.1"), "qido", NOW)
    assert store.studies_due(NOW, grace_s=30) == []
    assert store.studies_due(NOW + timedelta(seconds=31), grace_s=30) == ["3.1"]


def test_held_studies_are_listed_by_patient_and_released_once(store: Store) -> None:
    for uid, pid, issuer in (("4.1", "A", None), ("4.2", "A", None), ("4.3", "A", "HOSP"), ("4.4", "B", None)):
        store.add_study(study(uid, pid, issuer), "qido", NOW)
        store.claim_study(uid, NOW)
        store.set_study_outcome(uid, StudyStatus.HELD, Outcome.UNMATCHED_PATIENT, "no Patient", NOW)
    assert sorted(store.held_patient_keys(), key=str) == sorted([(None, "A"), ("HOSP", "A"), (None, "B")], key=str)
    assert sorted(store.release_held_studies("A", None)) == ["4.1", "4.2"]
    assert store.release_held_studies("A", None) == []
    assert store.get_study("4.1").status is StudyStatus.RETRY  # type: ignore[union-attr]
    assert store.get_study("4.3").status is StudyStatus.HELD  # type: ignore[union-attr]


def test_patients_are_claimed_once_and_back_off(store: Store) -> None:
    store.upsert_patient("p1", "1950-01-01", "female")
    store.mark_needs_assessment("p1")
    assert store.patients_due(NOW, 10) == []  # vitals not synced yet
    assert store.patients_needing_vitals(NOW) == ["p1"]
    store.set_vitals_cursor("p1", NOW, NOW)
    assert store.patients_due(NOW, 10) == ["p1"]
    assert store.claim_patient("p1", NOW) and not store.claim_patient("p1", NOW)
    store.release_patient("p1", retry_at=NOW + timedelta(minutes=5), outcome="model_unavailable", reason="down")
    assert store.patients_due(NOW, 10) == [] and store.patients_due(NOW + timedelta(minutes=6), 10) == ["p1"]
    p = store.get_patient("p1")
    assert p is not None and p.attempts == 1 and p.outcome == "model_unavailable" and p.vitals_cursor == NOW
    store.require_vitals_sync("p1")
    assert store.patients_needing_vitals(NOW) == ["p1"]


def test_vitals_count_changes_and_read_the_half_open_window(store: Store) -> None:
    store.upsert_patient("p2", None, None)
    values = [VitalValue("hr", 70.0, NOW - timedelta(hours=h), f"o{h}") for h in (1, 2, 3)]
    assert store.replace_vitals("p2", values, []) == 3
    assert store.replace_vitals("p2", values, []) == 0
    assert store.replace_vitals("p2", [VitalValue("hr", 71.0, NOW - timedelta(hours=1), "o1")], ["o3"]) == 2
    window = store.vitals_between("p2", NOW - timedelta(hours=2), NOW)
    assert [v.observation_id for v in window] == ["o1"]  # start excluded, end included, oldest first
    assert store.latest_vital_time("p2", NOW) == NOW - timedelta(hours=1)
    assert store.latest_vital_time("p2", NOW - timedelta(hours=5)) is None


def new_assessment(ident: str, supersedes: str | None = None) -> NewAssessment:
    return NewAssessment(ident, "p3", "1.1", NOW, "1.0", "fake", True, 0.4, "high", "f" * 64, 2,
                         {"resourceType": "RiskAssessment"}, supersedes)


def test_assessments_are_unique_supersede_and_publish(store: Store) -> None:
    assert store.add_assessment(new_assessment("a1")) and not store.add_assessment(new_assessment("a1"))
    assert store.add_assessment(new_assessment("a2", supersedes="a1"))
    assert store.get_assessment("a1").superseded  # type: ignore[union-attr]
    assert store.latest_assessment("p3").identifier == "a2"  # type: ignore[union-attr]
    assert sorted(store.assessments_due(NOW)) == ["a1", "a2"]
    assert store.claim_assessment("a2", NOW) and not store.claim_assessment("a2", NOW)
    store.set_assessment_outcome("a2", AssessmentStatus.RETRY, Outcome.EHR_UNAVAILABLE, "503", NOW + timedelta(1))
    assert store.assessments_due(NOW) == ["a1"]
    assert store.claim_assessment("a2", NOW)
    store.set_assessment_published("a2", "ra-9", NOW)
    a2 = store.get_assessment("a2")
    assert a2 is not None and a2.status is AssessmentStatus.PUBLISHED and a2.fhir_id == "ra-9" and a2.outcome is None
    assert a2.resource == {"resourceType": "RiskAssessment"} and a2.attempts == 2


def test_stale_claims_are_released_and_failures_counted(store: Store) -> None:
    store.add_study(study("5.1"), "qido", NOW)
    store.claim_study("5.1", NOW - timedelta(hours=1))
    store.upsert_patient("p5", None, None)
    store.mark_needs_assessment("p5")
    store.claim_patient("p5", NOW - timedelta(hours=1))
    store.add_assessment(new_assessment("a5"))
    store.claim_assessment("a5", NOW - timedelta(hours=1))
    assert store.release_stale_claims(NOW - timedelta(minutes=10)) == ReleasedClaims(3, ())
    assert store.get_study("5.1").status is StudyStatus.RETRY  # type: ignore[union-attr]
    store.record_failure("ingest", "5.1", Outcome.PACS_UNAVAILABLE, "down", True)
    store.record_failure("ingest", "5.1", Outcome.PACS_UNAVAILABLE, "down", True)
    store.record_failure("vitals", "o1", Outcome.IMPLAUSIBLE_VALUE, "hr 900", False, {"patient": "p5"})
    store.resolve_failures("ingest", "5.1", NOW)
    counts = store.counts()
    assert counts["open_failures"] == {"implausible_value": 1}
    assert counts["studies"] == {"retry": 1} and counts["patients"] == {"idle": 1}
    assert counts["assessments"] == {"scored": 1}
    store.set_cursor("c", "1")
    store.set_cursor("c", "2")
    assert store.get_cursor("c") == "2" and store.get_cursor("none") is None


# -- dead claims and operator replays (issue 17) ---------------------------------------------------------------

def _kill_holders(store: Store, at: datetime) -> ReleasedClaims:
    """Claim the study, the patient and the assessment at ``at``, as workers that then die, and reap."""
    assert store.claim_study("6.1", at)
    store.mark_needs_assessment("p6")
    assert store.claim_patient("p6", at)
    assert store.claim_assessment("a6", at)
    return store.release_stale_claims(at + timedelta(minutes=1), max_lost_claims=3)


def test_lost_claims_are_counted_and_the_third_gives_up_as_worker_lost(store: Store) -> None:
    store.add_study(study("6.1"), "qido", NOW)
    store.upsert_patient("p6", None, None)
    store.add_assessment(replace(new_assessment("a6"), patient_fhir_id="p6"))
    for k in (1, 2):
        assert _kill_holders(store, NOW + timedelta(hours=k)) == ReleasedClaims(3, ())
        row, patient, assessment = store.get_study("6.1"), store.get_patient("p6"), store.get_assessment("a6")
        assert row is not None and row.status is StudyStatus.RETRY and row.lost_claims == k
        assert patient is not None and patient.needs_assessment and patient.lost_claims == k
        assert assessment is not None and assessment.status is AssessmentStatus.SCORED and assessment.lost_claims == k
    # a claim that is not stale yet is neither released nor counted
    assert store.claim_study("6.1", NOW + timedelta(hours=3))
    assert store.release_stale_claims(NOW + timedelta(hours=3), max_lost_claims=3) == ReleasedClaims(0, ())
    store.set_study_outcome("6.1", StudyStatus.RETRY, Outcome.PACS_UNAVAILABLE, "down", None)
    reaped = _kill_holders(store, NOW + timedelta(hours=4))
    assert reaped.released == 0
    assert sorted(reaped.given_up) == [("assess", "p6"), ("ingest", "6.1"), ("publish", "a6")]
    row, patient, assessment = store.get_study("6.1"), store.get_patient("p6"), store.get_assessment("a6")
    assert row is not None and row.status is StudyStatus.FAILED and row.outcome == "worker_lost"
    assert row.lost_claims == 3 and row.claimed_at is None
    assert patient is not None and not patient.needs_assessment and patient.outcome == "worker_lost"
    assert store.patients_due(NOW + timedelta(days=1), 10) == []
    assert assessment is not None and assessment.status is AssessmentStatus.FAILED
    assert assessment.outcome == "worker_lost" and store.assessments_due(NOW + timedelta(days=1)) == []
    assert store.studies_due(NOW + timedelta(days=1)) == []
    # operator replays: fresh counts, due now
    assert store.requeue_study("6.1") and store.get_study("6.1").lost_claims == 0  # type: ignore[union-attr]
    assert store.requeue_patient("p6") and store.get_patient("p6").lost_claims == 0  # type: ignore[union-attr]
    store.set_vitals_cursor("p6", None, NOW)
    assert store.patients_due(NOW, 10) == ["p6"]
    assert store.requeue_assessment("a6") and store.assessments_due(NOW) == ["a6"]
    a6 = store.get_assessment("a6")
    assert a6 is not None and a6.status is AssessmentStatus.RETRY and a6.lost_claims == 0 and a6.attempts == 0
    assert not store.requeue_patient("nobody") and not store.requeue_assessment("none")


def test_a_success_clears_the_lost_claims_and_work_in_progress_is_not_replayed(store: Store) -> None:
    store.add_study(study("6.1"), "qido", NOW)
    store.upsert_patient("p6", None, None)
    store.add_assessment(replace(new_assessment("a6"), patient_fhir_id="p6"))
    _kill_holders(store, NOW)
    assert store.claim_study("6.1", NOW) and store.claim_patient("p6", NOW) and store.claim_assessment("a6", NOW)
    assert not store.requeue_patient("p6") and not store.requeue_assessment("a6")  # being worked on
    store.set_study_ready("6.1", "p6")
    store.release_patient("p6")
    store.set_assessment_published("a6", "ra-1", NOW)
    assert store.get_study("6.1").lost_claims == 0  # type: ignore[union-attr]
    assert store.get_patient("p6").lost_claims == 0  # type: ignore[union-attr]
    assert store.get_assessment("a6").lost_claims == 0  # type: ignore[union-attr]
    assert store.requeue_assessment("a6")  # a published one may be re-sent (the conditional create finds it)


# -- retention ---------------------------------------------------------------------------------------------------

def test_study_volumes_are_listed_by_age_and_forgotten_conditionally(store: Store) -> None:
    for uid, status in (("7.1", StudyStatus.READY), ("7.2", StudyStatus.FAILED), ("7.3", StudyStatus.HELD)):
        store.add_study(study(uid), "qido", NOW - timedelta(days=10))
        store.claim_study(uid, NOW)
        store.set_study_volume(uid, BuiltVolume(f"/v/{uid}.npy", "ab" * 32, "9", "CT"))
        if status is StudyStatus.READY:
            store.set_study_ready(uid, "p7")
        else:
            store.set_study_outcome(uid, status, Outcome.UNMATCHED_PATIENT, "x", None)
    store.add_study(study("7.4"), "qido", NOW)  # seen now: too young
    store.claim_study("7.4", NOW)
    store.set_study_volume("7.4", BuiltVolume("/v/7.4.npy", "ab" * 32, "9", "CT"))
    store.set_study_ready("7.4", "p7")
    listed = store.studies_with_volumes(NOW - timedelta(days=7), "", 10)
    assert [s.study_uid for s in listed] == ["7.1", "7.2"]  # ready or failed, seen before the cutoff
    assert [s.study_uid for s in store.studies_with_volumes(NOW - timedelta(days=7), "7.1", 10)] == ["7.2"]
    assert not store.clear_study_volume("7.1", "/v/other.npy")  # the row names another file now
    assert store.clear_study_volume("7.1", "/v/7.1.npy")
    row = store.get_study("7.1")
    assert row is not None and row.volume_path is None and row.volume_sha256 == "ab" * 32
    assert [s.study_uid for s in store.studies_with_volumes(NOW - timedelta(days=7), "", 10)] == ["7.2"]


def test_resolved_failures_and_superseded_assessments_are_pruned_in_batches(store: Store) -> None:
    for k in range(5):
        store.record_failure("ingest", f"8.{k}", Outcome.PACS_UNAVAILABLE, "down", True)
        store.resolve_failures("ingest", f"8.{k}", NOW - timedelta(days=100 if k < 3 else 10))
    store.record_failure("ingest", "8.9", Outcome.PACS_UNAVAILABLE, "down", True)  # open: kept
    before = NOW - timedelta(days=90)
    assert store.prune_resolved_failures(before, batch_size=2, dry_run=True) == 3
    assert store.prune_resolved_failures(before, batch_size=2) == 3
    assert store.prune_resolved_failures(before, batch_size=2) == 0
    assert store.counts()["open_failures"] == {"pacs_unavailable": 1}

    store.add_assessment(new_assessment("b1"))
    store.add_assessment(new_assessment("b2", supersedes="b1"))
    store.add_assessment(new_assessment("b3", supersedes="b2"))
    assert store.claim_assessment("b2", NOW)  # being published: kept this time
    scored = store.get_assessment("b1").created_at  # type: ignore[union-attr]  # the store's own stamp
    assert store.prune_superseded_assessments(scored + timedelta(seconds=1), 1, dry_run=True) == 1
    assert store.prune_superseded_assessments(scored - timedelta(days=1), 1) == 0  # scored after the cutoff
    assert store.prune_superseded_assessments(scored + timedelta(seconds=1), 1) == 1
    assert store.get_assessment("b1") is None and store.get_assessment("b2") is not None
    assert store.latest_assessment("p3").identifier == "b3"  # type: ignore[union-attr]


def test_old_vitals_go_except_those_in_a_current_window(store: Store) -> None:
    day = timedelta(days=1)
    store.upsert_patient("p9", None, None)
    store.upsert_patient("q9", None, None)
    old = [VitalValue("hr", 70.0, NOW - k * day, f"p9-o{k}") for k in (500, 450, 20, 1)]
    quiet = [VitalValue("hr", 70.0, NOW - k * day, f"q9-o{k}") for k in (900, 700, 690)]
    store.replace_vitals("p9", old, [])
    store.replace_vitals("q9", quiet, [])
    # p9's current assessment was scored on a window that ended 440 days ago: its inputs stay
    store.add_assessment(replace(new_assessment("c1"), patient_fhir_id="p9", window_end=NOW - 440 * day))
    before = NOW - 400 * day
    assert store.prune_vitals(before, timedelta(days=28), 2, dry_run=True) == 2
    assert store.prune_vitals(before, timedelta(days=28), 2) == 2
    left = {v.observation_id for v in store.vitals_between("p9", NOW - 1000 * day, NOW)}
    assert left == {"p9-o450", "p9-o20", "p9-o1"}  # o500: outside every window; o450 in c1's window
    # q9 has had no vital for 690 days: a re-scoring would read the window before the newest one
    assert {v.observation_id for v in store.vitals_between("q9", NOW - 1000 * day, NOW)} == {"q9-o700", "q9-o690"}
    assert store.prune_vitals(before, timedelta(days=28), 2) == 0


# -- the failure ledger, backoff and leases (issue 17) ------------------------------------------------------------

def test_a_repeated_failure_is_one_open_row_that_counts_its_occurrences(store: Store) -> None:
    for k in range(3):  # the same implausible value, polled three times
        store.record_failure("vitals", "p1/o1", Outcome.IMPLAUSIBLE_VALUE, f"hr {900 + k}", False, {"patient": "p1"})
    counts = store.counts()
    assert counts["open_failures"] == {"implausible_value": 1}
    assert counts["open_failure_occurrences"] == {"implausible_value": 3}
    store.record_failure("vitals", "p2/o1", Outcome.IMPLAUSIBLE_VALUE, "hr 900", False)  # another subject
    store.record_failure("vitals", "p1/o1", Outcome.MISSING_UNIT, "no unit", False)  # another outcome
    assert store.counts()["open_failures"] == {"implausible_value": 2, "missing_unit": 1}
    store.resolve_failures("vitals", "p1/o1", NOW)
    store.record_failure("vitals", "p1/o1", Outcome.IMPLAUSIBLE_VALUE, "hr 900", False)  # back after a fix: new row
    counts = store.counts()
    assert counts["open_failures"] == {"implausible_value": 2}
    assert counts["open_failure_occurrences"] == {"implausible_value": 2}
    assert store.prune_resolved_failures(NOW + timedelta(seconds=1), 10, dry_run=True) == 2  # the resolved rows


def test_vitals_are_matched_per_patient(store: Store) -> None:
    for pid in ("pa", "pb"):
        store.upsert_patient(pid, None, None)
    when = NOW - timedelta(hours=1)
    assert store.replace_vitals("pa", [VitalValue("hr", 70.0, when, "o1")], []) == 1
    assert store.replace_vitals("pb", [VitalValue("hr", 110.0, when, "o1")], []) == 1  # same id, other patient
    assert store.replace_vitals("pa", [VitalValue("hr", 70.0, when, "o1")], []) == 0
    window = (NOW - timedelta(hours=2), NOW)
    assert [v.value for v in store.vitals_between("pa", *window)] == [70.0]
    assert [v.value for v in store.vitals_between("pb", *window)] == [110.0]
    assert store.replace_vitals("pa", [], ["o1"]) == 1  # removed from pa's record only
    assert store.vitals_between("pa", *window) == []
    assert [v.value for v in store.vitals_between("pb", *window)] == [110.0]


def test_a_failed_vitals_sync_backs_off_and_a_success_resets_it(store: Store) -> None:
    store.upsert_patient("p1", None, None)
    assert store.patients_needing_vitals(NOW) == ["p1"]
    store.set_vitals_retry("p1", 2, NOW + timedelta(seconds=10))
    p = store.get_patient("p1")
    assert p is not None and p.vitals_attempts == 2 and p.vitals_next_attempt_at == NOW + timedelta(seconds=10)
    assert store.patients_needing_vitals(NOW) == []
    assert store.lease_patients_needing_vitals(NOW, NOW + timedelta(minutes=2)) == []
    later = NOW + timedelta(seconds=10)
    assert store.patients_needing_vitals(later) == ["p1"]
    # leased as it is queued: not handed out again before the lease ends (a lost message is re-sent then)
    assert store.lease_patients_needing_vitals(later, later + timedelta(minutes=2)) == ["p1"]
    assert store.lease_patients_needing_vitals(later + timedelta(minutes=1), later + timedelta(minutes=3)) == []
    assert store.lease_patients_needing_vitals(later + timedelta(minutes=2), later + timedelta(minutes=4)) == ["p1"]
    store.set_vitals_cursor("p1", None, NOW)
    p = store.get_patient("p1")
    assert p is not None and p.vitals_attempts == 0 and p.vitals_next_attempt_at is None
    assert store.patients_needing_vitals(NOW) == []  # synced


def test_due_work_is_leased_once_and_still_claimed_by_its_message(store: Store) -> None:
    until, soon = NOW + timedelta(minutes=2), NOW + timedelta(seconds=20)
    store.add_study(study("9.1"), "qido", NOW - timedelta(minutes=5))  # detected, its message lost
    store.add_study(study("9.2"), "qido", NOW)  # detected now: enqueued by detection, due after the grace (30 s)
    assert store.lease_due_studies(NOW, until) == ["9.1"]
    assert store.lease_due_studies(soon, until) == [] and store.studies_due(soon) == []
    assert sorted(store.lease_due_studies(until, until + timedelta(minutes=2))) == ["9.1", "9.2"]  # re-sent
    assert store.claim_study("9.1", until)  # the claim checks the status, not the lease
    store.set_study_outcome("9.1", StudyStatus.RETRY, Outcome.PACS_UNAVAILABLE, "down", until + timedelta(hours=1))
    assert store.lease_due_studies(until + timedelta(minutes=3), until + timedelta(minutes=5)) == ["9.2"]

    store.upsert_patient("p9", None, None)
    store.set_vitals_cursor("p9", NOW, NOW)
    store.mark_needs_assessment("p9")
    assert store.lease_due_patients(NOW, until, 10) == ["p9"]
    assert store.lease_due_patients(soon, until, 10) == [] and store.patients_due(soon, 10) == []
    assert store.claim_patient("p9", soon)

    store.add_assessment(new_assessment("d1"))
    store.add_assessment(new_assessment("d2"))
    assert sorted(store.lease_due_assessments(NOW, until, limit=1) + store.lease_due_assessments(NOW, until)) == [
        "d1", "d2"]  # a limit takes some; the rest come with the next call, none twice
    assert store.lease_due_assessments(soon, until) == []
    assert store.claim_assessment("d1", soon) and store.claim_assessment("d2", soon)


def test_the_ehr_poll_follows_patients_with_a_study_in_the_window(store: Store) -> None:
    since, until = NOW - timedelta(days=28), NOW + timedelta(minutes=2)
    cases = (  # patient, study uid, taken (hours ago), first seen (hours ago), status
        ("p-recent", "10.1", 24, 24, StudyStatus.READY),
        ("p-old", "10.2", 40 * 24, 40 * 24, StudyStatus.READY),
        ("p-late", "10.3", 40 * 24, 1, StudyStatus.READY),  # an old study arriving now: taken outside the window
        ("p-fast-clock", "10.4", -48, 40 * 24, StudyStatus.READY),  # dated ahead, seen long ago: anchored then
        ("p-held", "10.5", 1, 1, StudyStatus.HELD),
    )
    for pid, uid, taken, seen, status in cases:
        store.add_study(StudyRef(uid, pid, None, NOW - timedelta(hours=taken)), "qido", NOW - timedelta(hours=seen))
        store.claim_study(uid, NOW)
        if status is StudyStatus.READY:
            store.set_study_ready(uid, pid)
        else:
            store.set_study_outcome(uid, status, Outcome.UNMATCHED_PATIENT, "x", None)
        store.upsert_patient(pid, None, None)
        store.set_vitals_cursor(pid, None, NOW - timedelta(minutes=5))
    store.add_study(StudyRef("10.6", "p-old", None, NOW - timedelta(hours=1)), "qido", NOW)  # not ready yet
    assert store.lease_patients_in_window(NOW, since, until) == ["p-recent"]
    assert store.lease_patients_in_window(NOW, since, until) == []  # queued: leased
    store.set_vitals_cursor("p-recent", None, NOW)  # its sync ran: followed again at the next poll
    assert store.lease_patients_in_window(NOW, since, until) == ["p-recent"]
    store.set_vitals_retry("p-recent", 1, NOW + timedelta(minutes=10))  # its sync failed: backing off
    assert store.lease_patients_in_window(NOW + timedelta(minutes=5), since, until) == []
    assert store.lease_patients_in_window(NOW + timedelta(minutes=10), since, until) == ["p-recent"]


def test_the_least_recently_synced_are_polled_first(store: Store) -> None:
    since, until = NOW - timedelta(days=28), NOW + timedelta(minutes=2)
    for k, (pid, synced_minutes_ago) in enumerate((("p1", 1), ("p2", 30), ("p3", 10))):
        uid = f"11.{k}"
        store.add_study(study(uid, pid), "qido", NOW)
        store.claim_study(uid, NOW)
        store.set_study_ready(uid, pid)
        store.upsert_patient(pid, None, None)
        store.set_vitals_cursor(pid, None, NOW - timedelta(minutes=synced_minutes_ago))
    assert sorted(store.lease_patients_in_window(NOW, since, until, limit=2)) == ["p2", "p3"]
    assert store.lease_patients_in_window(NOW, since, until, limit=2) == ["p1"]


# -- stage timings (issue 18) -------------------------------------------------------------------------------------

def test_stage_observations_add_up_to_cumulative_histograms(store: Store) -> None:
    assert all(h.count == 0 and h.sum == 0.0 for h in store.stage_histograms())  # every stage, zeros at first
    store.observe_stages([("retrieve", 0.12), ("decode", 0.03), ("retrieve", 0.4), ("retrieve", 0.12)])
    store.observe_stages([("retrieve", 75.0), ("end_to_end", 0.9)])
    store.observe_stages([])
    by_stage = {h.stage: h for h in store.stage_histograms()}
    retrieve = by_stage["retrieve"]
    assert retrieve.count == 4 and retrieve.sum == pytest.approx(75.64)
    cumulative = dict(retrieve.buckets)
    assert (cumulative[0.1], cumulative[0.2], cumulative[0.3], cumulative[0.5], cumulative[60.0]) == (0, 2, 2, 3, 3)
    assert cumulative[math.inf] == 4
    assert by_stage["decode"].count == 1 and dict(by_stage["decode"].buckets)[0.05] == 1
    assert dict(by_stage["end_to_end"].buckets)[0.75] == 0 and dict(by_stage["end_to_end"].buckets)[1.0] == 1
    with pytest.raises(ValueError):
        store.observe_stages([("model", 0.1), ("no-such-stage", 0.1)])
    assert {h.stage: h.count for h in store.stage_histograms()}["model"] == 0  # all or nothing


def test_a_study_is_marked_published_once_and_says_when_it_completed(store: Store) -> None:
    store.add_study(study("12.1"), "orthanc-changes", NOW, completed_at=NOW - timedelta(seconds=4))
    store.add_study(study("12.2"), "api", NOW)  # completion unknown: its detection stands in
    assert store.mark_study_published("12.1", NOW + timedelta(seconds=1)) == NOW - timedelta(seconds=4)
    assert store.mark_study_published("12.1", NOW + timedelta(seconds=9)) is None  # a republish, a re-scoring
    assert store.mark_study_published("12.2", NOW + timedelta(seconds=2)) == NOW
    assert store.mark_study_published("9.9", NOW) is None  # unknown
    row = store.get_study("12.1")
    assert row is not None and row.completed_at == NOW - timedelta(seconds=4)
    assert row.first_published_at == NOW + timedelta(seconds=1)


def test_concurrent_stage_observations_from_threads_lose_no_increment_on_sqlite(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'threads.db'}"
    upgrade(url)
    check_concurrent_observations([SqlStore(make_engine(url)) for _ in range(6)])


def check_concurrent_observations(stores: list[SqlStore]) -> None:
    """Each store (its own connection pool: a worker process) adds 20 batches of observations at the same moment;
    every increment is kept (also run on PostgreSQL by tests/integration/test_store_postgres.py)."""
    start = threading.Barrier(len(stores))

    def work(k: int) -> None:
        start.wait()
        for i in range(20):
            stores[k].observe_stages([("model", 0.02), ("explain", 0.3), ("model", 2.0 + k), ("publish", 0.001 * i)])

    with ThreadPoolExecutor(len(stores)) as pool:
        list(pool.map(work, range(len(stores))))
    by_stage = {h.stage: h for h in stores[0].stage_histograms()}
    n = 20 * len(stores)
    assert by_stage["model"].count == 2 * n and dict(by_stage["model"].buckets)[0.025] == n
    assert by_stage["model"].sum == pytest.approx(n * 0.02 + 20 * sum(2.0 + k for k in range(len(stores))))
    assert by_stage["explain"].count == n and dict(by_stage["explain"].buckets)[0.3] == n
    assert by_stage["publish"].count == n


# -- stage latency snapshots (issue 19: the dashboard) --------------------------------------------------------------

def test_stage_snapshots_are_a_bounded_ring_taken_at_most_every_interval(store: Store) -> None:
    assert store.stage_snapshots(10) == []
    assert store.snapshot_stages(NOW, 60.0, keep=3)
    assert not store.snapshot_stages(NOW + timedelta(seconds=59), 60.0, keep=3)  # not due yet
    store.observe_stages([("model", 0.02), ("model", 0.4)])
    for k in range(1, 5):
        assert store.snapshot_stages(NOW + timedelta(minutes=k), 60.0, keep=3)
    kept = store.stage_snapshots(10)
    assert [s.taken_at for s in kept] == [NOW + timedelta(minutes=k) for k in (2, 3, 4)]  # oldest first, 3 kept
    model = next(h for h in kept[-1].histograms if h.stage == "model")
    assert model.count == 2 and model.sum == pytest.approx(0.42) and dict(model.buckets)[0.025] == 1
    assert [s.taken_at for s in store.stage_snapshots(2)] == [NOW + timedelta(minutes=k) for k in (3, 4)]
