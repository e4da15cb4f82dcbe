"""When to try again: exponential backoff that honours a peer's Retry-After, within bounds.

A peer's ``Retry-After`` (RFC 9110 section 10.2.3) is a hint, never an order: ``parse_retry_after`` reads
delay-seconds or an HTTP-date, refuses anything else (``None``: no hint), and clamps the result to
``[0, cap_s]``, so ``inf``, ``nan``, ``-1``, ``1e9``, a 400-digit number or a date in the year 9999 can
neither park work for decades nor overflow a ``timedelta``. ``backoff_at`` never raises for any float and
never returns a time later than ``now + cap_s``.
"""

from __future__ import annotations

import math
import re
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime

#: The longest Retry-After honoured unless a caller (settings ``retry_after_cap_s``) says otherwise.
DEFAULT_RETRY_AFTER_CAP_S = 900.0
#: No wait is ever longer than this, whatever a caller's cap (keeps ``now + delay`` far inside datetime's range).
MAX_WAIT_S = 30 * 86400.0
#: delay-seconds is 1*DIGIT; a decimal fraction is tolerated (some servers send one), nothing else (no sign,
#: exponent, ``inf`` or ``nan``). Digits beyond these are not converted: any such number is past every cap.
_DELAY_SECONDS = re.compile(r"([0-9]{1,12})(?:\.[0-9]{1,9})?")
_HUGE_DELAY = re.compile(r"[0-9]{13,}(?:\.[0-9]*)?")
_MAX_HEADER_CHARS = 256  # an HTTP-date is 29 characters; a longer value is garbage, not parsed


def bounded_cap(cap_s: float) -> float:
    """``cap_s`` as a usable bound: within [0, MAX_WAIT_S]; NaN or below zero gives 0, +inf gives MAX_WAIT_S."""
    if math.isnan(cap_s) or cap_s <= 0:
        return 0.0
    return min(cap_s, MAX_WAIT_S)


def parse_retry_after(raw: str | None, now: datetime, cap_s: float = DEFAULT_RETRY_AFTER_CAP_S) -> float | None:
    """Seconds to wait from a ``Retry-After`` value, clamped to ``[0, cap_s]``; ``None`` for no or a bad value.

    ``now`` (timezone-aware) dates an HTTP-date; a date in the past means "now" (0), one past the cap the cap.
    """
    if raw is None:
        return None
    text = raw.strip()
    cap = bounded_cap(cap_s)
    if _HUGE_DELAY.fullmatch(text):
        return cap
    if _DELAY_SECONDS.fullmatch(text):
        return min(float(text), cap)
    # An HTTP-date starts with a day name: "-1", "1e9", "+5", "0x10", "inf" and "nan" are garbage, not dates.
    if not text or len(text) > _MAX_HEADER_CHARS or not text[0].isalpha():
        return None
    try:
        moment = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if moment.tzinfo is None:  # HTTP-dates are GMT (RFC 9110 5.6.7); "-0000" parses as naive
        moment = moment.replace(tzinfo=UTC)
    try:
        seconds = (moment - now).total_seconds()
    except OverflowError:
        return cap
    return min(max(0.0, seconds), cap)


def backoff_at(
    now: datetime, attempts: int, base_s: float, retry_after: float | None = None, cap_s: float = 3600.0
) -> datetime:
    """``base * 2^(attempts-1)`` seconds from now, never sooner than ``retry_after``, never later than ``cap_s``.

    Total for any input: a non-finite or negative ``base_s`` or ``retry_after`` is ignored, ``cap_s`` is bounded
    by ``bounded_cap``, and the exponent stops growing long before a float would overflow.
    """
    cap = bounded_cap(cap_s)
    base = base_s if math.isfinite(base_s) and base_s > 0 else 0.0
    delay = min(cap, base * 2.0 ** min(max(0, attempts - 1), 64))
    if retry_after is not None and math.isfinite(retry_after) and retry_after > 0:
        delay = min(cap, max(delay, retry_after))
    return now + timedelta(seconds=delay)
