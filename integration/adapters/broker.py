"""The Celery broker's preflight probe: Redis/RabbitMQ through kombu, or the embedded SQLite broker's database.

kombu's SQLAlchemy transport connects lazily, so the embedded broker is checked through the database it
will use (or, before the first start, whether that file can be created). Never shows the password.
"""

from __future__ import annotations

import os
from datetime import datetime
from pathlib import Path

from sqlalchemy import column, create_engine, delete, false, func, inspect, select, text
from sqlalchemy import table as sa_table

from integration.domain.checks import CheckResult
from integration.domain.redact import redact_text, redact_url

_HINT = "check STROKEWATCH_BROKER_URL (unset: the embedded SQLite broker under STROKEWATCH_DATA_DIR)"


class BrokerProbe:
    """``broker``: a connection to ``url`` (the Celery broker URL; ``sqla+...`` is the embedded broker)."""

    name = "broker"

    def __init__(self, url: str, *, timeout_s: float) -> None:
        self.url = url
        self.timeout_s = timeout_s

    def probe(self, *, quick: bool) -> list[CheckResult]:
        if self.url.startswith("sqla+"):
            return [self._embedded(self.url.removeprefix("sqla+"))]
        from kombu.connection import Connection

        shown = redact_url(self.url)
        try:
            with Connection(self.url, connect_timeout=self.timeout_s) as conn:  # type: ignore[no-untyped-call]
                conn.ensure_connection(max_retries=1, interval_start=0, interval_step=0, timeout=self.timeout_s)
        except Exception as exc:  # kombu re-raises each transport's own errors
            return [CheckResult(self.name, False, f"{shown}: cannot connect: {_first_line(exc)}", _HINT)]
        return [CheckResult(self.name, True, f"{shown}: connected")]

    def _embedded(self, url: str) -> CheckResult:
        shown = redact_url(url)
        path = url.split("///", 1)[-1]
        if url.startswith("sqlite") and path and not Path(path).exists():
            parent = next((p for p in Path(path).parents if p.exists()), None)
            if parent is not None and os.access(parent, os.W_OK):
                return CheckResult(self.name, True, f"embedded broker: will be created at {path} on first start")
            return CheckResult(self.name, False, f"embedded broker: cannot create {path}", _HINT)
        engine = create_engine(
            url, connect_args={"timeout": self.timeout_s} if url.startswith("sqlite") else {}, hide_parameters=True
        )
        try:
            with engine.connect() as conn:
                conn.execute(text("SELECT 1"))
        except Exception as exc:  # any driver's error, shown without the URL's password
            return CheckResult(self.name, False, f"embedded broker ({shown}): {_first_line(exc)}", _HINT)
        finally:
            engine.dispose()
        return CheckResult(self.name, True, f"embedded broker ({shown}): reachable")


def _first_line(exc: BaseException) -> str:
    return redact_text(str(exc).splitlines()[0][:200]) if str(exc) else type(exc).__name__


class EmbeddedBrokerMessages:
    """``ports.BrokerMessages`` on the embedded broker's database (kombu's SQLAlchemy transport).

    The transport marks a message ``visible = false`` when it hands it to a worker and never deletes it; a late
    acknowledgement and a redelivery after a lost worker use the worker's in-memory copy, not the row. So a row
    delivered long before (``before``: longer than any task runs) is dead weight. Its ``timestamp`` is the
    delivery time in this machine's local time (naive), as kombu writes it.
    """

    def __init__(self, url: str, *, table: str = "kombu_message", timeout_s: float = 30.0) -> None:
        url = url.removeprefix("sqla+")
        self.engine = create_engine(
            url, connect_args={"timeout": timeout_s} if url.startswith("sqlite") else {}, hide_parameters=True
        )
        self.messages = sa_table(table, column("id"), column("visible"), column("timestamp"))
        self.table = table

    def close(self) -> None:
        self.engine.dispose()

    def delete_delivered(self, before: datetime, batch_size: int, *, dry_run: bool = False) -> int:
        if not inspect(self.engine).has_table(self.table):
            return 0  # nothing was ever sent
        local = before.astimezone().replace(tzinfo=None)
        delivered = (self.messages.c.visible == false(), self.messages.c.timestamp < local)
        if dry_run:
            with self.engine.connect() as conn:
                return int(conn.scalar(select(func.count()).select_from(self.messages).where(*delivered)) or 0)
        removed = 0
        while True:  # short transactions: the workers poll this table every few milliseconds
            with self.engine.begin() as conn:
                ids = list(conn.scalars(select(self.messages.c.id).where(*delivered).limit(batch_size)))
                if ids:
                    conn.execute(delete(self.messages).where(self.messages.c.id.in_(ids)))
            removed += len(ids)
            if len(ids) < batch_size:
                return removed
