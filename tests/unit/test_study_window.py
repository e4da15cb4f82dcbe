"""Studies are found in every time zone, across midnight and DST changes, by both detection paths.

The fake PACS answers like a QIDO-RS server: it matches the StudyDate range on the local dates it
stores (the site's civil date), and its StudyRefs are read by the adapter's own functions
(``dicom_datetime`` + ``localize`` in the PACS's zone), so only the window logic is under test.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta, timezone, tzinfo
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from integration.adapters.dicomweb_parse import dicom_datetime
from integration.domain.studytime import StudyWindow, detection_window, local_day, localize
from integration.domain.types import StudyRef
from integration.services.context import Services
from integration.services.studies import detect_studies
from tests.unit.fakes import FakeClock, FakeEhr, FakeFeed, FakeModel, FakeStore

OFFSETS = ("-1200", "-0500", "+0000", "+0530", "+1400", None)  # None: no TimezoneOffsetFromUTC


def offset_zone(offset: str) -> timezone:
    sign = -1 if offset[0] == "-" else 1
    return timezone(sign * timedelta(hours=int(offset[1:3]), minutes=int(offset[3:5])))


@dataclass
class StoredStudy:
    uid: str
    study_date: str
    study_time: str
    offset: str | None


class QidoPacs:
    """A PACS that stores local StudyDate/StudyTime strings and matches date ranges on them."""

    def __init__(self, zone: tzinfo) -> None:
        self.zone = zone
        self.studies: list[StoredStudy] = []
        self.queries: list[tuple[date, date]] = []

    def take(self, uid: str, instant: datetime, offset: str | None, *, with_time: bool = True) -> None:
        """A modality at a site with ``offset`` (None: a site in the PACS's zone that sends no offset)."""
        local = instant.astimezone(offset_zone(offset) if offset else self.zone)
        self.studies.append(StoredStudy(uid, f"{local:%Y%m%d}", f"{local:%H%M%S}" if with_time else "", offset))

    def find_studies(self, first: date, last: date) -> list[StudyRef]:
        self.queries.append((first, last))
        refs = []
        for s in self.studies:
            if f"{first:%Y%m%d}" <= s.study_date <= f"{last:%Y%m%d}":
                when = dicom_datetime(s.study_date, s.study_time, s.offset or "")
                assert when is not None
                refs.append(StudyRef(s.uid, "MRN", None, localize(when, self.zone), ("CT",),
                                     date_only=not s.study_time))
        return refs

    def get_study(self, uid: str) -> StudyRef | None:
        return next((r for r in self.find_studies(date.min, date.max) if r.study_uid == uid), None)

    def list_series(self, uid: str) -> list[object]:
        raise AssertionError("not used")

    def retrieve_series(self, study_uid: str, series_uid: str) -> tuple[str, list[object]]:
        raise AssertionError("not used")


def services(tmp_path: Path, pacs: QidoPacs, clock: FakeClock, feed: FakeFeed | None, name: str) -> Services:
    return Services(store=FakeStore(clock), pacs=pacs, ehr=FakeEhr(), model=FakeModel,
                    volumes_dir=tmp_path / name, feed=feed, clock=clock, lookback_hours=24.0, clock_skew_s=900.0)


PATHS = ("qido", "orthanc-first-start")


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("pacs_zone", ["UTC", "Europe/Berlin", "Pacific/Kiritimati", "Pacific/Pago_Pago"])
def test_every_offset_is_found_exactly_once_across_midnight_utc(tmp_path: Path, path: str, pacs_zone: str) -> None:
    before = datetime(2026, 12, 5, 23, 59, tzinfo=UTC)
    pacs = QidoPacs(ZoneInfo(pacs_zone))
    for k, offset in enumerate(OFFSETS):  # taken 30 min before the first poll, at every kind of site
        pacs.take(f"1.2.3.{k}", before - timedelta(minutes=30), offset)
    clock = FakeClock(before)
    feed = FakeFeed() if path != "qido" else None
    svc = services(tmp_path, pacs, clock, feed, path)
    found = detect_studies(svc)
    for k, offset in enumerate(OFFSETS):  # taken just after midnight UTC, found by the next poll
        pacs.take(f"1.2.4.{k}", before + timedelta(minutes=1), offset)
        if feed is not None:
            feed.events.append(f"1.2.4.{k}")  # Orthanc: by the feed once stable
    clock.t = before + timedelta(minutes=2)  # 00:01 UTC
    found += detect_studies(svc)
    clock.t += timedelta(minutes=1)
    found += detect_studies(svc)
    expected = [f"1.2.3.{k}" for k in range(len(OFFSETS))] + [f"1.2.4.{k}" for k in range(len(OFFSETS))]
    assert sorted(found) == sorted(expected)  # each exactly once


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(
    ("zone", "change_utc"),
    [
        ("Europe/Berlin", datetime(2026, 3, 29, 1, 0, tzinfo=UTC)),  # 02:00 CET -> 03:00 CEST
        ("Europe/Berlin", datetime(2026, 10, 25, 1, 0, tzinfo=UTC)),  # 03:00 CEST -> 02:00 CET
        ("America/New_York", datetime(2026, 3, 8, 7, 0, tzinfo=UTC)),  # 02:00 EST -> 03:00 EDT
        ("America/New_York", datetime(2026, 11, 1, 6, 0, tzinfo=UTC)),  # 02:00 EDT -> 01:00 EST
    ],
)
def test_studies_without_offset_across_a_dst_change(tmp_path: Path, path: str, zone: str,
                                                    change_utc: datetime) -> None:
    pacs = QidoPacs(ZoneInfo(zone))
    minutes = (-50, -5, 5, 40)  # around the change, in the PACS's zone, no offset sent
    for m in minutes:
        pacs.take(f"9.{m + 100}", change_utc + timedelta(minutes=m), None)
    clock = FakeClock(change_utc + timedelta(minutes=45))
    feed = FakeFeed() if path != "qido" else None
    svc = services(tmp_path, pacs, clock, feed, path)
    found = detect_studies(svc)
    clock.t += timedelta(hours=1)
    found += detect_studies(svc)
    assert sorted(found) == sorted(f"9.{m + 100}" for m in minutes)


def test_dst_rules_apply_to_naive_times() -> None:
    berlin = ZoneInfo("Europe/Berlin")
    summer = localize(datetime(2026, 7, 1, 12, 0), berlin)
    winter = localize(datetime(2026, 1, 1, 12, 0), berlin)
    assert summer.utcoffset() == timedelta(hours=2) and winter.utcoffset() == timedelta(hours=1)
    start, end = local_day(date(2026, 10, 25), berlin)  # the 25-hour day
    assert end - start == timedelta(hours=25)


def test_a_study_dated_ahead_by_a_fast_modality_clock_is_found_on_the_next_poll(tmp_path: Path) -> None:
    now = datetime(2026, 6, 1, 10, 0, tzinfo=UTC)
    pacs = QidoPacs(ZoneInfo("Asia/Kolkata"))
    pacs.take("7.1", now + timedelta(minutes=10), None)  # within the 15 min skew
    pacs.take("7.2", now + timedelta(minutes=40), "+0530")  # beyond it: found once it is near
    clock = FakeClock(now)
    svc = services(tmp_path, pacs, clock, None, "skew")
    assert detect_studies(svc) == ["7.1"]
    clock.t = now + timedelta(minutes=26)
    assert detect_studies(svc) == ["7.2"]


def test_a_date_only_study_counts_for_its_whole_local_day(tmp_path: Path) -> None:
    now = datetime(2026, 12, 5, 23, 30, tzinfo=UTC)  # 5 Dec 23:30 UTC = 6 Dec 13:30 in Kiritimati
    pacs = QidoPacs(ZoneInfo("Pacific/Kiritimati"))
    pacs.take("8.1", now, None, with_time=False)  # StudyDate 20261206, no StudyTime
    pacs.take("8.2", now - timedelta(days=3), None, with_time=False)  # a day outside the lookback
    svc = services(tmp_path, pacs, FakeClock(now), None, "dateonly")
    assert detect_studies(svc) == ["8.1"]


def test_the_query_covers_every_civil_zone_and_the_filter_is_exact() -> None:
    now = datetime(2026, 12, 5, 23, 30, tzinfo=UTC)
    window = detection_window(now, timedelta(hours=1), timedelta(minutes=15))
    assert window.query_dates() == (date(2026, 12, 5), date(2026, 12, 6))  # UTC-12: 5th; UTC+14: 6th
    at = lambda t, tz: StudyRef("u", "p", None, t.astimezone(tz))  # noqa: E731
    plus14, minus12 = offset_zone("+1400"), offset_zone("-1200")
    assert window.contains(at(now - timedelta(minutes=30), plus14))
    assert window.contains(at(now - timedelta(minutes=30), minus12))
    assert not window.contains(at(now - timedelta(hours=2), plus14))
    assert window.contains(at(now + timedelta(minutes=14), minus12))
    assert not window.contains(at(now + timedelta(minutes=16), minus12))
    with pytest.raises(ValueError, match="aware"):
        StudyWindow(datetime(2026, 1, 1), now)
