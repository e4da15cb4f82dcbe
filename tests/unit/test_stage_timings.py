"""Stage timings (issue 18): the histogram's pure parts (domain.stages), and the exact observations each use case
records over the fakes, timed by a fake monotonic timer that only the fake peers advance."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from inference.preprocess import Slice
from inference.runtime import ModelInputs, Prediction
from integration.adapters.orthanc import change_time
from integration.domain import stages
from integration.domain.push import StudyArrivals
from integration.domain.types import DomainError, Outcome
from integration.services.assess import assess_patients, publish, republish
from integration.services.context import Services
from integration.services.push import PushServices, association_closed, complete_due, receive_instance
from integration.services.studies import ORTHANC_CURSOR, detect_studies, ingest_study, register_study
from integration.services.vitals import sync_vitals
from tests.unit.fakes import NOW, STUDY, FakeClock, FakeEhr, FakeFeed, FakeModel, FakePacs, FakeStore, ct_slices, obs
from tests.unit.test_push import QUIET, T0, MemorySpool, instance
from tests.unit.test_push import STUDY as PUSHED

# -- the histogram's pure parts -----------------------------------------------------------------------------------


def test_observations_fold_into_one_increment_per_stage_and_bucket_in_a_fixed_order() -> None:
    folded = stages.fold([("publish", 0.3), ("detect", 0.004), ("publish", 0.21), ("detect", 61.0),
                          ("publish", 0.25), ("detect", -2.0), ("model", math.nan), ("detect", 0.005)])
    assert [(i.stage, i.le, i.count) for i in folded] == [
        ("detect", "0.005", 3),  # 0.004, a negative duration (clock skew) as 0, and 0.005 itself (le is inclusive)
        ("detect", "+Inf", 1),
        ("publish", "0.3", 3),  # (0.2, 0.3]
    ]
    assert folded[0].seconds == pytest.approx(0.009) and folded[2].seconds == pytest.approx(0.76)
    with pytest.raises(ValueError, match="unknown stage"):
        stages.fold([("retrieve", 1.0), ("ingest", 1.0)])  # the table stays bounded by the known stages


def test_rows_read_back_as_cumulative_histograms_for_every_stage() -> None:
    rows = [stages.BucketIncrement("model", "0.05", 2, 0.07), stages.BucketIncrement("model", "+Inf", 1, 90.0),
            stages.BucketIncrement("model", "0.04", 1, 0.04),  # a bound no longer in BUCKETS: counted at 0.05
            stages.BucketIncrement("gone", "1.0", 5, 5.0)]  # a stage this version does not know: ignored
    by_stage = {h.stage: h for h in stages.histograms(rows)}
    assert list(by_stage) == list(stages.STAGES)
    model = by_stage["model"]
    assert model.count == 4 and model.sum == pytest.approx(90.11)
    cumulative = dict(model.buckets)
    assert cumulative[0.025] == 0 and cumulative[0.05] == 3 and cumulative[60.0] == 3 and cumulative[math.inf] == 4
    assert len(model.buckets) == len(stages.BUCKETS) + 1
    assert by_stage["detect"].count == 0 and all(n == 0 for _, n in by_stage["detect"].buckets)


def test_quantiles_interpolate_within_a_bucket_like_histogram_quantile() -> None:
    buckets = ((0.1, 0), (0.2, 10), (0.5, 20), (math.inf, 20))
    assert stages.quantile(0.5, buckets) == pytest.approx(0.2)  # rank 10: the top of (0.1, 0.2]
    assert stages.quantile(0.75, buckets) == pytest.approx(0.35)  # rank 15: halfway through (0.2, 0.5]
    assert stages.quantile(0.25, buckets) == pytest.approx(0.15)
    assert stages.quantile(0.99, ((1.0, 1), (math.inf, 5))) == 1.0  # in +Inf: the largest finite bound
    assert math.isnan(stages.quantile(0.5, ((1.0, 0), (math.inf, 0))))
    before = stages.StageHistogram("model", ((0.1, 1), (math.inf, 2)), 2, 3.0)
    after = stages.StageHistogram("model", ((0.1, 4), (math.inf, 6)), 6, 4.5)
    assert stages.minus(after, before) == stages.StageHistogram("model", ((0.1, 3), (math.inf, 4)), 4, 1.5)


def test_a_report_outside_a_timed_call_goes_nowhere() -> None:
    stages.report(stages.DECODE, 1.0)  # no service is timing: a no-op
    seen: list[stages.Observation] = []
    with stages.reporting(lambda stage, seconds: seen.append((stage, seconds))):
        stages.report(stages.DECODE, 0.5)
    stages.report(stages.DECODE, 2.0)
    assert seen == [("decode", 0.5)]


def test_orthanc_change_dates_are_utc_seconds_taken_mid_second() -> None:
    assert change_time("20261205T183522") == datetime(2026, 12, 5, 18, 35, 22, 500000, tzinfo=UTC)
    assert change_time("2026-12-05") is None and change_time(None) is None and change_time(20261205) is None


# -- the use cases' observations ----------------------------------------------------------------------------------


class FakeTimer:
    """Monotonic seconds that move only when a fake peer says it spent time."""

    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


class TimedPacs(FakePacs):
    """Retrieving takes 0.375 s, of which decoding 0.125 s (reported as the DICOMweb and spool readers do)."""

    def __init__(self, timer: FakeTimer) -> None:
        super().__init__()
        self.timer = timer
        self.slices: list[Slice] | None = None
        self.fail: DomainError | None = None

    def retrieve_series(self, study_uid: str, series_uid: str) -> tuple[str, list[Slice]]:
        self.timer.t += 0.25
        if self.fail is not None:
            raise self.fail
        self.timer.t += 0.125
        stages.report(stages.DECODE, 0.125)
        modality, slices = super().retrieve_series(study_uid, series_uid)
        return modality, self.slices if self.slices is not None else slices


class TimedEhr(FakeEhr):
    """An Observation search takes 0.5 s, a conditional create 0.125 s."""

    def __init__(self, timer: FakeTimer) -> None:
        super().__init__()
        self.timer = timer

    def search_observations(self, patient_id: str, codes: Sequence[str], since: datetime | None,
                            updated_since: datetime | None) -> list[dict[str, Any]]:
        self.timer.t += 0.5
        return super().search_observations(patient_id, codes, since, updated_since)

    def conditional_create(self, resource: dict[str, Any], system: str, value: str) -> tuple[str, bool]:
        self.timer.t += 0.125
        return super().conditional_create(resource, system, value)


class TimedModel(FakeModel):
    """A forward pass takes 0.0625 s, whatever the batch."""

    def __init__(self, timer: FakeTimer) -> None:
        super().__init__()
        self.timer = timer

    def predict(self, batch: Sequence[ModelInputs]) -> list[Prediction]:
        self.timer.t += 0.0625
        return super().predict(batch)


class RecordingStore(FakeStore):
    """FakeStore that keeps each ``observe_stages`` call (one per task: the batching is part of the contract)."""

    def __init__(self, clock: FakeClock) -> None:
        super().__init__(clock)
        self.observed: list[list[stages.Observation]] = []
        self.broken = False

    def observe_stages(self, observations: Sequence[stages.Observation]) -> None:
        self.observed.append(list(observations))
        if self.broken:
            raise ConnectionError("database is locked")
        super().observe_stages(observations)


@pytest.fixture()
def svc(tmp_path: Path) -> Services:
    timer, clock = FakeTimer(), FakeClock(NOW)
    model = TimedModel(timer)
    return Services(store=RecordingStore(clock), pacs=TimedPacs(timer), ehr=TimedEhr(timer), model=lambda: model,
                    volumes_dir=tmp_path / "volumes", clock=clock, timer=timer, feed=FakeFeed())


def observed(svc: Services) -> list[list[stages.Observation]]:
    store = svc.store
    assert isinstance(store, RecordingStore)
    calls, store.observed = store.observed, []
    return calls


def score_and_publish(svc: Services) -> list[str]:
    sync_vitals(svc, "pat-1")
    ids = [r.identifier for r in assess_patients(svc, ["pat-1"]) if r.identifier]
    for identifier in ids:
        assert publish(svc, identifier) == "published"
    return ids


def test_each_stage_of_a_feed_study_is_observed_once_with_its_exact_duration(svc: Services) -> None:
    assert isinstance(svc.feed, FakeFeed) and isinstance(svc.clock, FakeClock)
    svc.feed.events.append(STUDY)
    svc.feed.stable_at[STUDY] = NOW - timedelta(seconds=3)  # Orthanc's StableStudy event
    svc.store.set_cursor(ORTHANC_CURSOR, "0")
    assert detect_studies(svc) == [STUDY]
    assert observed(svc) == [[("detect", 3.0)]]
    row = svc.store.get_study(STUDY)
    assert row is not None and row.completed_at == NOW - timedelta(seconds=3) and row.detected_at == NOW

    assert ingest_study(svc, STUDY).status == "ready"
    # one statement per task; decoding reported from inside the retrieval is taken out of it; building the volume
    # moved no fake peer's time, so it lasted exactly 0 on this timer
    assert observed(svc) == [[("decode", 0.125), ("retrieve", 0.25), ("preprocess", 0.0)]]

    sync_vitals(svc, "pat-1")
    assert observed(svc) == [[("vitals", 0.5)]]
    (scored,) = assess_patients(svc, ["pat-1"])
    # the Device's conditional create (0.125 s) lies between the two forward passes and counts in neither
    assert observed(svc) == [[("model", 0.0625), ("explain", 0.0625)]]

    svc.clock.t = NOW + timedelta(seconds=2)
    assert scored.identifier and publish(svc, scored.identifier) == "published"
    # publish: the RiskAssessment's and the alert Flag's conditional creates (the fake model scores above 0.30)
    assert observed(svc) == [[("publish", 0.25), ("end_to_end", 5.0)]]  # from the event: 3 s + 2 s

    hist = {h.stage: h for h in svc.store.stage_histograms()}
    assert {stage: h.count for stage, h in hist.items()} == dict.fromkeys(stages.STAGES, 1)
    assert hist["end_to_end"].sum == 5.0 and dict(hist["end_to_end"].buckets)[3.0] == 0
    assert dict(hist["end_to_end"].buckets)[5.0] == 1


def test_end_to_end_counts_a_study_once_not_at_a_republish_or_a_rescoring(svc: Services) -> None:
    assert register_study(svc, STUDY)  # announced (webhook, CLI): no completion time of its own
    ingest_study(svc, STUDY)
    svc.clock.t = NOW + timedelta(seconds=2)  # type: ignore[attr-defined]
    (first,) = score_and_publish(svc)
    calls = observed(svc)
    assert not any(stage == "detect" for call in calls for stage, _ in call)  # unknown completion: not guessed
    assert calls[-1] == [("publish", 0.25), ("end_to_end", 2.0)]  # from its detection (RiskAssessment + Flag)

    assert republish(svc, first) and publish(svc, first) == "published"  # an operator's replay
    assert observed(svc) == [[("publish", 0.25)]]

    ehr = svc.ehr
    assert isinstance(ehr, FakeEhr)
    ehr.observations.append(obs("o4", "8867-4", 120, "/min", NOW - timedelta(minutes=30)))  # new data, same study
    (second,) = score_and_publish(svc)
    assert second != first
    assert observed(svc)[-1] == [("publish", 0.25)]
    assert {h.stage: h.count for h in svc.store.stage_histograms()}["end_to_end"] == 1


def test_a_failed_stage_is_not_observed_and_the_stages_before_it_are(svc: Services) -> None:
    pacs = svc.pacs
    assert isinstance(pacs, TimedPacs)
    register_study(svc, STUDY)
    pacs.fail = DomainError(Outcome.PACS_UNAVAILABLE, "connection reset")
    assert ingest_study(svc, STUDY).status == "retry"
    assert observed(svc) == []  # nothing completed: not even an empty statement

    pacs.fail, pacs.slices = None, ct_slices()[:1]  # retrieved, but one slice makes no volume
    svc.store.requeue_study(STUDY)
    assert ingest_study(svc, STUDY).status == "failed"
    assert observed(svc) == [[("decode", 0.125), ("retrieve", 0.25)]]


def test_a_database_error_while_recording_is_logged_and_the_work_goes_on(
    svc: Services, caplog: pytest.LogCaptureFixture
) -> None:
    store = svc.store
    assert isinstance(store, RecordingStore)
    store.broken = True

    def no_mark(uid: str, at: datetime) -> datetime | None:
        raise ConnectionError("database is locked")

    store.mark_study_published = no_mark  # type: ignore[method-assign]
    register_study(svc, STUDY)
    with caplog.at_level(logging.WARNING, logger="integration.services.timing"):
        assert ingest_study(svc, STUDY).status == "ready"
        (identifier,) = score_and_publish(svc)
    row = svc.store.get_assessment(identifier)
    assert row is not None and row.status.value == "published"
    assert len(store.observed) == 4  # ingest, vitals, assess, publish: each tried once, each dropped
    dropped = [r.getMessage() for r in caplog.records]
    assert sum("stage timings dropped" in m for m in dropped) == 4
    assert any("end-to-end time of a study dropped" in m for m in dropped)


# -- C-STORE: from the association's release ----------------------------------------------------------------------


def test_a_pushed_study_is_timed_from_its_release_also_when_its_registration_is_retried() -> None:
    clock = FakeClock(T0)
    spool, store = MemorySpool(), RecordingStore(clock)
    push = PushServices(store=store, spool=spool, arrivals=StudyArrivals(QUIET), clock=clock)
    receive_instance(push, instance(spool, 1))
    clock.t = T0 + timedelta(seconds=1)
    association_closed(push, 1, released=True)
    add_study = store.add_study

    def down(*_: object, **__: object) -> bool:
        raise ConnectionError("database is down")

    store.add_study = down  # type: ignore[method-assign]
    clock.t = T0 + timedelta(seconds=1.25)
    assert complete_due(push) == []  # postponed by COMPLETION_RETRY (2 s)
    store.add_study = add_study  # type: ignore[method-assign]
    clock.t = T0 + timedelta(seconds=3.5)
    assert complete_due(push) == [PUSHED]
    assert store.observed == [[("detect", 2.5)]]  # from the release, not from the retry
    row = store.get_study(PUSHED)
    assert row is not None and row.completed_at == T0 + timedelta(seconds=1)

    assert push.arrivals.completed_since(PUSHED) is None  # completed and forgotten
    receive_instance(push, instance(spool, 2, association=2))  # a late instance: ingested again, not timed again
    association_closed(push, 2, released=True)
    assert complete_due(push) == [PUSHED] and store.observed == [[("detect", 2.5)]]


def test_completion_times_follow_the_rule_and_an_arrival_clears_them() -> None:
    arrivals = StudyArrivals(QUIET)
    arrivals.arriving(PUSHED, 1, "CT1", T0)
    assert arrivals.completed_since(PUSHED) is None  # open
    arrivals.association_closed(1, released=False, now=T0 + timedelta(seconds=2))
    assert arrivals.completed_since(PUSHED) == T0 + QUIET  # aborted: the quiet period after the last instance
    arrivals.arriving(PUSHED, 2, "CT1", T0 + timedelta(seconds=3))
    assert arrivals.completed_since(PUSHED) is None
    arrivals.association_closed(2, released=True, now=T0 + timedelta(seconds=4))
    arrivals.postpone(PUSHED, T0 + timedelta(seconds=6))
    assert arrivals.completed_since(PUSHED) == T0 + timedelta(seconds=4)
    arrivals.recovered("1.2.3.4", T0)
    assert arrivals.completed_since("1.2.3.4") == T0 + QUIET
