"""The failure ledger, per-patient vitals backoff, leased enqueues and the EHR poll's window, over the fakes."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from integration.domain.types import DomainError, Outcome, StudyRef
from integration.services.assess import assess_patients
from integration.services.context import Services
from integration.services.studies import ingest_study, register_study
from integration.services.sweep import poll_ehr, sweep
from integration.services.vitals import rejected_subject, sync_vitals
from tests.unit.fakes import NOW, STUDY, FakeClock, FakeEhr, FakeModel, FakePacs, FakeStore, obs


class FlakyEhr(FakeEhr):
    """The fake EHR whose Observation search fails with ``error`` while it is set."""

    def __init__(self) -> None:
        super().__init__()
        self.error: DomainError | None = None
        self.searches = 0

    def search_observations(
        self, patient_id: str, codes: Sequence[str], since: datetime | None, updated_since: datetime | None
    ) -> list[dict[str, Any]]:
        self.searches += 1
        if self.error is not None:
            raise self.error
        return super().search_observations(patient_id, codes, since, updated_since)


@pytest.fixture()
def svc(tmp_path: Path) -> Services:
    model, clock = FakeModel(), FakeClock()
    s = Services(
        store=FakeStore(clock),
        pacs=FakePacs(),
        ehr=FlakyEhr(),
        model=lambda: model,
        volumes_dir=tmp_path / "volumes",
        clock=clock,
        redeliver_after_s=120.0,
    )
    s.enqueued = []  # type: ignore[attr-defined]
    s.enqueue = lambda stage, ids: s.enqueued.extend((stage, i) for i in ids)  # type: ignore[attr-defined]
    return s


def tick(svc: Services, seconds: float) -> None:
    svc.clock.t += timedelta(seconds=seconds)  # type: ignore[attr-defined]


def drain(svc: Services) -> Counter[tuple[str, str]]:
    """What was enqueued since the last drain, counted per (stage, id)."""
    sent: list[tuple[str, str]] = svc.enqueued  # type: ignore[attr-defined]
    counted = Counter(sent)
    sent.clear()
    return counted


def ready_patient(svc: Services) -> None:
    assert register_study(svc, STUDY)
    assert ingest_study(svc, STUDY).status == "ready"


def test_a_repolled_implausible_value_is_one_row_that_counts(svc: Services) -> None:
    ehr: FlakyEhr = svc.ehr  # type: ignore[assignment]
    ehr.observations.append(obs("o9", "8867-4", 900, "/min", NOW - timedelta(hours=2)))  # implausible
    ready_patient(svc)
    for _ in range(5):  # the fake EHR answers every Observation at every poll, like an overlapping cursor
        sync_vitals(svc, "pat-1")
        tick(svc, 60)
    counts = svc.store.counts()
    assert counts["open_failures"] == {"implausible_value": 1}
    assert counts["open_failure_occurrences"] == {"implausible_value": 5}
    (failure,) = svc.store.failures  # type: ignore[attr-defined]
    assert failure.subject == rejected_subject("pat-1", "o9") == "pat-1/o9"
    assert failure.details == {"patient": "pat-1", "observation": "o9"}
    assert failure.last_seen_at == NOW + timedelta(seconds=4 * 60) and failure.created_at == NOW


def test_two_ids_of_64_characters_still_fit_the_subject_column() -> None:
    subject = rejected_subject("p" * 64, "o" * 64)
    assert len(subject) <= 128 and subject.startswith("p" * 62 + "/")
    assert subject != rejected_subject("p" * 64, "o" * 63 + "x")


def test_a_failing_vitals_sync_backs_off_honouring_retry_after_then_resets(svc: Services) -> None:
    ehr: FlakyEhr = svc.ehr  # type: ignore[assignment]
    ready_patient(svc)
    drain(svc)
    ehr.error = DomainError(Outcome.EHR_UNAVAILABLE, "429", retry_after=300)
    with pytest.raises(DomainError):
        sync_vitals(svc, "pat-1")
    patient = svc.store.get_patient("pat-1")
    assert patient is not None and patient.vitals_attempts == 1
    assert patient.vitals_next_attempt_at == NOW + timedelta(seconds=300)  # the EHR's Retry-After, not 5 s
    for _ in range(12):  # a minute of sweeps and polls: the patient is not asked for
        tick(svc, 5)
        sweep(svc)
        poll_ehr(svc)
    assert ("vitals", "pat-1") not in drain(svc)
    tick(svc, 300 - 60)
    assert sweep(svc).vitals == 1 and drain(svc) == Counter({("vitals", "pat-1"): 1})
    ehr.error = DomainError(Outcome.EHR_UNAVAILABLE, "connection refused")
    with pytest.raises(DomainError):
        sync_vitals(svc, "pat-1")
    patient = svc.store.get_patient("pat-1")
    assert patient is not None and patient.vitals_attempts == 2
    assert patient.vitals_next_attempt_at == svc.clock.now() + timedelta(seconds=2 * svc.retry_backoff_s)
    assert svc.store.counts()["open_failure_occurrences"] == {"ehr_unavailable": 2}  # one row, seen twice
    ehr.error = None
    tick(svc, 10)
    sync_vitals(svc, "pat-1")
    patient = svc.store.get_patient("pat-1")
    assert patient is not None and patient.vitals_attempts == 0 and patient.vitals_next_attempt_at is None
    assert svc.store.counts()["open_failures"] == {}  # the sync's failure is resolved by its success


def test_the_sweep_sends_each_due_item_once_per_lease(svc: Services) -> None:
    ready_patient(svc)
    sync_vitals(svc, "pat-1")
    ident = assess_patients(svc, ["pat-1"])[0].identifier
    assert ident is not None
    svc.store.add_study(StudyRef("1.2.3.9", "MRN1", None, NOW), "qido", NOW)  # detected; its message lost
    svc.store.mark_needs_assessment("pat-1")
    drain(svc)  # the messages the services sent themselves (lost, say: the broker restarted)
    sent: Counter[tuple[str, str]] = Counter()
    for _ in range(23):  # 115 s of sweeps every 5 s: a backlog longer than the sweep's period
        tick(svc, 5)
        sweep(svc)
        sent += drain(svc)
    assert sent == Counter({("ingest", "1.2.3.9"): 1, ("assess", "pat-1"): 1, ("publish", ident): 1})
    for _ in range(24):  # the lease runs out: what is still not done is sent once more, not sooner
        tick(svc, 5)
        sweep(svc)
        sent += drain(svc)
    assert sent == Counter({("ingest", "1.2.3.9"): 2, ("assess", "pat-1"): 2, ("publish", ident): 2})
    assert ingest_study(svc, "1.2.3.9").status in ("ready", "held", "retry", "failed")  # still claimable


def test_the_ehr_poll_follows_only_patients_with_a_study_in_the_window(svc: Services) -> None:
    ready_patient(svc)  # pat-1: a study taken an hour ago
    sync_vitals(svc, "pat-1")
    old = "1.2.826.0.1.3680043.8.498.77"
    svc.store.add_study(StudyRef(old, "MRN2", None, NOW - timedelta(days=40)), "qido", NOW - timedelta(days=40))
    svc.store.claim_study(old, NOW)
    svc.store.set_study_ready(old, "pat-2")
    svc.store.upsert_patient("pat-2", None, None)
    svc.store.set_vitals_cursor("pat-2", None, NOW - timedelta(days=39))
    drain(svc)
    assert poll_ehr(svc) == 1 and drain(svc) == Counter({("vitals", "pat-1"): 1})
    tick(svc, 5)
    assert poll_ehr(svc) == 0  # pat-1's sync is queued (leased): not sent again
    sync_vitals(svc, "pat-1")  # it ran: followed again from the next poll on
    drain(svc)
    tick(svc, 60)
    assert poll_ehr(svc) == 1 and drain(svc) == Counter({("vitals", "pat-1"): 1})
    # four weeks on, pat-1's study has left the window too: nobody is polled
    svc.clock.t = NOW + timedelta(days=28)  # type: ignore[attr-defined]
    sync_vitals(svc, "pat-1")
    drain(svc)
    assert poll_ehr(svc) == 0
    svc.store.require_vitals_sync("pat-2")  # e.g. a new study: never synced since, polled (and swept) again
    assert poll_ehr(svc) == 1 and drain(svc) == Counter({("vitals", "pat-2"): 1})


def test_status_shows_open_failures_with_occurrences_and_last_seen(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    from integration.adapters.db.session import make_engine, upgrade
    from integration.adapters.db.store import SqlStore
    from integration.entrypoints.cli import app

    url = f"sqlite:///{tmp_path / 'status.db'}"
    upgrade(url)
    store = SqlStore(make_engine(url))
    for _ in range(3):
        store.record_failure("vitals", "pat-1/o9", Outcome.IMPLAUSIBLE_VALUE, "heart rate 900 /min", False)
    store.record_failure("vitals", "pat-2/o4", Outcome.IMPLAUSIBLE_VALUE, "heart rate 0 /min", False)
    monkeypatch.setenv("STROKEWATCH_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("STROKEWATCH_DATABASE_URL", url)
    result = CliRunner().invoke(app, ["status"], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "Open failures" in result.output
    line = next(row for row in result.output.splitlines() if "vitals" in row and "implausible_value" in row)
    cells = [c.strip() for c in line.strip("│ ").split("│")]
    assert cells[:4] == ["vitals", "implausible_value", "2", "4"]  # two problems, seen four times
    assert datetime.strptime(cells[4], "%Y-%m-%d %H:%M:%SZ")  # last seen, UTC


def test_the_lease_must_outlast_the_sweep_period() -> None:
    from pydantic import ValidationError

    from integration.config import Settings

    assert Settings().redeliver_after_s == 120.0
    with pytest.raises(ValidationError, match="redeliver_after_s"):
        Settings(redeliver_after_s=5)


def test_the_vitals_sync_queued_by_an_ingest_is_not_queued_again_by_the_sweep(svc: Services) -> None:
    ready_patient(svc)
    assert drain(svc)[("vitals", "pat-1")] == 1  # queued by the ingest itself
    for _ in range(23):  # 115 s of sweeps and polls while that sync waits in a long queue
        tick(svc, 5)
        sweep(svc)
        poll_ehr(svc)
    assert ("vitals", "pat-1") not in drain(svc)
    for _ in range(2):  # its message was lost: once the lease runs out, the sweep sends it again, once
        tick(svc, 5)
        sweep(svc)
    assert drain(svc)[("vitals", "pat-1")] == 1


def test_a_sync_resolves_its_failure_though_a_concurrent_one_recorded_it_after_it_started(svc: Services) -> None:
    """Two syncs of one patient at once (a redelivered message): A reads the patient (no failed attempt yet), B
    fails and records ehr_unavailable, A succeeds. A's success ends the failure B recorded."""
    ready_patient(svc)
    ehr: FlakyEhr = svc.ehr  # type: ignore[assignment]
    real_get = svc.store.get_patient

    def b_fails_meanwhile(fhir_id: str) -> Any:
        row = real_get(fhir_id)  # A's read: vitals_attempts 0
        svc.store.get_patient = real_get  # type: ignore[method-assign]
        ehr.error = DomainError(Outcome.EHR_UNAVAILABLE, "503")
        with pytest.raises(DomainError):
            sync_vitals(svc, fhir_id)  # B
        ehr.error = None
        return row

    svc.store.get_patient = b_fails_meanwhile  # type: ignore[method-assign]
    sync_vitals(svc, "pat-1")  # A
    assert svc.store.counts()["open_failures"] == {}


def test_an_ingest_past_the_soft_time_limit_is_retried_as_timed_out(svc: Services) -> None:
    class SoftLimit(Exception):  # Celery's SoftTimeLimitExceeded is an Exception too
        pass

    pacs: FakePacs = svc.pacs  # type: ignore[assignment]

    def slow(*_: object) -> Any:
        raise SoftLimit()

    pacs.retrieve_series = slow  # type: ignore[method-assign]
    svc.interruptions = (SoftLimit,)
    assert register_study(svc, STUDY)
    result = ingest_study(svc, STUDY)
    assert (result.status, result.outcome) == ("retry", "timed_out")
    row = svc.store.get_study(STUDY)
    assert row is not None and row.next_attempt_at is not None
    svc.interruptions = ()  # not declared an interruption: a crash, failed as internal_error
    svc.store.requeue_study(STUDY)
    assert ingest_study(svc, STUDY).outcome == "internal_error"


def test_a_bulk_loaded_batch_is_not_read_again_once_its_cursor_has_settled(svc: Services) -> None:
    """Hundreds of Observations written in one transaction share one lastUpdated: within the overlap they are
    read again by the next polls; once the cursor is CURSOR_SETTLED old, the poll asks only for what is newer."""
    ehr: FlakyEhr = svc.ehr  # type: ignore[assignment]
    asked: list[datetime | None] = []
    real = ehr.search_observations

    def recording(patient_id: str, codes: Sequence[str], since: datetime | None,
                  updated_since: datetime | None) -> list[dict[str, Any]]:
        asked.append(updated_since)
        stamp = NOW  # every fake Observation carries meta.lastUpdated NOW
        return [] if updated_since is not None and updated_since >= stamp else real(patient_id, codes, since,
                                                                                    updated_since)

    ehr.search_observations = recording  # type: ignore[method-assign]
    ready_patient(svc)
    assert sync_vitals(svc, "pat-1").fetched > 0 and asked[-1] is None  # the first sync reads the window
    tick(svc, 60)
    assert sync_vitals(svc, "pat-1").fetched > 0  # a minute later: inside the overlap, read again (ties, late commits)
    assert asked[-1] == NOW - timedelta(seconds=2)
    tick(svc, 15 * 60)
    assert sync_vitals(svc, "pat-1").fetched == 0  # settled: only what is newer than the cursor
    assert asked[-1] == NOW
