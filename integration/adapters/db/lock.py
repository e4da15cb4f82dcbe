"""One holder at a time across processes and hosts: the lock that keeps a single Celery beat.

PostgreSQL: a session-level advisory lock on a connection of its own, so it is released by the server the moment
the holder's connection ends (the process killed, the node lost); ``held()`` asks the server, so a holder whose
connection dropped learns it lost the lock. SQLite (one host): ``flock`` on a file beside the database, released by
the kernel when the process dies.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
from pathlib import Path
from typing import IO, Any

from sqlalchemy import Engine, create_engine, make_url, text


def lock_key(name: str) -> int:
    """A stable signed 64-bit advisory-lock key for ``name``."""
    return int.from_bytes(hashlib.sha256(f"strokewatch:{name}".encode()).digest()[:8], "big", signed=True)


class PostgresLock:
    def __init__(self, url: str, name: str, *, connect_timeout_s: float = 10.0) -> None:
        self.key = lock_key(name)
        self.engine: Engine = create_engine(url, hide_parameters=True,
                                            connect_args={"connect_timeout": max(1, round(connect_timeout_s))})
        self.connection: Any = None

    def try_acquire(self) -> bool:
        if self.connection is None:
            self.connection = self.engine.connect()
        try:
            got = bool(self.connection.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": self.key}).scalar())
        except Exception:
            self.release_connection()
            raise
        self.connection.commit()
        return got

    def release_connection(self) -> None:
        if self.connection is not None:
            with contextlib.suppress(Exception):  # a dead connection is closed already
                self.connection.close()  # the session's advisory locks end with it
            self.connection = None

    def held(self) -> bool:
        if self.connection is None:
            return False
        try:
            row = self.connection.execute(
                text("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid() "
                     "AND granted AND ((classid::bigint << 32) | objid::bigint) = (:k)::bigint"), {"k": self.key}
            ).scalar()
            self.connection.commit()
        except Exception:  # noqa: BLE001 - any failure to ask the server means the lock cannot be vouched for
            return False
        return bool(row)

    def release(self) -> None:
        self.release_connection()
        self.engine.dispose()


class FileLock:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.handle: IO[bytes] | None = None

    def try_acquire(self) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "ab")  # noqa: SIM115 - held open as long as the lock
        os.chmod(self.path, 0o600)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            return False
        self.handle = handle
        return True

    def held(self) -> bool:
        return self.handle is not None and not self.handle.closed

    def release(self) -> None:
        if self.handle is not None:
            self.handle.close()
            self.handle = None


def singleton_lock(url: str, name: str, lock_dir: Path, *, connect_timeout_s: float = 10.0) -> PostgresLock | FileLock:
    """The lock for the database at ``url``: an advisory lock on PostgreSQL, else a file lock in ``lock_dir``."""
    if make_url(url).get_backend_name() == "postgresql":
        return PostgresLock(url, name, connect_timeout_s=connect_timeout_s)
    return FileLock(lock_dir / f"{name}.lock")
