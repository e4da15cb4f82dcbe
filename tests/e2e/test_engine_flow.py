"""PACS + EHR in, RiskAssessment out: real Celery workers, real Orthanc, real FHIR server.

Checks the RiskAssessments in the FHIR server: contents, one per patient, none duplicated after a re-run,
a re-sent study, or a worker killed mid-task; for the embedded broker and for Redis.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
import redis

from inference import contract as C
from sandbox.cohort import load_cohort, stow
from tests.e2e.conftest import MRN_SYSTEM, risk_assessments, wait_for

N_PATIENTS = 3


def _check_contents(ras: list[dict[str, Any]], fhir_base_url: str) -> None:
    with httpx.Client(timeout=30) as client:
        for ra in ras:
            assert ra["status"] in ("final", "preliminary")
            pred = ra["prediction"][0]
            assert 0.0 <= pred["probabilityDecimal"] <= 1.0
            assert pred["outcome"]["coding"][0]["code"] == C.OUTCOME_CODE
            assert pred["qualitativeRisk"]["coding"][0]["code"] in ("low", "moderate", "high")
            assert ra["subject"]["reference"].startswith("Patient/")
            patient = client.get(f"{fhir_base_url}/{ra['subject']['reference']}").raise_for_status().json()
            assert any(i.get("system") == MRN_SYSTEM for i in patient.get("identifier", []))
            device = client.get(f"{fhir_base_url}/{ra['performer']['reference']}").raise_for_status().json()
            assert device["version"][0]["value"] == ra["method"]["coding"][0]["code"].rsplit("-", 1)[1]
            basis = [b.get("reference", "") for b in ra["basis"]]
            assert any(b.startswith("Observation/") for b in basis), "vitals used are listed in basis"
            assert ra["basis"][0]["identifier"]["system"] == "urn:dicom:uid"


def _run_until_published(start_worker: Any, store: Any, fhir_peer: Any, orthanc_peer: Any, **worker_env: str):
    loaded = load_cohort(N_PATIENTS, seed=31, dicomweb_url=orthanc_peer.dicomweb_url,
                         fhir_base_url=fhir_peer.base_url, identifier_system=MRN_SYSTEM,
                         window_end=datetime.now(UTC).replace(microsecond=0))
    worker = start_worker(**worker_env)
    wait_for(lambda: len(risk_assessments(fhir_peer.base_url)) >= N_PATIENTS, 240,
             "one RiskAssessment per patient", worker)
    # a publish goes on after its RiskAssessment (the alert Flag, the SR and heat-map series in the PACS)
    wait_for(lambda: store.counts()["assessments"] == {"published": N_PATIENTS}, 120, "every publish done", worker)
    return loaded, worker


@pytest.mark.peers
@pytest.mark.slow
def test_embedded_broker_scores_every_patient_once_and_survives_rerun_and_resend(
    start_worker: Any, store: Any, fresh_fhir_peer: Any, fresh_orthanc_peer: Any, tmp_path: Any
) -> None:
    loaded, worker = _run_until_published(start_worker, store, fresh_fhir_peer, fresh_orthanc_peer)
    ras = risk_assessments(fresh_fhir_peer.base_url)
    assert len(ras) == N_PATIENTS
    assert len({ra["subject"]["reference"] for ra in ras}) == N_PATIENTS, "one per patient"
    _check_contents(ras, fresh_fhir_peer.base_url)
    assert {r.study_uid for r in loaded} == {
        ra["basis"][0]["identifier"]["value"].removeprefix("urn:oid:") for ra in ras}

    # Re-send one study (Orthanc fires StableStudy again) and restart the worker: still one each.
    import synth

    patient = next(iter(synth.iter_cohort(1, 31)))
    files = synth.write_dicom(patient, tmp_path / "resend", window_end=datetime.now(UTC))
    stow(fresh_orthanc_peer.dicomweb_url, files)
    worker.stop()
    worker = start_worker()
    wait_for(lambda: store.counts()["studies"].get("processing", 0) == 0, 30, "quiet", worker)
    import time

    time.sleep(6)  # several detect/sweep cycles
    ras_after = risk_assessments(fresh_fhir_peer.base_url)
    assert sorted(r["id"] for r in ras_after) == sorted(r["id"] for r in ras)
    assert store.counts()["assessments"] == {"published": N_PATIENTS}


@pytest.mark.peers
@pytest.mark.slow
def test_worker_killed_mid_task_loses_nothing_and_duplicates_nothing(
    start_worker: Any, store: Any, fresh_fhir_peer: Any, fresh_orthanc_peer: Any
) -> None:
    load_cohort(N_PATIENTS, seed=32, dicomweb_url=fresh_orthanc_peer.dicomweb_url,
                fhir_base_url=fresh_fhir_peer.base_url, identifier_system=MRN_SYSTEM)
    worker = start_worker()
    # Kill as soon as the worker has claimed something (a study being ingested or a patient assessed).
    wait_for(lambda: sum(store.counts()["studies"].values()) > 0, 120, "a detected study", worker)
    worker.kill()
    worker = start_worker()
    wait_for(lambda: len(risk_assessments(fresh_fhir_peer.base_url)) >= N_PATIENTS, 240,
             "one RiskAssessment per patient after the kill", worker)
    import time

    time.sleep(5)
    ras = risk_assessments(fresh_fhir_peer.base_url)
    assert len(ras) == N_PATIENTS
    assert len({ra["subject"]["reference"] for ra in ras}) == N_PATIENTS


@pytest.mark.peers
@pytest.mark.slow
def test_redis_broker_runs_the_same_flow(start_worker: Any, store: Any, fresh_fhir_peer: Any,
                                         fresh_orthanc_peer: Any) -> None:
    url = "redis://127.0.0.1:6379/13"
    try:
        redis.Redis.from_url(url).flushdb()
    except redis.ConnectionError as err:  # the machine's Redis is started by .ci/run; this is a real failure
        pytest.fail(f"Redis at {url} is not reachable: {err}")
    _run_until_published(start_worker, store, fresh_fhir_peer, fresh_orthanc_peer, STROKEWATCH_BROKER_URL=url)
    ras = risk_assessments(fresh_fhir_peer.base_url)
    assert len(ras) == N_PATIENTS
    _check_contents(ras, fresh_fhir_peer.base_url)


@pytest.mark.peers
@pytest.mark.slow
def test_study_of_unknown_patient_is_held_until_the_patient_appears(
    start_worker: Any, store: Any, fresh_fhir_peer: Any, fresh_orthanc_peer: Any
) -> None:
    loaded = load_cohort(1, seed=33, dicomweb_url=fresh_orthanc_peer.dicomweb_url,
                         fhir_base_url=fresh_fhir_peer.base_url, identifier_system=MRN_SYSTEM, patients=False)
    worker = start_worker()
    uid = loaded[0].study_uid
    wait_for(lambda: (s := store.get_study(uid)) is not None and s.status == "held", 120, "study held", worker)
    assert store.get_study(uid).outcome == "unmatched_patient"
    assert risk_assessments(fresh_fhir_peer.base_url) == []
    load_cohort(1, seed=33, dicomweb_url=fresh_orthanc_peer.dicomweb_url, fhir_base_url=fresh_fhir_peer.base_url,
                identifier_system=MRN_SYSTEM, studies=False)
    wait_for(lambda: len(risk_assessments(fresh_fhir_peer.base_url)) == 1, 120, "assessment after match", worker)


@pytest.mark.peers
@pytest.mark.slow
def test_study_from_a_utc_plus_14_site_stored_before_first_start_is_found_and_assessed(
    start_worker: Any, store: Any, fresh_fhir_peer: Any, fresh_orthanc_peer: Any
) -> None:
    """Taken 30 min ago at UTC+14, where it is dated tomorrow for most of the day (any hour this runs)."""
    now = datetime.now(UTC).replace(microsecond=0)
    loaded = load_cohort(1, seed=34, dicomweb_url=fresh_orthanc_peer.dicomweb_url,
                         fhir_base_url=fresh_fhir_peer.base_url, identifier_system=MRN_SYSTEM,
                         window_end=now - timedelta(minutes=10), utc_offset_minutes=14 * 60)  # study: now - 30 min
    uid = loaded[0].study_uid
    meta = httpx.get(f"{fresh_orthanc_peer.dicomweb_url}/studies", params={"StudyInstanceUID": uid,
                                                                        "includefield": "00080201"}).json()
    assert meta[0]["00080201"]["Value"] == ["+1400"]
    wait_for(lambda: any(c["ChangeType"] == "StableStudy" for c in httpx.get(
        f"{fresh_orthanc_peer.url}/changes", params={"since": 0, "limit": 1000}).json()["Changes"]),
        30, "the study stable in Orthanc before the engine starts")
    worker = start_worker()
    wait_for(lambda: len(risk_assessments(fresh_fhir_peer.base_url)) == 1, 240, "its RiskAssessment", worker)
    ra = risk_assessments(fresh_fhir_peer.base_url)[0]
    assert ra["basis"][0]["identifier"]["value"].removeprefix("urn:oid:") == uid
    assert store.get_study(uid).source == "qido"  # found by the first start's lookback, not the feed
