"""When to try again: exponential backoff that honours a peer's Retry-After."""

from __future__ import annotations

from datetime import datetime, timedelta


def backoff_at(now: datetime, attempts: int, base_s: float, retry_after: float | None = None,
               cap_s: float = 3600.0) -> datetime:
    """base * 2^(attempts-1) seconds from now, capped, never sooner than ``retry_after``."""
    delay = min(cap_s, base_s * (2 ** max(0, attempts - 1)))
    if retry_after is not None:
        delay = max(delay, retry_after)
    return now + timedelta(seconds=delay)
