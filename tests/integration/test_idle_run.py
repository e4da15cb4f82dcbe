"""An idle engine stays bounded (issue 17): after the flow has settled, round after round of the EHR poll, the
sweep and the work they queue, against the real FHIR sandbox and Orthanc with the store on PostgreSQL, add no
failure row and queue nothing twice; a lost message is re-sent once its lease runs out, not sooner.

The services run with a recording enqueue and a stepped clock (one round = one fast poll interval); the
"worker" runs each queued message through the same service function the Celery task calls.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydicom.uid import generate_uid

from integration.adapters.db import queries
from integration.bootstrap import Engine, bootstrap
from integration.config import Settings
from integration.domain.types import DomainError
from integration.services.assess import assess_batch, publish
from integration.services.studies import ingest_study, register_study
from integration.services.sweep import poll_ehr, sweep
from integration.services.vitals import sync_vitals
from tests.integration.test_dicomweb_orthanc import ct_series, store
from tests.integration.test_ingest_outcomes import MRN_SYSTEM, add_patient, vital
from tests.integration.test_store_postgres import pg_url  # noqa: F401  the throw-away PostgreSQL database

ROUND_S = 10.0  # the fast poll interval: the EHR poll and the sweep run once per round
REDELIVER_S = 120.0


class StepClock:
    def __init__(self, t: datetime) -> None:
        self.t = t

    def now(self) -> datetime:
        return self.t


class Worker:
    """The recording queue and a worker that runs each message through the service its task calls."""

    def __init__(self) -> None:
        self.queue: list[tuple[str, str]] = []
        self.sent: Counter[tuple[str, str]] = Counter()

    def enqueue(self, stage: str, ids: list[str]) -> None:
        self.queue += [(stage, i) for i in ids]
        self.sent.update((stage, i) for i in ids)

    def run(self, engine: Engine) -> None:
        svc = engine.services
        while self.queue:
            stage, item = self.queue.pop(0)
            if stage == "ingest":
                ingest_study(svc, item)
            elif stage == "vitals":
                with contextlib.suppress(DomainError):  # recorded by the service, as the task does
                    sync_vitals(svc, item)
            elif stage == "assess":
                assess_batch(svc, [item])
            elif stage == "publish":
                publish(svc, item)

    def lose_messages(self) -> list[tuple[str, str]]:
        lost, self.queue = self.queue, []
        return lost


@pytest.fixture()
def engine(tmp_path: Path, pg_url: str, fresh_orthanc_peer: Any, fresh_fhir_peer: Any) -> Iterator[Engine]:  # noqa: F811
    worker = Worker()
    settings = Settings.model_validate(
        {
            "sandbox": True,
            "data_dir": tmp_path / "data",
            "database_url": pg_url,
            "redeliver_after_s": REDELIVER_S,
            "pacs": {"dicomweb_url": fresh_orthanc_peer.dicomweb_url, "kind": "generic", "timezone": "UTC"},
            "ehr": {
                "base_url": fresh_fhir_peer.base_url,
                "patient_identifier_system": MRN_SYSTEM,
                "max_retries": 1,
                "backoff_s": 0.05,
                "timeout_s": 5,
            },
        }
    )
    eng = bootstrap(settings, enqueue=worker.enqueue)
    eng.services.clock = StepClock(datetime.now(UTC))
    eng.worker = worker  # type: ignore[attr-defined]
    yield eng
    eng.close()


def a_study(peer: Any, mrn: str, taken: datetime) -> str:
    uid = generate_uid()
    store(
        peer, ct_series(uid, patient_id=mrn, study_date=taken.strftime("%Y%m%d"), study_time=taken.strftime("%H%M%S"))
    )
    return uid


def open_failures(engine: Engine) -> tuple[int, int]:
    """(open rows, their occurrences), from the ledger as /failures shows it."""
    page = queries.list_failures(engine.store.sessions, open_only=True, limit=500)
    return page.total, sum(f.occurrences for f in page.items)


def test_an_idle_engine_adds_no_failure_rows_and_no_duplicate_work(
    engine: Engine, fresh_orthanc_peer: Any, fresh_fhir_peer: Any
) -> None:
    svc, worker = engine.services, engine.worker  # type: ignore[attr-defined]
    clock: StepClock = svc.clock  # type: ignore[assignment]
    now = clock.now()
    # followed: a study an hour ago, and three values the engine refuses among good ones
    recent = add_patient(
        fresh_fhir_peer.base_url,
        "SW-IDLE-1",
        [
            vital("8867-4", 72, "/min", 5),
            vital("8867-4", 900, "/min", 4),  # implausible heart rate
            vital("8480-6", 140, None, 3),
            vital("8310-5", 37.0, "furlong", 2),  # no unit, unknown unit
            vital("8480-6", 135, "mm[Hg]", 1),
        ],
    )
    # not followed by the poll: the patient's only study was taken long before the model's window
    old = add_patient(fresh_fhir_peer.base_url, "SW-IDLE-2", [vital("8867-4", 80, "/min", 3)])
    uids = [
        a_study(fresh_orthanc_peer, "SW-IDLE-1", now - timedelta(hours=1)),
        a_study(fresh_orthanc_peer, "SW-IDLE-2", datetime(1987, 3, 14, 10, 15, tzinfo=UTC)),
    ]
    for uid in uids:
        assert register_study(svc, uid)
    worker.enqueue("ingest", uids)

    def one_round() -> None:
        clock.t += timedelta(seconds=ROUND_S)
        poll_ehr(svc)
        sweep(svc)
        worker.run(engine)

    for _ in range(4):  # the flow settles: ingest, vitals, assess, publish
        one_round()
    counts = engine.store.counts()
    assert counts["studies"] == {"ready": 2} and counts["assessments"] == {"published": 2}
    rows, seen = open_failures(engine)
    assert rows == 3 and counts["open_failures"] == {"implausible_value": 1, "missing_unit": 1, "unknown_unit": 1}
    searches = fresh_fhir_peer.stats()["requests"]
    worker.sent.clear()

    synced: list[tuple[datetime, int]] = []  # per round: its time, and syncs of the followed patient queued
    lost_at = None
    for k in range(20):
        before = worker.sent[("vitals", recent)]
        one_round()
        synced.append((clock.now(), worker.sent[("vitals", recent)] - before))
        assert open_failures(engine)[0] == rows, f"round {k}: the failure ledger grew"
        if k == 4:  # a poll queues the followed patient's sync, and the broker loses the message
            clock.t += timedelta(seconds=1)
            assert poll_ehr(svc) == 1
            assert worker.lose_messages() == [("vitals", recent)]
            lost_at = clock.now()
    assert lost_at is not None
    # one sync per poll while they run; after the loss none until its lease ends, then one per poll again
    expected = [1] * 5 + [int(t >= lost_at + timedelta(seconds=REDELIVER_S)) for t, _ in synced[5:]]
    assert [n for _, n in synced] == expected and 0 in expected[5:] and expected[-1] == 1
    assert worker.sent[("vitals", old)] == 0  # outside the window: not re-synced by the poll
    assert {stage for stage, _ in worker.sent} == {"vitals"}  # nothing else queued: no work repeated
    rows_after, seen_after = open_failures(engine)
    assert rows_after == rows and seen_after > seen  # the same bad values were read again, and only counted
    assert fresh_fhir_peer.stats()["requests"] > searches
    assert engine.store.counts()["assessments"] == {"published": 2}  # unchanged data: no new assessment
    with httpx.Client(timeout=30) as http:
        found = http.get(f"{fresh_fhir_peer.base_url}/RiskAssessment").json()
    assert len(found.get("entry", [])) == 2
