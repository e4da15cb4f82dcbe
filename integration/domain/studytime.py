"""When a study was taken, and which studies a detection poll must pick up. Pure: no I/O, clocks injected.

A PACS stores StudyDate/StudyTime in the local civil time of the site that acquired the study, with
TimezoneOffsetFromUTC only when the modality sent it (most do not). The engine may run in another zone
(a container on UTC beside a PACS in Sydney), so a study taken "now" can carry yesterday's or
tomorrow's date. Detection therefore asks the PACS for a StudyDate range wide enough for every civil
zone (UTC-12 to UTC+14) and then keeps exactly the studies whose aware datetime lies in the window.
Both detection paths (QIDO-RS polling, and the first start of the Orthanc change feed) use this.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta, tzinfo

from integration.domain.types import StudyRef

#: The civil time zones in use span UTC-12:00 (Baker Island) to UTC+14:00 (Line Islands).
EARLIEST_UTC_OFFSET = timedelta(hours=-12)
LATEST_UTC_OFFSET = timedelta(hours=14)


def localize(naive: datetime, zone: tzinfo) -> datetime:
    """A local wall-clock time (StudyDate/StudyTime without an offset) as an aware datetime in ``zone``.

    With a ``zoneinfo.ZoneInfo`` the zone's DST rules apply: a time repeated when clocks go back is read
    as its first occurrence (fold=0); a time skipped when clocks go forward is read with the offset in
    force before the change (PEP 495), i.e. as the instant the modality most likely meant.
    """
    if naive.tzinfo is not None:
        return naive
    return naive.replace(tzinfo=zone, fold=0)


def local_day(day: date, zone: tzinfo) -> tuple[datetime, datetime]:
    """[start, end) of a civil day in ``zone``, in UTC (23 or 25 hours apart on DST days; Python compares
    and subtracts datetimes of one tzinfo on the wall clock, so they are converted)."""
    start = datetime.combine(day, time(), tzinfo=zone).astimezone(UTC)
    end = datetime.combine(day + timedelta(days=1), time(), tzinfo=zone).astimezone(UTC)
    return start, end


@dataclass(frozen=True)
class StudyWindow:
    """The instants a detection poll looks at: [since, until], both aware."""

    since: datetime
    until: datetime

    def __post_init__(self) -> None:
        if self.since.tzinfo is None or self.until.tzinfo is None:
            raise ValueError("StudyWindow needs timezone-aware datetimes")
        if self.until < self.since:
            raise ValueError("StudyWindow ends before it starts")

    def query_dates(self) -> tuple[date, date]:
        """The StudyDate range to ask the PACS for: every local date, in any civil zone, of any instant
        in the window. A superset on purpose; ``contains`` then decides exactly."""
        first = (self.since.astimezone(UTC) + EARLIEST_UTC_OFFSET).date()
        last = (self.until.astimezone(UTC) + LATEST_UTC_OFFSET).date()
        return first, last

    def contains(self, study: StudyRef) -> bool:
        """True when the study was taken within the window.

        A study with a date but no time (``date_only``) counts for its whole local day: it is kept when
        that day overlaps the window. A study with no usable date at all is kept (series selection and
        the database's de-duplication decide), as a PACS that answered the date-range query vouched for it.
        """
        when = study.study_datetime
        if when is None:
            return True
        if when.tzinfo is None:
            raise ValueError(f"study {study.study_uid}: study_datetime must be timezone-aware")
        if study.date_only:
            start, end = local_day(when.date(), when.tzinfo)
            return start <= self.until and end > self.since
        return self.since <= when <= self.until


def detection_window(now: datetime, lookback: timedelta, clock_skew: timedelta) -> StudyWindow:
    """The window of one detection poll at ``now``: the lookback behind it, and ``clock_skew`` ahead of
    it, because modality clocks run fast and a study dated a few minutes in the future is real."""
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    return StudyWindow(now - lookback, now + clock_skew)
