"""The Celery broker's preflight probe: Redis/RabbitMQ through kombu, or the embedded SQLite broker's database.

kombu's SQLAlchemy transport connects lazily, so the embedded broker is checked through the database it
will use (or, before the first start, whether that file can be created). Never shows the password.
"""

from __future__ import annotations

import os
from pathlib import Path

from sqlalchemy import create_engine, text

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
