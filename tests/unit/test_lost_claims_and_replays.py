"""Dead claims, re-publish and the clock-independent assessment identity, through the services over the fakes.

A worker that dies mid-task (SIGKILL, out of memory, Celery's hard time limit killing the pool child) runs no
more code: here the peer it is talking to raises ``WorkerKilled``, a ``BaseException`` no service catches, so
the task stops where a killed process would, its claim left behind for the reaper.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from integration.domain.records import AssessmentStatus, StudyStatus
from integration.domain.types import DomainError, Outcome, StudyRef
from integration.services.assess import assess_patients, prepare, publish, reassess_patient, republish
from integration.services.context import Services
from integration.services.studies import ingest_study, register_study, retry_study
from integration.services.sweep import sweep
from integration.services.vitals import sync_vitals
from tests.unit.fakes import NOW, STUDY, FakeClock, FakeEhr, FakeModel, FakePacs, FakeStore, obs
from tests.unit.test_services import run_flow


class WorkerKilled(BaseException):
    """The process stops here: nothing after it runs, nothing records an outcome."""


@pytest.fixture()
def svc(tmp_path: Path) -> Services:
    model, clock = FakeModel(), FakeClock()
    s = Services(
        store=FakeStore(clock),
        pacs=FakePacs(),
        ehr=FakeEhr(),
        model=lambda: model,
        volumes_dir=tmp_path / "volumes",
        clock=clock,
    )
    s.enqueued = []  # type: ignore[attr-defined]
    s.enqueue = lambda stage, ids: s.enqueued.append((stage, list(ids)))  # type: ignore[attr-defined]
    return s


def killed(*_: Any, **__: Any) -> Any:
    raise WorkerKilled


def failures(svc: Services, stage: str, subject: str) -> list[Any]:
    return [f for f in svc.store.failures if f.stage == stage and f.subject == subject]  # type: ignore[attr-defined]


def reap(svc: Services) -> Any:
    """Time passes beyond the stale-claim limit; the beat's sweep runs."""
    svc.clock.t += timedelta(seconds=svc.stale_claim_s + 1)  # type: ignore[attr-defined]
    return sweep(svc)


def test_a_study_that_kills_its_worker_is_given_up_after_three_lost_claims_and_replayed(svc: Services) -> None:
    assert register_study(svc, STUDY)
    retrieve = svc.pacs.retrieve_series
    svc.pacs.retrieve_series = killed  # type: ignore[method-assign]  # e.g. a decompression bomb: OOM-killed
    for lost in (1, 2):
        with pytest.raises(WorkerKilled):
            ingest_study(svc, STUDY)
        assert svc.store.get_study(STUDY).status is StudyStatus.PROCESSING  # type: ignore[union-attr]
        svc.enqueued.clear()  # type: ignore[attr-defined]
        result = reap(svc)
        assert (result.released, result.given_up) == (1, 0)
        row = svc.store.get_study(STUDY)
        assert row is not None and row.status is StudyStatus.RETRY and row.lost_claims == lost
        assert ("ingest", [STUDY]) in svc.enqueued  # type: ignore[attr-defined]  # back in the queue
    with pytest.raises(WorkerKilled):
        ingest_study(svc, STUDY)
    svc.enqueued.clear()  # type: ignore[attr-defined]
    result = reap(svc)
    assert (result.released, result.given_up) == (0, 1)
    row = svc.store.get_study(STUDY)
    assert row is not None and row.status is StudyStatus.FAILED and row.outcome == Outcome.WORKER_LOST.value
    assert not [ids for stage, ids in svc.enqueued if stage == "ingest" and ids]  # type: ignore[attr-defined]
    (failure,) = failures(svc, "ingest", STUDY)
    assert failure.outcome is Outcome.WORKER_LOST and not failure.retryable
    assert "/studies/{uid}/retry" in failure.message
    assert reap(svc).given_up == 0  # counted once
    # the operator fixes the cause and replays it: fresh counts, processed, the failure resolved
    svc.pacs.retrieve_series = retrieve  # type: ignore[method-assign]
    assert retry_study(svc, STUDY)
    row = svc.store.get_study(STUDY)
    assert row is not None and row.lost_claims == 0 and row.attempts == 0
    assert ingest_study(svc, STUDY).status == "ready"
    assert failure.resolved_at is not None


def test_a_patient_whose_scoring_kills_the_worker_is_not_reflagged_forever(svc: Services) -> None:
    register_study(svc, STUDY)
    ingest_study(svc, STUDY)
    sync_vitals(svc, "pat-1")
    model = svc.model()
    predict = model.predict
    model.predict = killed  # type: ignore[method-assign]
    for _ in range(3):
        with pytest.raises(WorkerKilled):
            assess_patients(svc, ["pat-1"])
        result = reap(svc)
    assert result.given_up == 1
    patient = svc.store.get_patient("pat-1")
    assert patient is not None and not patient.needs_assessment and patient.outcome == Outcome.WORKER_LOST.value
    assert svc.store.patients_due(svc.clock.now() + timedelta(days=1), 10) == []
    assert failures(svc, "assess", "pat-1")[0].outcome is Outcome.WORKER_LOST
    model.predict = predict  # type: ignore[method-assign]
    svc.enqueued.clear()  # type: ignore[attr-defined]
    assert reassess_patient(svc, "pat-1")
    assert svc.enqueued == [("assess", ["pat-1"])]  # type: ignore[attr-defined]
    assert [r.status for r in assess_patients(svc, ["pat-1"])] == ["scored"]
    assert not reassess_patient(svc, "nobody")


def test_a_publish_lost_three_times_is_failed_then_republished_once(svc: Services) -> None:
    register_study(svc, STUDY)
    ingest_study(svc, STUDY)
    sync_vitals(svc, "pat-1")
    ident = assess_patients(svc, ["pat-1"])[0].identifier
    assert ident
    create = svc.ehr.conditional_create
    svc.ehr.conditional_create = killed  # type: ignore[method-assign]  # past the hard time limit, say
    for _ in range(3):
        with pytest.raises(WorkerKilled):
            publish(svc, ident)
        result = reap(svc)
    assert result.given_up == 1
    row = svc.store.get_assessment(ident)
    assert row is not None and row.status is AssessmentStatus.FAILED and row.outcome == Outcome.WORKER_LOST.value
    assert svc.store.assessments_due(svc.clock.now() + timedelta(days=1)) == []
    svc.ehr.conditional_create = create  # type: ignore[method-assign]
    svc.enqueued.clear()  # type: ignore[attr-defined]
    assert republish(svc, ident)
    assert svc.enqueued == [("publish", [ident])]  # type: ignore[attr-defined]
    assert publish(svc, ident) == "published"
    assert republish(svc, ident) and publish(svc, ident) == "published"  # re-sent: the conditional create finds it
    assert len(svc.ehr.assessments()) == 1  # type: ignore[attr-defined]
    assert failures(svc, "publish", ident)[0].resolved_at is not None


def test_a_retryable_publish_is_never_given_up_however_long_the_ehr_is_down(svc: Services) -> None:
    register_study(svc, STUDY)
    ingest_study(svc, STUDY)
    sync_vitals(svc, "pat-1")
    ident = assess_patients(svc, ["pat-1"])[0].identifier
    assert ident
    svc.ehr.fail_create = DomainError(Outcome.EHR_UNAVAILABLE, "503")  # type: ignore[attr-defined]
    waits = []
    for _ in range(svc.max_retries + 5):  # more attempts than any other stage gets
        assert publish(svc, ident) == "retry"
        due = svc.store.get_assessment(ident).next_attempt_at  # type: ignore[union-attr]
        assert due is not None and svc.store.assessments_due(due - timedelta(seconds=1)) == []
        waits.append(due - svc.clock.now())
        svc.clock.t = due  # type: ignore[attr-defined]
        assert svc.store.assessments_due(svc.clock.now()) == [ident]  # the sweep re-sends it
    assert waits[1] > waits[0] and max(waits) <= timedelta(hours=1)  # backing off, capped
    svc.ehr.fail_create = None  # type: ignore[attr-defined]
    assert publish(svc, ident) == "published"
    assert len(svc.ehr.assessments()) == 1  # type: ignore[attr-defined]


def test_a_rejected_publish_fails_and_is_republished_by_the_operator(svc: Services) -> None:
    register_study(svc, STUDY)
    ingest_study(svc, STUDY)
    sync_vitals(svc, "pat-1")
    ident = assess_patients(svc, ["pat-1"])[0].identifier
    assert ident
    svc.ehr.fail_create = DomainError(Outcome.EHR_REJECTED, "422: missing scope")  # type: ignore[attr-defined]
    assert publish(svc, ident) == "failed"
    assert publish(svc, ident) == "failed"  # a replayed task does not publish a failed one by itself
    svc.ehr.fail_create = None  # type: ignore[attr-defined]
    assert republish(svc, ident) and publish(svc, ident) == "published"
    assert len(svc.ehr.assessments()) == 1  # type: ignore[attr-defined]
    assert not republish(svc, "no-such-identifier")


def test_a_future_dated_study_keeps_one_identity_whatever_the_clock(svc: Services) -> None:
    """A modality clock six hours fast: the identity used to follow `now` and changed at every run."""
    svc.store.add_study(StudyRef(STUDY, "MRN1", None, NOW + timedelta(hours=6)), "qido", NOW)
    assert ingest_study(svc, STUDY).status == "ready"
    sync_vitals(svc, "pat-1")
    version = svc.model().model_version
    first = prepare(svc, "pat-1", version)
    assert first.window_end == NOW  # the study counts as taken when it was first seen, not in the future
    (scored,) = assess_patients(svc, ["pat-1"])
    assert scored.status == "scored" and scored.identifier == first.identifier
    for later in (timedelta(minutes=1), timedelta(hours=2), timedelta(hours=9)):  # before and after its own time
        svc.clock.t = NOW + later  # type: ignore[attr-defined]
        assert prepare(svc, "pat-1", version).identifier == first.identifier
        svc.store.mark_needs_assessment("pat-1")
        (again,) = assess_patients(svc, ["pat-1"])
        assert (again.status, again.identifier) == ("unchanged", first.identifier)
    assert len(svc.store.assessments) == 1  # type: ignore[attr-defined]


def test_new_vitals_after_a_future_dated_study_still_give_a_new_identity(svc: Services) -> None:
    svc.store.add_study(StudyRef(STUDY, "MRN1", None, NOW + timedelta(hours=6)), "qido", NOW)
    ingest_study(svc, STUDY)
    sync_vitals(svc, "pat-1")
    first = assess_patients(svc, ["pat-1"])[0].identifier
    svc.clock.t = NOW + timedelta(hours=1)  # type: ignore[attr-defined]
    svc.ehr.observations.append(obs("o9", "8867-4", 110, "/min", NOW + timedelta(minutes=30)))  # type: ignore[attr-defined]
    sync_vitals(svc, "pat-1")
    (second,) = assess_patients(svc, ["pat-1"])
    assert second.status == "scored" and second.identifier != first
    assert svc.store.get_assessment(second.identifier).window_end == NOW + timedelta(minutes=30)  # type: ignore[arg-type,union-attr]


def test_a_volume_that_is_gone_is_rebuilt_and_the_patient_scored_with_it(svc: Services) -> None:
    run_flow(svc)
    study = svc.store.get_study(STUDY)
    assert study is not None and study.volume_path
    Path(study.volume_path).unlink()  # removed by retention, or a disk replaced
    svc.ehr.observations.append(obs("o4", "8867-4", 120, "/min", NOW + timedelta(minutes=5)))  # type: ignore[attr-defined]
    svc.clock.t = NOW + timedelta(minutes=10)  # type: ignore[attr-defined]
    sync_vitals(svc, "pat-1")
    svc.enqueued.clear()  # type: ignore[attr-defined]
    (missing,) = assess_patients(svc, ["pat-1"])
    assert missing.status == Outcome.VOLUME_MISSING.value and "re-ingested" in (missing.reason or "")
    assert failures(svc, "assess", "pat-1")[-1].outcome is Outcome.VOLUME_MISSING
    row = svc.store.get_study(STUDY)
    assert row is not None and row.status is StudyStatus.RETRY and row.volume_path is None
    assert ("ingest", [STUDY]) in svc.enqueued  # type: ignore[attr-defined]
    retrievals = svc.pacs.retrievals  # type: ignore[attr-defined]
    assert ingest_study(svc, STUDY).status == "ready"
    assert svc.pacs.retrievals == retrievals + 1 and Path(svc.store.get_study(STUDY).volume_path).is_file()  # type: ignore[attr-defined,arg-type,union-attr]
    sync_vitals(svc, "pat-1")
    (rescored,) = assess_patients(svc, ["pat-1"])
    assert rescored.status == "scored" and rescored.probability is not None
    assert rescored.probability >= 0.35  # the fake model adds 0.25 for an image: it was used
