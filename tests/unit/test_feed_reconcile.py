"""The Orthanc feed reconciled with QIDO-RS: a study whose StableStudy event was lost (the PACS restarted between
its last instance and the event) is still found, once the PACS calls it stable, and only once."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from integration.domain.types import DomainError, Outcome
from integration.services.context import Services
from integration.services.studies import ORTHANC_CURSOR, RECONCILE_CURSOR, detect_studies
from tests.unit.fakes import NOW, STUDY, FakeClock, FakeEhr, FakeFeed, FakeModel, FakePacs, FakeStore


def feed_services(tmp_path: Path, reconcile_s: float = 300.0) -> tuple[Services, FakeFeed, FakeClock, FakePacs]:
    clock, feed, pacs = FakeClock(NOW), FakeFeed(), FakePacs()
    svc = Services(store=FakeStore(clock), pacs=pacs, ehr=FakeEhr(), model=FakeModel, volumes_dir=tmp_path,
                   feed=feed, clock=clock, feed_reconcile_s=reconcile_s)
    svc.store.set_cursor(ORTHANC_CURSOR, "0")  # the feed was followed before the study arrived
    return svc, feed, clock, pacs


def test_a_stable_study_without_its_event_is_found_by_the_reconcile_once(tmp_path: Path) -> None:
    svc, feed, clock, _ = feed_services(tmp_path)
    assert detect_studies(svc) == []  # Orthanc does not hold it yet (is_stable: None)
    feed.stable[STUDY] = False  # instances still arriving: left for its event
    clock.t += timedelta(seconds=301)
    assert detect_studies(svc) == []
    feed.stable[STUDY] = True  # Orthanc restarted: stable now, but the event never comes
    clock.t += timedelta(seconds=60)
    assert detect_studies(svc) == []  # not due yet: once every feed_reconcile_s
    clock.t += timedelta(seconds=241)
    assert detect_studies(svc) == [STUDY]
    row = svc.store.get_study(STUDY)
    assert row is not None and row.source == "orthanc-reconcile"
    clock.t += timedelta(seconds=301)
    assert detect_studies(svc) == []  # known: never registered twice
    feed.events.append(STUDY)  # and a late event for it is de-duplicated too
    assert detect_studies(svc) == []


def test_reconcile_off_and_a_failing_pacs_keep_the_feed_going(tmp_path: Path) -> None:
    svc, feed, clock, _ = feed_services(tmp_path, reconcile_s=0)
    feed.stable[STUDY] = True
    assert detect_studies(svc) == []
    assert svc.store.get_cursor(RECONCILE_CURSOR) is None

    svc, feed, clock, pacs = feed_services(tmp_path)

    def down(*_: object) -> list[object]:
        raise DomainError(Outcome.PACS_UNAVAILABLE, "QIDO-RS refused")

    pacs.find_studies = down  # type: ignore[method-assign]
    feed.events.append(STUDY)
    assert detect_studies(svc) == [STUDY]  # the feed's event still counts; the reconcile waits for its next turn
    assert svc.store.get_cursor(ORTHANC_CURSOR) == "1"
