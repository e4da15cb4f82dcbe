"""The whole engine as real processes: a Celery worker (+ beat) against the real Orthanc and FHIR sandbox."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from integration.adapters.db.session import make_engine, upgrade
from integration.adapters.db.store import SqlStore

ASSESSMENT_SYSTEM = "urn:strokewatch:risk-assessment:e2e"
MRN_SYSTEM = "urn:oid:1.2.36.146.595.217.0.1"


class Worker:
    """One engine process configured only through STROKEWATCH_* env: by default a `celery worker -B` with the
    engine's tasks; ``argv`` runs another (an API, a beat, a worker on some queues), in its own process group."""

    def __init__(self, env: dict[str, str], log_path: Path, argv: list[str] | None = None) -> None:
        self.env = env
        self.log_path = log_path
        self.argv = argv
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Worker:
        from integration.config import Settings
        from integration.entrypoints.worker import worker_argv

        # Settings() only for log level etc.
        argv = self.argv or [sys.executable, "-m", *worker_argv(Settings(), concurrency=2)]
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen(argv, env={**os.environ, **self.env},
                                         stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        return self

    def kill(self) -> None:
        """SIGKILL the whole process group: the worker dies mid-task, as on a lost node."""
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]


@pytest.fixture()
def engine_env(tmp_path: Path, fresh_orthanc_peer: Any, fresh_fhir_peer: Any) -> dict[str, str]:
    env = {
        "STROKEWATCH_SANDBOX": "true",
        "STROKEWATCH_DATA_DIR": str(tmp_path / "data"),
        "STROKEWATCH_PACS__DICOMWEB_URL": fresh_orthanc_peer.dicomweb_url,
        "STROKEWATCH_PACS__ORTHANC_URL": fresh_orthanc_peer.url,
        "STROKEWATCH_PACS__KIND": "orthanc",
        "STROKEWATCH_PACS__POLL_SECONDS": "1",
        "STROKEWATCH_EHR__BASE_URL": fresh_fhir_peer.base_url,
        "STROKEWATCH_EHR__POLL_SECONDS": "5",
        "STROKEWATCH_EHR__PATIENT_IDENTIFIER_SYSTEM": MRN_SYSTEM,
        "STROKEWATCH_ASSESSMENT_IDENTIFIER_SYSTEM": ASSESSMENT_SYSTEM,
        "STROKEWATCH_RETRY_BACKOFF_S": "1",
        "STROKEWATCH_HELD_RETRY_S": "2",
        "STROKEWATCH_STALE_CLAIM_S": "8",
        "STROKEWATCH_LOG_LEVEL": "INFO",
    }
    (tmp_path / "data").mkdir()
    return env


@pytest.fixture()
def store(engine_env: dict[str, str]) -> SqlStore:
    url = f"sqlite:///{Path(engine_env['STROKEWATCH_DATA_DIR']) / 'strokewatch.db'}"
    upgrade(url)
    return SqlStore(make_engine(url))


@pytest.fixture()
def start_worker(engine_env: dict[str, str], tmp_path: Path) -> Iterator[Callable[..., Worker]]:
    workers: list[Worker] = []

    def start(**extra_env: str) -> Worker:
        w = Worker({**engine_env, **extra_env}, tmp_path / f"worker{len(workers)}.log").start()
        workers.append(w)
        return w

    yield start
    for w in workers:
        w.stop()


def risk_assessments(fhir_base_url: str) -> list[dict[str, Any]]:
    """Every RiskAssessment with the e2e identifier system, following `next` links."""
    out: list[dict[str, Any]] = []
    url: str | None = f"{fhir_base_url}/RiskAssessment?identifier={ASSESSMENT_SYSTEM}|&_count=100"
    with httpx.Client(timeout=30) as client:
        while url:
            bundle = client.get(url).raise_for_status().json()
            out.extend(e["resource"] for e in bundle.get("entry", []))
            url = next((link["url"] for link in bundle.get("link", []) if link["relation"] == "next"), None)
    return [r for r in out if any(i.get("system") == ASSESSMENT_SYSTEM for i in r.get("identifier", []))]


def wait_for(predicate: Callable[[], bool], timeout: float, what: str, worker: Worker | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}"
                         + (f"\n--- worker log ---\n{worker.log()}" if worker else ""))
