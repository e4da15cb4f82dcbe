"""Engine/session construction and schema migration (Alembic, driven from code: no alembic.ini needed),
and the database's preflight probe."""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event, exc, make_url, text
from sqlalchemy.orm import Session, sessionmaker

from integration.domain.checks import CheckResult, short_error
from integration.domain.redact import redact_text, redact_url

MIGRATIONS = Path(__file__).resolve().parent / "migrations"


def make_engine(
    url: str,
    *,
    connect_timeout_s: float = 10.0,
    statement_timeout_s: float | None = 60.0,
    sqlite_busy_timeout_s: float = 30.0,
) -> Engine:
    """SQLite gets WAL + a busy timeout so several worker processes can share one file, created private (0600).
    PostgreSQL gets libpq's ``connect_timeout`` and a server-side ``statement_timeout`` (None or 0: none), so a
    dead server or a stuck query fails a task instead of holding its worker (``bootstrap`` passes ``db.*``).

    ``hide_parameters``: the rows hold MRNs, birth dates and vital values, and a driver's error would carry the
    statement's bound parameters into logs and the failures table.
    """
    kwargs: dict[str, Any] = {"future": True, "hide_parameters": True}
    if url.startswith("sqlite"):
        path = make_url(url).database
        if path and path != ":memory:" and not path.startswith("file:"):
            private_sqlite_file(Path(path))
        kwargs["connect_args"] = {"timeout": sqlite_busy_timeout_s, "check_same_thread": False}
    elif make_url(url).get_backend_name() == "postgresql":
        kwargs["connect_args"] = postgres_connect_args(url, connect_timeout_s, statement_timeout_s)
    engine = create_engine(url, **kwargs)
    ping_when_idle(engine)
    if url.startswith("sqlite"):
        busy_ms = max(1, round(sqlite_busy_timeout_s * 1000))

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute(f"PRAGMA busy_timeout={busy_ms:d}")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.close()

    return engine


#: A pooled connection unused for longer than this is pinged before it is handed out (SQLAlchemy's ``pool_pre_ping``
#: pings at every checkout: a round trip per store call, ~5 % of a worker's time in a backlog).
PING_IDLE_S = 5.0


def ping_when_idle(engine: Engine, idle_s: float = PING_IDLE_S, clock: Callable[[], float] = time.monotonic) -> None:
    """Pessimistic disconnect handling for connections that sat in the pool: one returned less than ``idle_s`` ago
    was working then and is handed out as it is; an older one is pinged first, and one that fails the ping
    (the server restarted, a firewall dropped the idle TCP connection) is discarded and replaced by the pool
    (``DisconnectionError``), so the caller never sees it. A server lost within ``idle_s`` of a connection's last
    use fails that one statement, and SQLAlchemy then invalidates the pool's other connections."""

    @event.listens_for(engine, "checkin")
    def _returned(_dbapi_conn: Any, record: Any) -> None:
        if record is not None:
            record.info["returned_at"] = clock()

    @event.listens_for(engine, "checkout")
    def _checkout(dbapi_conn: Any, record: Any, _proxy: Any) -> None:
        returned = record.info.get("returned_at")
        if returned is None or clock() - returned < idle_s:
            return  # new (just connected) or recently working
        try:
            engine.dialect.do_ping(dbapi_conn)
        except Exception as err:
            raise exc.DisconnectionError(f"idle connection failed its ping: {short_error(err)}") from err


def postgres_connect_args(url: str, connect_timeout_s: float, statement_timeout_s: float | None) -> dict[str, Any]:
    """libpq parameters (psycopg and psycopg2 alike): ``connect_timeout`` in whole seconds (libpq's minimum is 2)
    and ``statement_timeout`` in ms through ``options``, after any ``options`` the URL already carries."""
    args: dict[str, Any] = {"connect_timeout": max(2, math.ceil(connect_timeout_s))}
    if statement_timeout_s:
        given = make_url(url).query.get("options")
        given_text = " ".join(given) if isinstance(given, tuple) else (given or "")
        ms = max(1, round(statement_timeout_s * 1000))
        args["options"] = f"{given_text} -c statement_timeout={ms:d}".strip()
    return args


def private_sqlite_file(path: Path) -> None:
    """A SQLite database file that only the engine's user can read: created empty with mode 0600 (in a 0700
    folder when the folder is new) before SQLite opens it, since SQLite gives its -wal/-shm/-journal files the
    database file's mode; an existing database (and those files) others could read is narrowed to 0600."""
    if not path.parent.exists():
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))  # SQLite takes an empty file as new
    except FileExistsError:
        for part in (path, *(path.with_name(path.name + suffix) for suffix in ("-wal", "-shm", "-journal"))):
            try:
                info = part.stat()
                if info.st_mode & 0o077 and info.st_uid == os.getuid():
                    part.chmod(0o600)
            except FileNotFoundError:
                continue


def session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


def alembic_config(url: str) -> Any:
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def upgrade(url: str, revision: str = "head") -> None:
    """Bring the schema to ``revision`` (idempotent)."""
    from alembic import command

    command.upgrade(alembic_config(url), revision)


def current_revision(url: str) -> str | None:
    from alembic.runtime.migration import MigrationContext

    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()
    finally:
        engine.dispose()


def head_revision() -> str | None:
    """The newest revision of the migration scripts (what `strokewatch db upgrade` brings a schema to)."""
    from alembic.script import ScriptDirectory

    head = ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()
    return str(head) if head is not None else None


class DatabaseProbe:
    """``database`` (`strokewatch doctor`, readiness) through the SQLAlchemy engine the store uses: SELECT 1,
    then (doctor) the schema's Alembic revision against the migrations' head. Never shows the password."""

    name = "database"

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def probe(self, *, quick: bool) -> list[CheckResult]:
        url = self.engine.url
        shown = redact_url(url.render_as_string(hide_password=False))
        upgrade_hint = "run `strokewatch db upgrade` (or `strokewatch run`, which migrates first)"
        path = url.database or ""
        if url.get_backend_name() == "sqlite" and path and path != ":memory:" and not Path(path).exists():
            return [CheckResult(self.name, False, f"no database yet at {path}", upgrade_hint)]  # connecting creates it
        try:
            with self.engine.connect() as conn:
                conn.execute(text("SELECT 1"))
                current = None if quick else _revision(conn)
            head = None if quick else head_revision()
        except Exception as exc:  # any driver's error: the message, never the URL's password
            hint = "check STROKEWATCH_DATABASE_URL (unset: SQLite under STROKEWATCH_DATA_DIR) and that the server is up"
            return [CheckResult(self.name, False, f"{shown}: cannot connect: {redact_text(short_error(exc))}", hint)]
        if quick:
            return [CheckResult(self.name, True, f"{self.engine.dialect.name}: SELECT 1 answered")]
        if current != head:
            detail = f"{shown}: schema at revision {current or '(none)'}, migrations head is {head}"
            return [CheckResult(self.name, False, detail, upgrade_hint)]
        return [CheckResult(self.name, True, f"{shown}: reachable, schema at head ({head})")]


def _revision(conn: Connection) -> str | None:
    from alembic.runtime.migration import MigrationContext

    rev = MigrationContext.configure(conn).get_current_revision()
    return str(rev) if rev is not None else None
