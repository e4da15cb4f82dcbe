"""Celery beat behind a lock (``strokewatch beat``): however many are started (a Deployment's rollout, a node
thought lost that comes back, a second compose project on the same database), one schedules, the others wait.

The lock is the database's (``bootstrap.build_beat_lock``): an advisory lock held by a connection of this process,
so it ends with the process. A holder that can no longer vouch for its lock (the connection dropped: the server may
have handed it to a waiting beat) exits at once, and its supervisor starts it again, to wait its turn. Two beats for
a moment would cost little anyway (every task is idempotent and the sweep's re-sends are leased), but they are not
left running side by side.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path
from typing import Protocol

from integration.config import get_settings

log = logging.getLogger("integration.entrypoints.beat")

#: How often a waiting beat tries the lock, and how often the holder checks it still has it.
RETRY_S = 5.0
CHECK_S = 10.0
#: Exit status of a beat that lost its lock.
LOST_LOCK = 3


class Lock(Protocol):
    def try_acquire(self) -> bool: ...
    def held(self) -> bool: ...
    def release(self) -> None: ...


def _acquire(lock: Lock, stop: threading.Event) -> bool:
    said = False
    while not stop.is_set():
        try:
            if lock.try_acquire():
                return True
            if not said:
                log.info("another beat holds the lock; waiting (trying every %.0f s)", RETRY_S)
                said = True
        except Exception as err:  # noqa: BLE001 - the database not answering yet: try again
            log.warning("cannot reach the database for the beat lock (%s); trying again", type(err).__name__)
        stop.wait(RETRY_S)
    return False


def _watch(lock: Lock, stop: threading.Event) -> None:
    while not stop.wait(CHECK_S):
        if not lock.held():
            log.error("the beat lock is lost (its database connection ended); exiting so that one beat runs")
            os._exit(LOST_LOCK)  # noqa: SLF001 - beat's own threads must not go on scheduling


def main(schedule: Path | None = None, loglevel: str = "INFO") -> int:
    from integration.bootstrap import build_beat_lock
    from integration.entrypoints.worker import app

    settings = get_settings()
    lock = build_beat_lock(settings)
    stop = threading.Event()
    if not _acquire(lock, stop):
        return 0
    log.info("beat lock acquired at %s", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    threading.Thread(target=_watch, args=(lock, stop), name="beat-lock", daemon=True).start()
    try:
        kwargs: dict[str, str] = {"loglevel": loglevel}
        if schedule is not None:
            kwargs["schedule"] = str(schedule)
        app.Beat(**kwargs).run()
    finally:
        stop.set()
        lock.release()
    return 0
