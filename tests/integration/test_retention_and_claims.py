"""Retention and dead claims on the real store, SQLite and PostgreSQL, with data relative to the real clock's now;
the embedded broker's message table pruned on a real kombu SQLite broker."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from kombu import Connection
from sqlalchemy import update

from integration.adapters.broker import EmbeddedBrokerMessages
from integration.adapters.db import queries
from integration.adapters.db.models import Assessment
from integration.adapters.db.session import make_engine, upgrade
from integration.adapters.db.store import SqlStore
from integration.domain.records import BuiltVolume, NewAssessment, StudyStatus
from integration.domain.retention import RetentionPolicy
from integration.domain.types import Outcome, StudyRef, VitalValue
from integration.services.context import Services, SystemClock
from integration.services.retention import Housekeeping, prune
from integration.services.studies import ingest_study, register_study, retry_study
from integration.services.sweep import sweep
from tests.integration.test_store_postgres import pg_url  # noqa: F401  (the throw-away PostgreSQL database)
from tests.unit.fakes import STUDY, FakeClock, FakeEhr, FakeModel, FakePacs

DAY = timedelta(days=1)


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[SqlStore]:
    url = f"sqlite:///{tmp_path / 'engine.db'}" if request.param == "sqlite" else request.getfixturevalue("pg_url")
    upgrade(url)
    sql = SqlStore(make_engine(url))
    yield sql
    sql.engine.dispose()


def add_study(store: SqlStore, volumes: Path, uid: str, pid: str, seen: datetime) -> Path:
    store.add_study(StudyRef(uid, pid, None, seen - timedelta(minutes=5)), "qido", seen)
    assert store.claim_study(uid, seen)
    path = volumes / f"{uid}.npy"
    np.save(path, np.zeros((2, 2), dtype=np.float32))
    store.set_study_volume(uid, BuiltVolume(str(path), "ab" * 32, f"{uid}.9", "CT"))
    store.set_study_ready(uid, pid)
    return path


def scored(store: SqlStore, ident: str, pid: str, uid: str, end: datetime, supersedes: str | None = None) -> None:
    new = NewAssessment(ident, pid, uid, end, "1", "fake", True, 0.3, "moderate", "f" * 64, 1, {}, supersedes)
    assert store.add_assessment(new)


def test_prune_keeps_what_is_inside_retention_and_removes_what_is_outside(store: SqlStore, tmp_path: Path) -> None:
    now = datetime.now(UTC)
    volumes = tmp_path / "volumes"
    volumes.mkdir()
    store.upsert_patient("p", None, None)
    store.upsert_patient("q", None, None)
    store.replace_vitals("p", [VitalValue("hr", 70.0, now - k * DAY, f"p-{k}") for k in (500, 401, 399, 1)], [])
    store.replace_vitals("q", [VitalValue("hr", 70.0, now - k * DAY, f"q-{k}") for k in (900, 700, 690)], [])
    replaced = add_study(store, volumes, "1.2.3.1", "p", now - 30 * DAY)  # replaced by a newer study of p
    latest = add_study(store, volumes, "1.2.3.2", "p", now - 20 * DAY)  # p's latest, scored, p still active
    scored(store, "old", "p", "1.2.3.1", now - 400 * DAY)
    scored(store, "recent-old", "p", "1.2.3.1", now - 30 * DAY, supersedes="old")
    scored(store, "current", "p", "1.2.3.2", now - 20 * DAY, supersedes="recent-old")
    with store.sessions.begin() as s:  # "old" was scored 400 days ago, "recent-old" 30 days ago
        s.execute(update(Assessment).where(Assessment.identifier == "old").values(created_at=now - 400 * DAY))
        s.execute(update(Assessment).where(Assessment.identifier == "recent-old").values(created_at=now - 30 * DAY))
    for subject, resolved_days in (("9.1", 100), ("9.2", 89), ("9.3", None)):
        store.record_failure("ingest", subject, Outcome.PACS_UNAVAILABLE, "down", True)
        if resolved_days is not None:
            store.resolve_failures("ingest", subject, now - resolved_days * DAY)
    hk = Housekeeping(store, volumes, RetentionPolicy(batch_size=2), SystemClock())

    assert prune(hk, dry_run=True).removed == {
        "vitals": 3,
        "failures": 1,
        "assessments": 1,
        "volumes": 1,
        "spool": 0,
        "broker_messages": 0,
    }
    assert replaced.exists()  # a dry run deletes nothing
    assert prune(hk).removed == {"vitals": 3, "failures": 1, "assessments": 1, "volumes": 1, "spool": 0,
                                 "broker_messages": 0}

    kept_p = {v.observation_id for v in store.vitals_between("p", now - 1000 * DAY, now)}
    assert kept_p == {"p-399", "p-1"}  # 500 and 401 days: outside retention and every current window
    kept_q = {v.observation_id for v in store.vitals_between("q", now - 1000 * DAY, now)}
    assert kept_q == {"q-700", "q-690"}  # q's current window (before its newest vital) stays; 900 days goes
    assert store.get_assessment("old") is None
    assert store.get_assessment("recent-old") is not None and store.get_assessment("current") is not None
    subjects = {f.subject for f in queries.list_failures(store.sessions).items}
    assert subjects == {"9.2", "9.3"}
    assert not replaced.exists() and store.get_study("1.2.3.1").volume_path is None  # type: ignore[union-attr]
    assert latest.exists() and store.get_study("1.2.3.2").volume_path == str(latest)  # type: ignore[union-attr]
    assert prune(hk).removed == {"vitals": 0, "failures": 0, "assessments": 0, "volumes": 0, "spool": 0,
                                 "broker_messages": 0}


class WorkerKilled(BaseException):
    """The worker process stops here (SIGKILL, OOM, hard time limit): nothing after it runs."""


def test_a_study_that_kills_its_worker_three_times_is_failed_and_shown_in_failures(
    store: SqlStore, tmp_path: Path
) -> None:
    svc = Services(
        store=store,
        pacs=FakePacs(),
        ehr=FakeEhr(),
        model=FakeModel,
        volumes_dir=tmp_path / "v",
        clock=FakeClock(datetime.now(UTC)),
    )
    assert register_study(svc, STUDY)

    def killed(*_: Any) -> Any:
        raise WorkerKilled

    retrieve, svc.pacs.retrieve_series = svc.pacs.retrieve_series, killed  # type: ignore[method-assign]
    results = []
    for _ in range(3):
        with pytest.raises(WorkerKilled):
            ingest_study(svc, STUDY)
        svc.clock.t += timedelta(seconds=svc.stale_claim_s + 1)  # type: ignore[attr-defined]
        results.append(sweep(svc))
    assert [(r.released, r.given_up) for r in results] == [(1, 0), (1, 0), (0, 1)]
    row = store.get_study(STUDY)
    assert row is not None and row.status is StudyStatus.FAILED and row.outcome == "worker_lost"
    assert row.lost_claims == 3 and store.studies_due(svc.clock.now() + DAY) == []
    shown = queries.list_failures(store.sessions, outcome="worker_lost", open_only=True).items
    assert [(f.stage, f.subject, f.retryable) for f in shown] == [("ingest", STUDY, False)]
    svc.pacs.retrieve_series = retrieve  # type: ignore[method-assign]
    assert retry_study(svc, STUDY) and store.get_study(STUDY).lost_claims == 0  # type: ignore[union-attr]
    assert ingest_study(svc, STUDY).status == "ready"
    assert queries.list_failures(store.sessions, outcome="worker_lost", open_only=True).items == []


def test_messages_the_embedded_broker_delivered_are_deleted_in_batches(tmp_path: Path) -> None:
    url = f"sqla+sqlite:///{tmp_path / 'broker.db'}"
    janitor = EmbeddedBrokerMessages(url)
    try:
        assert janitor.delete_delivered(datetime.now(UTC), 10) == 0  # no table before the first message
        with Connection(url) as conn:
            queue = conn.SimpleQueue("ingest")
            for k in range(5):
                queue.put({"k": k})
            for _ in range(3):
                queue.get(timeout=10).ack()
            queue.close()
        now = datetime.now(UTC)
        assert janitor.delete_delivered(now - timedelta(hours=1), 2) == 0  # delivered just now: kept for now
        assert janitor.delete_delivered(now + timedelta(seconds=5), 2, dry_run=True) == 3
        assert janitor.delete_delivered(now + timedelta(seconds=5), 2) == 3
        with Connection(url) as conn:  # the two undelivered messages are still there, in order
            queue = conn.SimpleQueue("ingest")
            assert [queue.get(timeout=10).payload["k"] for _ in range(2)] == [3, 4]
            queue.close()
    finally:
        janitor.close()


def test_db_prune_prints_each_table_and_a_dry_run_deletes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    from integration.entrypoints.cli import app as cli

    monkeypatch.setenv("STROKEWATCH_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("STROKEWATCH_PACS__DICOMWEB_URL", "http://127.0.0.1:9/dicom-web")  # never asked by a prune
    url = f"sqlite:///{(tmp_path / 'strokewatch.db').resolve()}"
    upgrade(url)
    store = SqlStore(make_engine(url))
    store.record_failure("ingest", "1.2.3", Outcome.PACS_UNAVAILABLE, "down", True)
    store.resolve_failures("ingest", "1.2.3", datetime.now(UTC) - 200 * DAY)
    broker = f"sqla+sqlite:///{(tmp_path / 'broker.db').resolve()}"
    with Connection(broker) as conn:  # the embedded broker has delivered one message
        queue = conn.SimpleQueue("ingest")
        queue.put({"k": 1})
        queue.get(timeout=10).ack()
        queue.close()

    def rows(output: str) -> dict[str, str]:
        cells = [line.replace("│", " ").split() for line in output.splitlines()]
        return {c[0]: c[1] for c in cells if len(c) == 2 and c[1].isdigit()}

    dry = CliRunner().invoke(cli, ["db", "prune", "--dry-run"], terminal_width=200)
    assert dry.exit_code == 0, dry.output
    assert "would remove" in dry.output
    assert rows(dry.output) == {
        "vitals": "0",
        "failures": "1",
        "assessments": "0",
        "volumes": "0",
        "spool": "0",
        "broker_messages": "0",
    }  # delivered just now: kept for an hour
    assert len(queries.list_failures(store.sessions).items) == 1
    done = CliRunner().invoke(cli, ["db", "prune"], terminal_width=200)
    assert done.exit_code == 0 and rows(done.output)["failures"] == "1"
    assert queries.list_failures(store.sessions).items == []
    store.engine.dispose()
