"""Connectivity and configuration checks: `strokewatch doctor` and the API's readiness probe.

The checks are the adapters' own ``Probe``s, built by the composition root: each talks to its peer with
the client, credentials and timeouts the engine uses, and says exactly what is wrong and which
``STROKEWATCH_*`` variable to change. This module only runs them (in parallel, time-boxed) and adds what
the settings alone say. Never prints secrets or response bodies (which may hold PHI).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from contextlib import AbstractContextManager

from pydantic import ValidationError

from integration.config import Settings
from integration.domain.checks import CheckResult, env_name, short_error
from integration.ports import Probe
from integration.services.doctor.stated import check_settings, pacs_time_zone, patient_identifier_system

log = logging.getLogger(__name__)

#: Opens the probes for these settings (``bootstrap.open_probes``) and closes what it built on exit.
OpenProbes = Callable[[Settings], AbstractContextManager[Sequence[Probe]]]

#: What the settings say about a peer, reported after that peer's results when it answered (doctor only).
_STATED: dict[str, Callable[[Settings], CheckResult]] = {"pacs": pacs_time_zone, "ehr": patient_identifier_system}
_SETTINGS_HINT = "fix the STROKEWATCH_* variable named above (or the file named by STROKEWATCH_CONFIG)"


def run_checks(settings: Settings | None, open_probes: OpenProbes, *, timeout_s: float = 10.0) -> list[CheckResult]:
    """Everything `strokewatch doctor` reports, in a stable order. ``settings=None`` reads the environment.

    ``timeout_s`` time-boxes the run (four times it in all); each peer's requests keep their own timeouts.
    """
    if settings is None:
        try:
            settings = Settings()
        except (ValidationError, ValueError) as err:
            return [CheckResult("settings", False, _validation_message(err), _SETTINGS_HINT)]
    results = [check_settings(settings)]
    try:
        with open_probes(settings) as probes:
            answers = _run_parallel(probes, quick=False, deadline_s=timeout_s * 4)
    except Exception as exc:  # e.g. STROKEWATCH_DATA_DIR cannot be created: say so instead of crashing
        log.warning("cannot build the probes", exc_info=exc)
        return [*results, CheckResult("adapters", False, f"cannot build them: {short_error(exc)}", _SETTINGS_HINT)]
    for probe, found in zip(probes, answers, strict=True):
        results += found
        stated = _STATED.get(probe.name)
        if stated is not None and found and found[0].ok:
            results.append(stated(settings))
    return results


def readiness(probes: Sequence[Probe], *, timeout_s: float = 3.0) -> list[CheckResult]:
    """The readiness probe: one result per probe (database, broker, PACS, EHR, model), concurrently, time-boxed."""
    return [found[0] for found in _run_parallel(probes, quick=True, deadline_s=timeout_s * 2) if found]


def _run_parallel(probes: Sequence[Probe], *, quick: bool, deadline_s: float) -> list[list[CheckResult]]:
    """Each probe's results, in order. A probe that crashes or is still running at the deadline gets a failed
    result of its own; the others are unaffected. Probes run in daemon threads, so one stuck on a hung peer
    never keeps the process alive."""
    end = time.monotonic() + deadline_s
    futures = [_start(probe, quick) for probe in probes]
    out: list[list[CheckResult]] = []
    for probe, future in zip(probes, futures, strict=True):
        try:
            out.append(future.result(timeout=max(0.0, end - time.monotonic())))
        except FutureTimeout:
            out.append([CheckResult(probe.name, False, f"no answer within {deadline_s:.0f} s")])
        except Exception as exc:  # a probe must never take the others down
            log.warning("check %s crashed", probe.name, exc_info=exc)
            out.append([CheckResult(probe.name, False, f"check crashed: {exc!r}")])
    return out


def _start(probe: Probe, quick: bool) -> Future[list[CheckResult]]:
    future: Future[list[CheckResult]] = Future()

    def run() -> None:
        try:
            future.set_result(probe.probe(quick=quick))
        except BaseException as exc:  # handed to the waiting caller, which reports it
            future.set_exception(exc)

    threading.Thread(target=run, name=f"doctor-{probe.name}", daemon=True).start()
    return future


def _validation_message(err: Exception) -> str:
    if isinstance(err, ValidationError):
        parts = []
        for e in err.errors():
            loc = "__".join(str(p) for p in e["loc"] if p)
            var = env_name(loc) if loc else "settings"
            parts.append(f"{var}: {e['msg']}")
        return "invalid settings: " + "; ".join(parts)
    return f"invalid settings: {err}"


__all__ = ["CheckResult", "OpenProbes", "env_name", "readiness", "run_checks"]
