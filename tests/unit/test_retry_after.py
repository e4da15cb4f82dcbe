"""A peer's Retry-After is a bounded hint: parsed per RFC 9110, garbage refused, every value clamped to the cap;
the backoff built from it never raises and never lands beyond ``now + cap``."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta, timezone
from email.utils import format_datetime

import pytest

from integration.config import Settings
from integration.domain.retry import MAX_WAIT_S, backoff_at, bounded_cap, parse_retry_after
from integration.domain.types import DomainError, Outcome

NOW = datetime(2025, 3, 14, 9, 26, 53, tzinfo=UTC)
CAP = 900.0


def http_date(moment: datetime) -> str:
    return format_datetime(moment.astimezone(UTC), usegmt=True)


@pytest.mark.parametrize(("raw", "seconds"), [("0", 0.0), ("7", 7.0), (" 120 ", 120.0), ("2.5", 2.5), ("900", 900.0)])
def test_delay_seconds_within_the_cap_are_taken_as_given(raw: str, seconds: float) -> None:
    assert parse_retry_after(raw, NOW, CAP) == seconds


@pytest.mark.parametrize("raw", ["901", "1000000000", "999999999999", "9" * 400, "9" * 5000, "123456789012345.5"])
def test_long_and_huge_delays_are_clamped_to_the_cap(raw: str) -> None:
    assert parse_retry_after(raw, NOW, CAP) == CAP


@pytest.mark.parametrize(
    "raw",
    [
        "",
        "   ",
        "inf",
        "Infinity",
        "-inf",
        "nan",
        "NaN",
        "-1",
        "-0",
        "+5",
        "1e9",
        "1E3",
        "0x10",
        "soon",
        "5 s",
        "1,000",
        "\u0665",
        "\u00b2",
        "Fri, 32 Foo 2025 99:99:99 GMT",
        "Fri, 31 Dec 99999 23:59:59 GMT",
        "x" * 300,
    ],
)
def test_garbage_is_no_hint(raw: str) -> None:
    assert parse_retry_after(raw, NOW, CAP) is None


def test_none_is_no_hint() -> None:
    assert parse_retry_after(None, NOW, CAP) is None


def test_http_dates_count_from_now_and_are_clamped() -> None:
    assert parse_retry_after(http_date(NOW + timedelta(seconds=30)), NOW, CAP) == 30.0
    assert parse_retry_after(http_date(NOW + timedelta(hours=5)), NOW, CAP) == CAP
    assert parse_retry_after("Fri, 31 Dec 9999 23:59:59 GMT", NOW, CAP) == CAP
    assert parse_retry_after(http_date(NOW - timedelta(days=3)), NOW, CAP) == 0.0  # the past: try now
    assert parse_retry_after("Sat, 01 Jan 0001 00:00:00 GMT", NOW, CAP) == 0.0
    # the two obsolete forms RFC 9110 still asks recipients to accept
    assert parse_retry_after("Friday, 14-Mar-25 09:27:53 GMT", NOW, CAP) == 60.0
    assert parse_retry_after("Fri Mar 14 09:27:53 2025", NOW, CAP) == 60.0


def test_an_http_date_with_an_offset_is_read_in_its_zone() -> None:
    ahead = (NOW + timedelta(seconds=45)).astimezone(timezone(timedelta(hours=2)))
    assert parse_retry_after(format_datetime(ahead), NOW, CAP) == 45.0


@pytest.mark.parametrize("cap", [math.inf, math.nan, -5.0, 0.0, 1e300])
def test_an_unusable_cap_is_bounded_too(cap: float) -> None:
    seconds = parse_retry_after("99999999999", NOW, cap)
    assert seconds is not None and 0.0 <= seconds <= MAX_WAIT_S and seconds == bounded_cap(cap)


def test_backoff_doubles_from_the_base_and_stops_at_the_cap() -> None:
    assert backoff_at(NOW, 1, 5) == NOW + timedelta(seconds=5)
    assert backoff_at(NOW, 4, 5) == NOW + timedelta(seconds=40)
    assert backoff_at(NOW, 30, 5, cap_s=60) == NOW + timedelta(seconds=60)


def test_backoff_honours_a_hint_up_to_the_cap_only() -> None:
    assert backoff_at(NOW, 1, 5, retry_after=120, cap_s=3600) == NOW + timedelta(seconds=120)
    assert backoff_at(NOW, 1, 5, retry_after=1e9, cap_s=3600) == NOW + timedelta(seconds=3600)
    assert backoff_at(NOW, 1, 5, retry_after=0.0) == NOW + timedelta(seconds=5)  # never sooner than the backoff


@pytest.mark.parametrize("hint", [math.inf, -math.inf, math.nan, -1.0, 1e308, 10.0**300])
@pytest.mark.parametrize("attempts", [-3, 0, 1, 40, 10_000, 10**9])
@pytest.mark.parametrize("cap", [900.0, 3600.0, math.inf, math.nan, -1.0])
def test_backoff_never_raises_and_never_passes_the_cap(hint: float, attempts: int, cap: float) -> None:
    at = backoff_at(NOW, attempts, 5.0, retry_after=hint, cap_s=cap)
    assert NOW <= at <= NOW + timedelta(seconds=bounded_cap(cap))


@pytest.mark.parametrize("base", [math.inf, math.nan, -5.0, 1e308])
def test_a_bad_base_never_raises(base: float) -> None:
    at = backoff_at(NOW, 3, base, cap_s=600)
    assert NOW <= at <= NOW + timedelta(seconds=600)


@pytest.mark.parametrize("hint", [math.inf, math.nan, -1.0])
def test_a_domain_error_keeps_no_unusable_hint(hint: float) -> None:
    assert DomainError(Outcome.EHR_UNAVAILABLE, "503", retry_after=hint).retry_after is None
    assert DomainError(Outcome.EHR_UNAVAILABLE, "503", retry_after=30.0).retry_after == 30.0


def test_the_cap_is_a_validated_setting() -> None:
    assert Settings(sandbox=True).retry_after_cap_s == 900.0
    assert Settings(sandbox=True, retry_after_cap_s=60).retry_after_cap_s == 60.0
    for bad in (0, -1, math.inf, 86400 * 2):
        with pytest.raises(ValueError, match="retry_after_cap_s"):
            Settings(sandbox=True, retry_after_cap_s=bad)
