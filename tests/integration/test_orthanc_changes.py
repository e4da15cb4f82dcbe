"""OrthancChangeFeed against a real Orthanc (StableAge 1 s): stable studies, the cursor, re-sends, detection."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from pydicom.uid import generate_uid

from integration.adapters.dicomweb import DicomWebPacs
from integration.adapters.orthanc import OrthancChangeFeed, is_orthanc, orthanc_root
from integration.domain.types import DomainError, Outcome
from integration.services.context import Services
from integration.services.studies import ORTHANC_CURSOR, detect_studies
from sandbox import OrthancPeer, free_port
from tests.integration.test_dicomweb_orthanc import ct_series, store
from tests.unit.fakes import FakeClock, FakeEhr, FakeModel, FakeStore

pytestmark = pytest.mark.peers

WAIT_S = 30.0  # StableAge is 1 s; this only bounds a failing test


def wait_for_stable(feed: OrthancChangeFeed, cursor: int, study_uid: str) -> tuple[int, list[str]]:
    """Read the feed from ``cursor`` until ``study_uid`` shows up; returns (cursor after it, all uids seen)."""
    seen: list[str] = []
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        while True:
            events, cursor, done = feed.stable_studies(cursor, limit=5)
            seen.extend(e.study_uid for e in events)
            if done:
                break
        if study_uid in seen:
            return cursor, seen
        time.sleep(0.3)
    raise AssertionError(f"no StableStudy event for {study_uid} within {WAIT_S} s (saw {seen})")


def test_stable_study_is_reported_once_and_the_cursor_advances(orthanc_peer: OrthancPeer) -> None:
    feed = OrthancChangeFeed(orthanc_peer.url)
    start = feed.latest_cursor()
    study = generate_uid()
    series = ct_series(study, n=5)
    store(orthanc_peer, series)

    stored_at = datetime.now(UTC)
    cursor, seen = wait_for_stable(feed, start, study)
    assert cursor > start
    assert seen.count(study) == 1  # one study, several instances/series events: one UID
    (event,) = [e for e in feed.stable_studies(start)[0] if e.study_uid == study]
    # when it became stable, from the event's Date (UTC, whole seconds, taken mid-second): after the last instance
    # was stored (StableAge 1 s) and before now, within the stamp's half second
    assert event.stable_at is not None
    assert stored_at - timedelta(seconds=0.5) <= event.stable_at <= datetime.now(UTC) + timedelta(seconds=0.5)

    events, again, done = feed.stable_studies(cursor)
    assert study not in [e.study_uid for e in events] and again >= cursor and done

    # A late instance makes the study stable again: delivery is at-least-once, callers de-duplicate.
    late = ct_series(study, n=1, series_uid=series[0].SeriesInstanceUID, seed=9)
    store(orthanc_peer, late)
    _, resent = wait_for_stable(feed, cursor, study)
    assert study in resent
    feed.close()


def test_deleted_study_is_skipped(orthanc_peer: OrthancPeer) -> None:
    feed = OrthancChangeFeed(orthanc_peer.url)
    keep, gone = generate_uid(), generate_uid()
    start = feed.latest_cursor()
    store(orthanc_peer, ct_series(gone, n=2))
    store(orthanc_peer, ct_series(keep, n=2))
    cursor, seen = wait_for_stable(feed, start, keep)
    if gone not in seen:  # its event may not have fired yet: make sure it has, then delete the study
        cursor, seen = wait_for_stable(feed, start, gone)
    found = httpx.post(f"{orthanc_peer.url}/tools/lookup", content=gone).json()
    httpx.delete(f"{orthanc_peer.url}{found[0]['Path']}").raise_for_status()
    uids = []
    position, done = start, False
    while not done:
        page, position, done = feed.stable_studies(position, limit=5)
        uids.extend(e.study_uid for e in page)
    assert keep in uids and gone not in uids


def test_cursor_beyond_the_log_moves_back(orthanc_peer: OrthancPeer) -> None:
    feed = OrthancChangeFeed(orthanc_peer.url)
    last = feed.latest_cursor()
    events, cursor, done = feed.stable_studies(last + 10_000)
    assert events == [] and done and cursor == last  # a rebuilt PACS: read from its real end, skip nothing new


def test_orthanc_is_detected_from_rest_or_dicomweb_root(orthanc_peer: OrthancPeer) -> None:
    assert is_orthanc(orthanc_peer.url)
    assert orthanc_root(orthanc_peer.dicomweb_url) == orthanc_peer.url
    assert not is_orthanc(f"http://127.0.0.1:{free_port()}")


def test_orthanc_down_is_pacs_unavailable() -> None:
    feed = OrthancChangeFeed(f"http://127.0.0.1:{free_port()}", timeout=2.0)
    with pytest.raises(DomainError) as err:
        feed.stable_studies(0)
    assert err.value.outcome is Outcome.PACS_UNAVAILABLE


def test_a_lost_stable_event_is_found_by_the_qido_reconcile(orthanc_peer: OrthancPeer, tmp_path: Path) -> None:
    """Orthanc keeps its stability timers in memory: restarted between a study's last instance and StableStudy,
    it never emits the event. The detection reads the window by QIDO-RS and asks Orthanc whether the study is
    stable (POST /tools/lookup, then IsStable)."""
    feed = OrthancChangeFeed(orthanc_peer.url)
    study = generate_uid()
    now = datetime.now(UTC)
    start = feed.latest_cursor()
    store(orthanc_peer, ct_series(study, n=3, study_date=now.strftime("%Y%m%d"), study_time=now.strftime("%H%M%S")))
    wait_for_stable(feed, start, study)
    assert feed.is_stable(study) is True
    assert feed.is_stable(generate_uid()) is None  # not held by Orthanc

    clock = FakeClock(now)
    with DicomWebPacs(orthanc_peer.dicomweb_url, study_timezone=UTC) as pacs:
        svc = Services(store=FakeStore(clock), pacs=pacs, ehr=FakeEhr(), model=FakeModel, volumes_dir=tmp_path,
                       feed=feed, clock=clock, feed_reconcile_s=300.0)
        svc.store.set_cursor(ORTHANC_CURSOR, str(feed.latest_cursor()))  # past the event: as if it never came
        assert study in detect_studies(svc)
        row = svc.store.get_study(study)
        assert row is not None and row.source == "orthanc-reconcile"
        clock.t += timedelta(seconds=301)
        assert study not in detect_studies(svc)  # once
    feed.close()
