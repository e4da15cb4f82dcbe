"""A bounded memory of what was seen recently (JWT ``jti``s, webhook signatures), each entry forgotten when the
window in which it could be replayed has passed."""

from __future__ import annotations

import heapq
import threading
import time
from collections.abc import Callable


class ReplayCacheFull(Exception):
    """More unexpired entries than the cache holds: refuse rather than forget one that could then be replayed."""


class ReplayCache:
    def __init__(self, max_entries: int, clock: Callable[[], float] = time.time) -> None:
        self.max_entries = max_entries
        self._clock = clock
        self._expiry: dict[str, float] = {}
        self._heap: list[tuple[float, str]] = []
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._expiry)

    def first_use(self, key: str, expires_at: float) -> bool:
        """Record ``key`` until ``expires_at`` (epoch seconds); False if it was already recorded and unexpired."""
        with self._lock:
            now = self._clock()
            self._forget_expired(now)
            if key in self._expiry:
                return False
            if len(self._expiry) >= self.max_entries:
                raise ReplayCacheFull(f"more than {self.max_entries} unexpired entries")
            self._expiry[key] = expires_at
            heapq.heappush(self._heap, (expires_at, key))
            return True

    def _forget_expired(self, now: float) -> None:
        while self._heap and self._heap[0][0] <= now:
            expires_at, key = heapq.heappop(self._heap)
            if self._expiry.get(key) == expires_at:
                del self._expiry[key]
