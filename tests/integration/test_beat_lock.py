"""The lock that keeps one Celery beat (``strokewatch beat``), on the real PostgreSQL and as two real beats."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psycopg
import redis

from integration.adapters.db.lock import FileLock, PostgresLock, lock_key, singleton_lock
from integration.entrypoints.beat import CHECK_S, LOST_LOCK
from tests.integration.test_store_postgres import pg_url  # noqa: F401  (the throw-away PostgreSQL database)


def _psycopg(url: str) -> str:
    return url.replace("postgresql+psycopg://", "postgresql://")


def _database(url: str) -> str:
    return url.rsplit("/", 1)[1]


#: The sessions holding the advisory lock ``key`` in one database (pg_locks lists every database's).
_HOLDERS = ("SELECT l.pid FROM pg_locks l JOIN pg_database d ON d.oid = l.database WHERE d.datname = %s AND "
            "l.locktype = 'advisory' AND l.granted AND ((l.classid::bigint << 32) | l.objid::bigint) = %s")


def test_one_holder_at_a_time_and_the_lock_ends_with_its_connection(pg_url: str) -> None:  # noqa: F811
    first, second = PostgresLock(pg_url, "beat"), PostgresLock(pg_url, "beat")
    other = PostgresLock(pg_url, "something-else")
    try:
        assert not first.held()
        assert first.try_acquire() and first.held()
        assert not second.try_acquire() and not second.held()
        assert other.try_acquire(), "another name is another lock"
        first.release()
        assert second.try_acquire() and second.held()

        # The server ends the holder's session (a lost node, a restarted database): the holder learns it.
        with psycopg.connect(_psycopg(pg_url), autocommit=True) as admin:
            pids = [r[0] for r in admin.execute(_HOLDERS, (_database(pg_url), lock_key("beat")))]
            assert len(pids) == 1
            admin.execute("SELECT pg_terminate_backend(%s, 10000)", (pids[0],))  # waits until it is gone
        assert not second.held()
        assert first.try_acquire(), "the lock is free once its holder's connection is gone"
    finally:
        for lock in (first, second, other):
            lock.release()


def test_sqlite_databases_lock_a_file(tmp_path: Path) -> None:
    lock = singleton_lock(f"sqlite:///{tmp_path / 'x.db'}", "beat", tmp_path)
    again = singleton_lock(f"sqlite:///{tmp_path / 'x.db'}", "beat", tmp_path)
    assert isinstance(lock, FileLock) and lock.try_acquire() and lock.held()
    assert not again.try_acquire()
    lock.release()
    assert again.try_acquire()
    again.release()


def _beat(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        return subprocess.Popen([sys.executable, "-m", "integration.entrypoints.cli", "beat", "--loglevel", "INFO"],
                                env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def _wait_for(path: Path, text: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and text in path.read_text(errors="replace"):
            return
        time.sleep(0.2)
    raise AssertionError(f"{text!r} not in {path} after {timeout} s:\n{path.read_text(errors='replace')[-3000:]}")


def test_of_two_beats_one_schedules_and_the_other_takes_over_when_it_dies(
    pg_url: str, tmp_path: Path  # noqa: F811
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STROKEWATCH_")}
    env.update({"STROKEWATCH_SANDBOX": "true", "STROKEWATCH_DATABASE_URL": pg_url,
                "STROKEWATCH_BROKER_URL": "redis://127.0.0.1:6379/10", "STROKEWATCH_DATA_DIR": str(tmp_path / "d")})
    (tmp_path / "d").mkdir()
    logs = [tmp_path / "beat1.log", tmp_path / "beat2.log"]
    first = _beat(env, logs[0])
    second: subprocess.Popen[bytes] | None = None
    try:
        _wait_for(logs[0], "beat lock acquired", 60)
        second = _beat(env, logs[1])
        _wait_for(logs[1], "another beat holds the lock; waiting", 60)
        assert "beat lock acquired" not in logs[1].read_text()
        os.killpg(first.pid, signal.SIGKILL)  # the holder dies without a word: its connection ends with it
        first.wait(10)
        _wait_for(logs[1], "beat lock acquired", 30)
        _wait_for(logs[1], "beat: Starting", 30)

        # The server ends the new holder's session: it can no longer vouch for its lock, so it stops scheduling.
        with psycopg.connect(_psycopg(pg_url), autocommit=True) as admin:
            (pid,) = [r[0] for r in admin.execute(_HOLDERS, (_database(pg_url), lock_key("beat")))]
            admin.execute("SELECT pg_terminate_backend(%s, 10000)", (pid,))
        assert second.wait(CHECK_S + 20) == LOST_LOCK
        assert "the beat lock is lost" in logs[1].read_text()
    finally:
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(20)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(10)
        redis.Redis.from_url(env["STROKEWATCH_BROKER_URL"]).flushdb()  # the periodic tasks nobody consumed
