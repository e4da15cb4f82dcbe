"""Database timeouts come from ``db.*`` settings: on the real PostgreSQL a statement past ``statement_timeout_s`` is
cancelled by the server and a server that never answers fails the connect after ``connect_timeout_s``; SQLite waits
``sqlite_busy_timeout_s`` for a lock."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from sqlalchemy import text
from sqlalchemy.exc import OperationalError

from integration.adapters.db.session import make_engine
from integration.bootstrap import build_store
from integration.config import Settings

pytestmark = pytest.mark.peers

ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"
PG_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"


@pytest.fixture(scope="module", autouse=True)
def postgres_is_up() -> None:
    try:
        psycopg.connect(ADMIN, connect_timeout=5).close()
    except psycopg.OperationalError as err:  # .ci/run makes sure PostgreSQL runs: this is a real failure
        pytest.fail(f"PostgreSQL at {ADMIN} is not reachable: {err}")


def settings(tmp_path: Path, url: str | None, **db: float) -> Settings:
    return Settings(sandbox=True, data_dir=tmp_path / "data", database_url=url, db=db)


def test_the_default_statement_timeout_is_set_on_every_connection(tmp_path: Path) -> None:
    store = build_store(settings(tmp_path, PG_URL))
    try:
        with store.engine.connect() as conn:
            assert conn.execute(text("SHOW statement_timeout")).scalar() == "1min"
            params = conn.connection.dbapi_connection.info.get_parameters()  # type: ignore[union-attr]
            assert params["connect_timeout"] == "10"
    finally:
        store.engine.dispose()


def test_a_statement_past_the_configured_timeout_is_cancelled(tmp_path: Path) -> None:
    store = build_store(settings(tmp_path, PG_URL, statement_timeout_s=0.5, connect_timeout_s=3))
    try:
        with store.engine.connect() as conn:
            assert conn.execute(text("SHOW statement_timeout")).scalar() == "500ms"
            assert conn.execute(text("SELECT 1 FROM pg_sleep(0.05)")).scalar() == 1  # within it: answered
            with pytest.raises(OperationalError) as err:
                conn.execute(text("SELECT pg_sleep(30)"))
            assert "statement timeout" in str(err.value.orig)
            conn.rollback()
            assert conn.execute(text("SELECT 1")).scalar() == 1  # the connection is still usable
    finally:
        store.engine.dispose()


def test_options_in_the_url_are_kept_beside_the_statement_timeout() -> None:
    engine = make_engine(f"{PG_URL}?options=-c%20lock_timeout%3D1234", statement_timeout_s=2)
    try:
        with engine.connect() as conn:
            assert conn.execute(text("SHOW lock_timeout")).scalar() == "1234ms"
            assert conn.execute(text("SHOW statement_timeout")).scalar() == "2s"
    finally:
        engine.dispose()


def test_zero_turns_the_statement_timeout_off(tmp_path: Path) -> None:
    store = build_store(settings(tmp_path, PG_URL, statement_timeout_s=0))
    try:
        with store.engine.connect() as conn:
            assert conn.execute(text("SHOW statement_timeout")).scalar() == "0"
    finally:
        store.engine.dispose()


@pytest.fixture()
def silent_server() -> Iterator[int]:
    """A port that accepts TCP connections (the kernel does, from the backlog) and never says a word."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        yield listener.getsockname()[1]


@pytest.mark.timeout(120)  # without a connect timeout this would wait for ever
def test_a_server_that_never_answers_fails_the_connect_after_the_timeout(tmp_path: Path, silent_server: int) -> None:
    url = f"postgresql+psycopg://postgres@127.0.0.1:{silent_server}/postgres"
    store = build_store(settings(tmp_path, url, connect_timeout_s=2))
    try:
        with pytest.raises(OperationalError) as err, store.engine.connect():
            pass
        assert "timeout" in str(err.value.orig).lower()
    finally:
        store.engine.dispose()


def test_sqlite_waits_the_configured_busy_timeout(tmp_path: Path) -> None:
    store = build_store(settings(tmp_path, None, sqlite_busy_timeout_s=7.5))
    try:
        with store.engine.connect() as conn:
            assert conn.execute(text("PRAGMA busy_timeout")).scalar() == 7500
    finally:
        store.engine.dispose()
