"""The store and the services on the real PostgreSQL (distributed mode), in a throw-away database."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from integration.adapters.db.session import current_revision, make_engine, upgrade
from integration.adapters.db.store import SqlStore
from integration.services.assess import assess_patients
from integration.services.context import Services
from integration.services.studies import ingest_study
from tests.unit.fakes import STUDY, FakeClock, FakeEhr, FakeModel, FakePacs
from tests.unit.test_services import run_flow
from tests.unit.test_store_contract import (  # noqa: F401  the Store contract, run here on PostgreSQL
    test_assessments_are_unique_supersede_and_publish,
    test_fresh_studies_are_due_only_after_the_grace_period,
    test_held_studies_are_listed_by_patient_and_released_once,
    test_latest_ready_study_is_the_newest_taken,
    test_patients_are_claimed_once_and_back_off,
    test_stale_claims_are_released_and_failures_counted,
    test_studies_are_deduplicated_claimed_once_and_follow_their_states,
    test_vitals_count_changes_and_read_the_half_open_window,
)

ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"


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
    assert current_revision(pg_url) == "0001"


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
