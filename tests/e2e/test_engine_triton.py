"""The engine flow with Triton as the runtime: real worker, real Orthanc/FHIR sandbox, real tritonserver.

Triton is down when the studies arrive: assessments are deferred as `model_unavailable` (recorded), nothing
is lost, and once Triton is back every patient is scored exactly once.
"""

from __future__ import annotations

import time
from typing import Any

import pytest

from sandbox.cohort import load_cohort
from tests.e2e.conftest import MRN_SYSTEM, risk_assessments, wait_for

N_PATIENTS = 2


@pytest.mark.peers
@pytest.mark.slow
@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_triton_outage_defers_then_scores_each_patient_once(
    protocol: str, start_worker: Any, store: Any, fresh_fhir_peer: Any, fresh_orthanc_peer: Any,
    triton_peer_factory: Any,
) -> None:
    triton = triton_peer_factory()
    url = triton.http_url if protocol == "http" else triton.grpc_url
    triton.stop()  # the configured Triton is down when the studies arrive

    load_cohort(N_PATIENTS, seed=41, dicomweb_url=fresh_orthanc_peer.dicomweb_url,
                fhir_base_url=fresh_fhir_peer.base_url, identifier_system=MRN_SYSTEM)
    worker = start_worker(STROKEWATCH_TRITON_URL=url, STROKEWATCH_TRITON_PROTOCOL=protocol,
                          STROKEWATCH_TRITON_TIMEOUT_S="5")
    wait_for(lambda: store.counts()["open_failures"].get("model_unavailable", 0) >= 1, 180,
             "a recorded model_unavailable outcome", worker)
    assert risk_assessments(fresh_fhir_peer.base_url) == []
    assert store.counts()["studies"].get("ready", 0) == N_PATIENTS  # ingested, waiting for the model

    triton.start()
    wait_for(lambda: len(risk_assessments(fresh_fhir_peer.base_url)) >= N_PATIENTS, 240,
             "one RiskAssessment per patient once Triton is back", worker)
    time.sleep(5)  # more sweep cycles: nothing further may be written
    ras = risk_assessments(fresh_fhir_peer.base_url)
    assert len(ras) == N_PATIENTS
    assert len({ra["subject"]["reference"] for ra in ras}) == N_PATIENTS
    for ra in ras:
        assert f"via triton-{protocol}" in ra["note"][0]["text"]
    # a publish goes on after its RiskAssessment (the alert Flag, the SR and heat-map series in the PACS)
    wait_for(lambda: store.counts()["assessments"] == {"published": N_PATIENTS}, 60, "every publish done", worker)
