"""The Store port's contract, checked on both implementations: SqlStore (SQLite) and the unit tests' FakeStore.

If the fake drifts from the database, these fail; the service tests that use the fake stay honest.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest

from integration.adapters.db.session import make_engine, upgrade
from integration.adapters.db.store import SqlStore
from integration.domain.records import AssessmentStatus, BuiltVolume, NewAssessment, StudyStatus
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
    assert store.patients_needing_vitals() == ["p1"]
    store.set_vitals_cursor("p1", NOW, NOW)
    assert store.patients_due(NOW, 10) == ["p1"]
    assert store.claim_patient("p1", NOW) and not store.claim_patient("p1", NOW)
    store.release_patient("p1", retry_at=NOW + timedelta(minutes=5), outcome="model_unavailable", reason="down")
    assert store.patients_due(NOW, 10) == [] and store.patients_due(NOW + timedelta(minutes=6), 10) == ["p1"]
    p = store.get_patient("p1")
    assert p is not None and p.attempts == 1 and p.outcome == "model_unavailable" and p.vitals_cursor == NOW
    store.require_vitals_sync("p1")
    assert store.patients_needing_vitals() == ["p1"]


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
    assert store.release_stale_claims(NOW - timedelta(minutes=10)) == 3
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
