"""The store and the services on the real PostgreSQL (distributed mode), in a throw-away database."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TypeVar

import psycopg
import pytest

from integration.adapters.db import queries
from integration.adapters.db.session import current_revision, head_revision, make_engine, upgrade
from integration.adapters.db.store import SqlStore
from integration.domain.types import Outcome, StudyRef, VitalValue
from integration.services.assess import assess_patients
from integration.services.context import Services
from integration.services.studies import ingest_study
from tests.unit.fakes import STUDY, FakeClock, FakeEhr, FakeModel, FakePacs
from tests.unit.test_services import run_flow
from tests.unit.test_store_contract import (  # noqa: F401  the Store contract, run here on PostgreSQL
    check_concurrent_observations,
    test_a_failed_vitals_sync_backs_off_and_a_success_resets_it,
    test_a_repeated_failure_is_one_open_row_that_counts_its_occurrences,
    test_a_study_is_marked_published_once_and_says_when_it_completed,
    test_a_success_clears_the_lost_claims_and_work_in_progress_is_not_replayed,
    test_assessments_are_unique_supersede_and_publish,
    test_due_work_is_leased_once_and_still_claimed_by_its_message,
    test_fresh_studies_are_due_only_after_the_grace_period,
    test_held_studies_are_listed_by_patient_and_released_once,
    test_latest_ready_study_is_the_newest_taken,
    test_lost_claims_are_counted_and_the_third_gives_up_as_worker_lost,
    test_old_vitals_go_except_those_in_a_current_window,
    test_patients_are_claimed_once_and_back_off,
    test_resolved_failures_and_superseded_assessments_are_pruned_in_batches,
    test_stage_observations_add_up_to_cumulative_histograms,
    test_stale_claims_are_released_and_failures_counted,
    test_studies_are_deduplicated_claimed_once_and_follow_their_states,
    test_study_volumes_are_listed_by_age_and_forgotten_conditionally,
    test_the_ehr_poll_follows_patients_with_a_study_in_the_window,
    test_the_least_recently_synced_are_polled_first,
    test_vitals_are_matched_per_patient,
    test_vitals_count_changes_and_read_the_half_open_window,
)

ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"
T = TypeVar("T")


@pytest.fixture()
def pg_url() -> Iterator[str]:
    name = f"sw_test_{uuid.uuid4().hex[:10]}"
    try:
        admin = psycopg.connect(ADMIN, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as err:  # .ci/run makes sure PostgreSQL runs: this is a real failure
        pytest.fail(f"PostgreSQL at {ADMIN} is not reachable: {err}")
    with admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    with psycopg.connect(ADMIN, autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture()
def store(pg_url: str) -> SqlStore:
    upgrade(pg_url)
    return SqlStore(make_engine(pg_url))


@pytest.fixture()
def svc(pg_url: str, tmp_path: Path) -> Services:
    upgrade(pg_url)
    model = FakeModel()
    s = Services(store=SqlStore(make_engine(pg_url)), pacs=FakePacs(), ehr=FakeEhr(), model=lambda: model,
                 volumes_dir=tmp_path / "volumes", clock=FakeClock())
    return s


def test_migrations_reach_head_and_are_idempotent(pg_url: str) -> None:
    upgrade(pg_url)
    upgrade(pg_url)
    assert head_revision() == "0004"  # the newest migration in versions/
    assert current_revision(pg_url) == head_revision()


def test_full_flow_on_postgres_and_claims_are_exclusive(svc: Services) -> None:
    ids = run_flow(svc)
    assert len(ids) == 1 and svc.store.get_assessment(ids[0]).status == "published"
    assert svc.store.get_assessment(ids[0]).window_end.tzinfo is not None  # timestamps stay timezone-aware
    svc.store.mark_needs_assessment("pat-1")
    assert [r.status for r in assess_patients(svc, ["pat-1"])] == ["unchanged"]  # same identity: no new row
    assert svc.store.counts()["assessments"] == {"published": 1}
    # the conditional UPDATE lets exactly one claimant through
    assert svc.store.requeue_study(STUDY)
    assert svc.store.claim_study(STUDY, svc.clock.now()) is True
    assert svc.store.claim_study(STUDY, svc.clock.now()) is False
    assert ingest_study(svc, STUDY).status == "skipped"  # held by the first claim


# -- concurrency of the failure ledger and the leases (issue 17) ------------------------------------------------

def _together(n: int, work: Callable[[int], T]) -> list[T]:
    """``work(0..n-1)`` on n threads released at the same moment (each with its own connections)."""
    start = threading.Barrier(n)

    def run(k: int) -> T:
        start.wait()
        return work(k)

    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(run, range(n)))


def test_concurrent_repeats_of_one_failure_leave_one_row_counting_them_all(pg_url: str) -> None:
    upgrade(pg_url)
    stores = [SqlStore(make_engine(pg_url)) for _ in range(8)]  # eight workers, eight connection pools

    def report(k: int) -> None:
        for i in range(25):
            stores[k].record_failure("vitals", "p1/o1", Outcome.IMPLAUSIBLE_VALUE, f"hr {k}.{i}", False)

    _together(8, report)
    counts = stores[0].counts()
    assert counts["open_failures"] == {"implausible_value": 1}
    assert counts["open_failure_occurrences"] == {"implausible_value": 200}
    (row,) = queries.list_failures(stores[0].sessions, open_only=True).items
    assert row.occurrences == 200 and row.last_seen_at is not None and row.last_seen_at >= row.created_at


def test_concurrent_sweeps_lease_each_due_row_once(pg_url: str) -> None:
    upgrade(pg_url)
    stores = [SqlStore(make_engine(pg_url)) for _ in range(4)]
    now = datetime.now(UTC)
    uids = [f"1.2.{k}" for k in range(60)]
    for uid in uids:
        stores[0].add_study(StudyRef(uid, "MRN1", None, now), "qido", now - timedelta(minutes=5))
    until = now + timedelta(minutes=2)
    taken = _together(4, lambda k: stores[k].lease_due_studies(now, until, limit=25))
    flat = [uid for batch in taken for uid in batch]
    assert sorted(flat) == sorted(uids)  # every due study handed out, none twice
    assert stores[0].lease_due_studies(now, until, limit=100) == []


def test_concurrent_syncs_of_one_patient_write_each_value_once(pg_url: str) -> None:
    """Syncs of one patient at once (a redelivered message, the sweep and the poll) each read no existing row,
    then insert the same values: the upsert makes the later ones updates, never a unique-constraint error."""
    upgrade(pg_url)
    stores = [SqlStore(make_engine(pg_url)) for _ in range(8)]
    stores[0].upsert_patient("p1", None, None)
    start = datetime.now(UTC) - timedelta(days=1)
    values = [VitalValue("hr", 60.0 + i, start + timedelta(minutes=i), f"o{i}") for i in range(200)]
    changed = _together(8, lambda k: stores[k].replace_vitals("p1", values, []))
    assert max(changed) == 200  # no sync failed; one that read before another's commit also counts them changed
    assert len(stores[0].vitals_between("p1", start - timedelta(days=1), start + timedelta(days=1))) == 200
    assert stores[0].replace_vitals("p1", values, []) == 0  # once written, nothing changes


def test_concurrent_stage_observations_lose_no_increment_and_never_deadlock(pg_url: str) -> None:
    """Eight workers add overlapping batches of timings at once: every row is an atomic upsert, taken in one order."""
    upgrade(pg_url)
    check_concurrent_observations([SqlStore(make_engine(pg_url)) for _ in range(8)])


def test_concurrent_publishes_count_a_study_once(pg_url: str) -> None:
    upgrade(pg_url)
    stores = [SqlStore(make_engine(pg_url)) for _ in range(8)]
    now = datetime.now(UTC)
    stores[0].add_study(StudyRef("1.2.99", "MRN1", None, now), "scp", now, completed_at=now - timedelta(seconds=1))
    marks = _together(8, lambda k: stores[k].mark_study_published("1.2.99", now + timedelta(seconds=k)))
    assert [m for m in marks if m is not None] == [now - timedelta(seconds=1)]  # one of eight writers counts it


def test_a_pooled_connection_that_sat_idle_is_pinged_and_replaced_when_the_server_dropped_it(pg_url: str) -> None:
    """``make_engine`` pings a pooled connection only when it sat idle longer than ``PING_IDLE_S`` (not at every
    checkout): one the server dropped meanwhile is replaced unseen; one dropped within the idle time fails its
    statement once, and the pool then reconnects."""
    from sqlalchemy import create_engine, exc, text

    from integration.adapters.db.session import ping_when_idle

    now = [0.0]
    engine = create_engine(pg_url, pool_size=1, max_overflow=0)
    ping_when_idle(engine, idle_s=5.0, clock=lambda: now[0])
    assert make_engine(pg_url).pool._pre_ping is False  # type: ignore[attr-defined]

    def backend_pid() -> int:
        with engine.connect() as conn:
            return int(conn.execute(text("SELECT pg_backend_pid()")).scalar_one())

    def drop(pid: int) -> None:
        with psycopg.connect(ADMIN, autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(%s, 10000)", (pid,))

    first = backend_pid()
    assert backend_pid() == first  # the pooled connection is reused
    drop(first)
    now[0] = 6.0  # idle longer than 5 s: pinged, found dead, replaced
    second = backend_pid()
    assert second != first
    drop(second)
    now[0] = 7.0  # used a second ago: handed out as it is, and the statement meets the dropped connection
    with pytest.raises(exc.OperationalError):
        backend_pid()
    assert backend_pid() not in (first, second)
    engine.dispose()
