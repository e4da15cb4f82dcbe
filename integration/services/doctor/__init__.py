"""Connectivity and configuration checks: `strokewatch doctor` and the API's readiness probe.

Each check talks to the real peer with a short timeout and returns a ``CheckResult`` saying exactly what
is wrong and which ``STROKEWATCH_*`` variable to change. This is diagnostics, so it speaks HTTP (httpx),
SQL and AMQP directly and reports status codes that the engine's adapters would fold into outcomes.
Never prints secrets or response bodies (which may hold PHI); only URLs, status codes and counts.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

from pydantic import ValidationError
from sqlalchemy import Engine

from integration.config import Settings
from integration.services.doctor.ehr import check_ehr
from integration.services.doctor.local import check_broker, check_database, check_model, check_settings
from integration.services.doctor.pacs import check_pacs
from integration.services.doctor.result import CheckResult, env_name

log = logging.getLogger(__name__)

Check = Callable[[], list[CheckResult]]


def run_checks(settings: Settings | None = None, *, timeout_s: float = 10.0) -> list[CheckResult]:
    """Everything `strokewatch doctor` reports, in a stable order. ``settings=None`` reads the environment."""
    if settings is None:
        try:
            settings = Settings()
        except (ValidationError, ValueError) as err:
            return [CheckResult("settings", False, _validation_message(err), _SETTINGS_HINT)]
    checks: list[Check] = [
        lambda: [check_settings(settings)],
        lambda: [check_database(settings.db_url, timeout_s=timeout_s)],
        lambda: [check_broker(settings, timeout_s=timeout_s)],
        lambda: check_pacs(settings, timeout_s=timeout_s),
        lambda: check_ehr(settings, timeout_s=timeout_s),
        lambda: check_model(settings),
    ]
    return _run_parallel(checks, deadline_s=timeout_s * 4, names=_NAMES)


def readiness(
    settings: Settings,
    *,
    db_engine: Engine | None = None,
    model: Callable[[], Any] | None = None,
    timeout_s: float = 3.0,
) -> list[CheckResult]:
    """The readiness probe: DB, broker, PACS, EHR, model; one result each, concurrently, each time-boxed."""
    checks: list[Check] = [
        lambda: [check_database(settings.db_url, timeout_s=timeout_s, engine=db_engine, migrations=False)],
        lambda: [check_broker(settings, timeout_s=timeout_s)],
        lambda: check_pacs(settings, timeout_s=timeout_s, quick=True),
        lambda: check_ehr(settings, timeout_s=timeout_s, quick=True),
        lambda: check_model(settings, model=model)[:1],
    ]
    return _run_parallel(checks, deadline_s=timeout_s * 2, names=("database", "broker", "pacs", "ehr", "model"))


_NAMES = ("settings", "database", "broker", "pacs", "ehr", "model")
_SETTINGS_HINT = "fix the STROKEWATCH_* variable named above (or the file named by STROKEWATCH_CONFIG)"


def _run_parallel(checks: Sequence[Check], *, deadline_s: float, names: Sequence[str]) -> list[CheckResult]:
    out: list[CheckResult] = []
    end = time.monotonic() + deadline_s
    pool = ThreadPoolExecutor(max_workers=len(checks), thread_name_prefix="doctor")
    try:
        futures = [pool.submit(c) for c in checks]
        for name, fut in zip(names, futures, strict=True):
            try:
                out.extend(fut.result(timeout=max(0.0, end - time.monotonic())))
            except FutureTimeout:
                out.append(CheckResult(name, False, f"no answer within {deadline_s:.0f} s"))
            except Exception as exc:  # a check must never take the others down
                log.warning("check %s crashed", name, exc_info=True)
                out.append(CheckResult(name, False, f"check crashed: {exc!r}"))
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
    return out


def _validation_message(err: Exception) -> str:
    if isinstance(err, ValidationError):
        parts = []
        for e in err.errors():
            loc = "__".join(str(p) for p in e["loc"] if p)
            var = f"STROKEWATCH_{loc.upper()}" if loc else "settings"
            parts.append(f"{var}: {e['msg']}")
        return "invalid settings: " + "; ".join(parts)
    return f"invalid settings: {err}"


__all__ = [
    "CheckResult",
    "check_broker",
    "check_database",
    "check_ehr",
    "check_model",
    "check_pacs",
    "check_settings",
    "env_name",
    "readiness",
    "run_checks",
]
