"""DIMSE retrieval end to end: the engine with `pacs.kind=dimse` finds a study stored in Orthanc by C-FIND polling over
Orthanc's DICOM port, retrieves its series by C-GET (a worker) or C-MOVE to its own C-STORE SCP (`strokewatch run`),
and writes the RiskAssessment to the FHIR sandbox. No DICOMweb URL is configured at all."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from sandbox import free_port
from sandbox.cohort import load_cohort
from tests.e2e.conftest import MRN_SYSTEM, risk_assessments, wait_for


@pytest.mark.peers
@pytest.mark.slow
def test_a_study_found_by_c_find_and_retrieved_by_c_get_ends_as_a_risk_assessment(
    start_worker: Any, store: Any, fresh_fhir_peer: Any, fresh_orthanc_peer: Any
) -> None:
    [loaded] = load_cohort(1, seed=43, dicomweb_url=fresh_orthanc_peer.dicomweb_url,
                           fhir_base_url=fresh_fhir_peer.base_url, identifier_system=MRN_SYSTEM,
                           window_end=datetime.now(UTC).replace(microsecond=0))
    worker = start_worker(
        STROKEWATCH_PACS__KIND="dimse",
        STROKEWATCH_PACS__DICOMWEB_URL="",  # unset: everything goes over DIMSE
        STROKEWATCH_PACS__ORTHANC_URL="",
        STROKEWATCH_PACS__DIMSE__HOST="127.0.0.1",
        STROKEWATCH_PACS__DIMSE__PORT=str(fresh_orthanc_peer.dicom_port),
        STROKEWATCH_PACS__DIMSE__CALLED_AET=fresh_orthanc_peer.aet,
        STROKEWATCH_PACS__DIMSE__CALLING_AET="SW-E2E",
    )
    wait_for(lambda: len(risk_assessments(fresh_fhir_peer.base_url)) >= 1, 240, "a RiskAssessment", worker)
    [ra] = risk_assessments(fresh_fhir_peer.base_url)
    assert ra["basis"][0]["identifier"]["value"].removeprefix("urn:oid:") == loaded.study_uid
    assert 0.0 <= ra["prediction"][0]["probabilityDecimal"] <= 1.0
    row = store.get_study(loaded.study_uid)
    assert row is not None and row.status.value == "ready" and row.volume_path
    said = worker.log_path.read_text(errors="replace")
    assert "retrieved by C-GET from PACS ORTHANC@127.0.0.1" in said, said[-3000:]
    assert "SW-TEST" not in said and loaded.mrn not in said  # no PatientID in the worker's log


@pytest.mark.peers
@pytest.mark.slow
def test_c_move_to_the_engines_own_scp_ends_as_a_risk_assessment(
    engine_env: dict[str, str], store: Any, fresh_fhir_peer: Any, fresh_orthanc_peer: Any, tmp_path: Path
) -> None:
    """`strokewatch run` with the SCP enabled and `pacs.dimse.retrieve=c-move`: Orthanc moves the series to the engine's
    own C-STORE SCP, the worker reads it from the spool; the study stays one study (found by C-FIND, not re-registered
    as pushed)."""
    scp_port = free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("STROKEWATCH_")},
        **engine_env,
        "STROKEWATCH_API_PORT": str(free_port()),
        "STROKEWATCH_PACS__KIND": "dimse",
        "STROKEWATCH_PACS__DICOMWEB_URL": "",
        "STROKEWATCH_PACS__ORTHANC_URL": "",
        "STROKEWATCH_PACS__DIMSE__HOST": "127.0.0.1",
        "STROKEWATCH_PACS__DIMSE__PORT": str(fresh_orthanc_peer.dicom_port),
        "STROKEWATCH_PACS__DIMSE__CALLED_AET": fresh_orthanc_peer.aet,
        "STROKEWATCH_PACS__DIMSE__RETRIEVE": "c-move",
        "STROKEWATCH_SCP__ENABLED": "true",
        "STROKEWATCH_SCP__AE_TITLE": "SW-E2E-MOVE",
        "STROKEWATCH_SCP__PORT": str(scp_port),
        "STROKEWATCH_SCP__ALLOWED_CALLING_AETS": f'["{fresh_orthanc_peer.aet}"]',
    }
    name = f"sw-e2e-{scp_port}"
    with httpx.Client(timeout=30) as http:
        http.put(f"{fresh_orthanc_peer.url}/modalities/{name}",
                 json={"AET": "SW-E2E-MOVE", "Host": "127.0.0.1", "Port": scp_port}).raise_for_status()
    [loaded] = load_cohort(1, seed=44, dicomweb_url=fresh_orthanc_peer.dicomweb_url,
                           fhir_base_url=fresh_fhir_peer.base_url, identifier_system=MRN_SYSTEM,
                           window_end=datetime.now(UTC).replace(microsecond=0))
    log = tmp_path / "run.log"
    with log.open("wb") as out:
        run = subprocess.Popen([sys.executable, "-m", "integration.entrypoints.cli", "run"], env=env, stdout=out,
                               stderr=subprocess.STDOUT, start_new_session=True)
    said: Callable[[], str] = lambda: log.read_text(errors="replace")  # noqa: E731
    try:
        wait_for(lambda: len(risk_assessments(fresh_fhir_peer.base_url)) >= 1, 240,
                 f"a RiskAssessment\n{said()[-3000:]}")
        [ra] = risk_assessments(fresh_fhir_peer.base_url)
        assert ra["basis"][0]["identifier"]["value"].removeprefix("urn:oid:") == loaded.study_uid
        row = store.get_study(loaded.study_uid)
        assert row is not None and row.status.value == "ready" and row.source != "scp"
        logs = said() + "".join(p.read_text(errors="replace") for p in (Path(engine_env["STROKEWATCH_DATA_DIR"])
                                                                        / "logs").glob("*.log"))
        assert "moved by C-MOVE from PACS ORTHANC@127.0.0.1" in logs and "to SW-E2E-MOVE" in logs, logs[-3000:]
        assert loaded.mrn not in logs
        run.send_signal(signal.SIGTERM)
        assert run.wait(60) == 0
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
        httpx.delete(f"{fresh_orthanc_peer.url}/modalities/{name}", timeout=30)
