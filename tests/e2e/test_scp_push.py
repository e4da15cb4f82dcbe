"""DICOM push end to end: `strokewatch run` with the SCP enabled; a study sent by C-STORE (never stored in the PACS)
ends as a RiskAssessment in the FHIR server, and an SCP killed with SIGKILL is started again by `run`."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, MRImageStorage, Verification  # type: ignore[attr-defined]

from integration.adapters.db.store import SqlStore
from integration.domain.push import SCP_SOURCE
from sandbox import free_port
from sandbox.cohort import load_cohort
from tests.e2e.conftest import MRN_SYSTEM, risk_assessments, wait_for

SENDER = "E2E_CT"


def children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def scp_child(pid: int) -> int | None:
    for child in children(pid):
        try:
            if b"integration.entrypoints.scp" in Path(f"/proc/{child}/cmdline").read_bytes():
                return child
        except OSError:
            continue
    return None


def push(port: int, files: list[Path]) -> list[int]:
    ae = AE(ae_title=SENDER)
    for sop_class in (Verification, CTImageStorage, MRImageStorage):
        ae.add_requested_context(sop_class, [ExplicitVRLittleEndian])
    assoc = ae.associate("127.0.0.1", port, ae_title="STROKEWATCH")
    assert assoc.is_established, "the SCP refused the association"
    sock = assoc.dul.socket.socket if assoc.dul.socket is not None else None
    if sock is not None:  # as dcmtk with TCP_NODELAY=1: no 40 ms wait per instance
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        return [int(assoc.send_c_store(pydicom.dcmread(f)).Status) for f in files]
    finally:
        assoc.release()


def echo(port: int) -> bool:
    ae = AE(ae_title=SENDER)
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title="STROKEWATCH")
    try:
        return assoc.is_established and int(assoc.send_c_echo().Status) == 0
    finally:
        if assoc.is_established:
            assoc.release()


@pytest.mark.peers
@pytest.mark.slow
def test_a_study_pushed_by_c_store_ends_as_a_risk_assessment(
    engine_env: dict[str, str], store: SqlStore, fresh_fhir_peer: Any, fresh_orthanc_peer: Any, tmp_path: Path
) -> None:
    import synth

    port = free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("STROKEWATCH_")},
        **engine_env,
        "STROKEWATCH_API_PORT": str(free_port()),
        "STROKEWATCH_SCP__ENABLED": "true",
        "STROKEWATCH_SCP__PORT": str(port),
        "STROKEWATCH_SCP__ALLOWED_CALLING_AETS": f'["{SENDER}"]',
        "STROKEWATCH_SCP__QUIET_PERIOD_S": "1",
    }
    window_end = datetime.now(UTC).replace(microsecond=0)
    load_cohort(1, seed=41, dicomweb_url=fresh_orthanc_peer.dicomweb_url, fhir_base_url=fresh_fhir_peer.base_url,
                identifier_system=MRN_SYSTEM, window_end=window_end, studies=False)  # the EHR side only
    patient = next(iter(synth.iter_cohort(1, 41)))
    files = synth.write_dicom(patient, tmp_path / "dicom", window_end=window_end)
    study_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)

    log = tmp_path / "run.log"
    with log.open("wb") as out:
        run = subprocess.Popen([sys.executable, "-m", "integration.entrypoints.cli", "run"], env=env, stdout=out,
                               stderr=subprocess.STDOUT, start_new_session=True)
    said: Callable[[], str] = lambda: " ".join(log.read_text(errors="replace").split())  # noqa: E731
    try:
        wait_for(lambda: "StrokeWatch is running" in said(), 90, f"the engine running\n{said()[-3000:]}")
        assert f"DICOM: STROKEWATCH@127.0.0.1:{port}" in said()
        assert push(port, files) == [0] * len(files)
        wait_for(lambda: len(risk_assessments(fresh_fhir_peer.base_url)) >= 1, 240,
                 f"a RiskAssessment\n{said()[-2000:]}")
        [ra] = risk_assessments(fresh_fhir_peer.base_url)
        assert ra["basis"][0]["identifier"]["value"].removeprefix("urn:oid:") == study_uid
        row = store.get_study(study_uid)
        assert row is not None and row.source == SCP_SOURCE and row.status.value == "ready"
        with httpx.Client(timeout=30) as http:  # the PACS never saw the study: ingest read the spool
            assert http.get(f"{fresh_orthanc_peer.url}/studies").json() == []

        first = scp_child(run.pid)
        assert first is not None
        os.kill(first, signal.SIGKILL)  # `run` starts a dead SCP again
        second = wait_for_value(lambda: (c := scp_child(run.pid)) and c != first and c, 60, "a new SCP")
        wait_for(lambda: echo(port), 60, "the restarted SCP answering C-ECHO")
        assert "the scp exited (code -9); starting it again" in said()
        assert second
        run.send_signal(signal.SIGTERM)
        assert run.wait(60) == 0
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)


def wait_for_value(probe: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = probe()
        if found:
            return found
        time.sleep(0.3)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
