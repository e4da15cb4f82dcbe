"""Bad input through the real services against the real Orthanc and FHIR sandbox: each gives a named,
recorded outcome with a clear reason, and nothing is lost (retryable ones stay queued)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydicom.uid import generate_uid

from integration.bootstrap import Engine, bootstrap
from integration.config import Settings
from integration.domain.records import AssessmentStatus
from integration.domain.types import DomainError, Outcome
from integration.services.assess import assess_patients, publish
from integration.services.studies import ingest_study, register_study
from integration.services.vitals import sync_vitals
from sandbox._process import free_port
from tests.integration.test_dicomweb_orthanc import ct_series, non_image, store

MRN_SYSTEM = "urn:oid:1.2.36.146.595.217.0.1"
SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.22"


def make_engine(tmp_path: Path, pacs_url: str, ehr_url: str) -> Engine:
    settings = Settings(
        sandbox=True, data_dir=tmp_path / "data",
        pacs={"dicomweb_url": pacs_url, "kind": "generic"},
        ehr={"base_url": ehr_url, "patient_identifier_system": MRN_SYSTEM, "max_retries": 1, "backoff_s": 0.05,
             "timeout_s": 5},
    )
    return bootstrap(settings)


@pytest.fixture()
def engine(tmp_path: Path, fresh_orthanc_peer: Any, fresh_fhir_peer: Any) -> Iterator[Engine]:
    eng = make_engine(tmp_path, fresh_orthanc_peer.dicomweb_url, fresh_fhir_peer.base_url)
    yield eng
    eng.close()


def add_patient(fhir_base_url: str, mrn: str, observations: list[dict[str, Any]] = ()) -> str:
    with httpx.Client(timeout=30) as http:
        pat = http.post(f"{fhir_base_url}/Patient", json={
            "resourceType": "Patient", "identifier": [{"system": MRN_SYSTEM, "value": mrn}],
            "gender": "male", "birthDate": "1948-05-01"}).raise_for_status().json()
        for obs in observations:
            http.post(f"{fhir_base_url}/Observation",
                      json={**obs, "subject": {"reference": f"Patient/{pat['id']}"}}).raise_for_status()
    return str(pat["id"])


def vital(code: str, value: float | None, unit: str | None, hours_ago: float) -> dict[str, Any]:
    obs: dict[str, Any] = {
        "resourceType": "Observation", "status": "final",
        "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category",
                                  "code": "vital-signs"}]}],
        "code": {"coding": [{"system": "http://loinc.org", "code": code}]},
        "effectiveDateTime": (datetime.now(UTC) - timedelta(hours=hours_ago)).isoformat(timespec="seconds"),
    }
    if value is not None:
        obs["valueQuantity"] = {"value": value, **({"unit": unit, "system": "http://unitsofmeasure.org",
                                                     "code": unit} if unit else {})}
    return obs


def study(peer: Any, datasets: list[Any]) -> str:
    store(peer, datasets)
    return str(datasets[0].StudyInstanceUID)


def ingest(engine: Engine, uid: str) -> Any:
    assert register_study(engine.services, uid)
    return ingest_study(engine.services, uid)


def open_failures(engine: Engine) -> dict[str, int]:
    return engine.store.counts()["open_failures"]


def test_non_image_study_is_rejected_with_a_reason(engine: Engine, fresh_orthanc_peer: Any) -> None:
    uid = generate_uid()
    res = ingest(engine, study(fresh_orthanc_peer, [non_image(uid, "SR", SR_CLASS, "Dose report")]))
    assert (res.status, res.outcome) == ("failed", Outcome.NO_ELIGIBLE_SERIES.value)
    assert "not a CT/MR image" in res.reason or "not an image" in res.reason
    assert open_failures(engine) == {"no_eligible_series": 1}


def test_non_brain_series_is_rejected(engine: Engine, fresh_orthanc_peer: Any) -> None:
    uid = generate_uid()
    series = ct_series(uid, body_part="CHEST", description="Thorax 5mm")
    for ds in series:
        ds.StudyDescription = "CT CHEST W/O"
    res = ingest(engine, study(fresh_orthanc_peer, series))
    assert res.outcome == Outcome.NO_ELIGIBLE_SERIES.value
    assert "head" in res.reason.lower() or "brain" in res.reason.lower()


def test_too_few_slices(engine: Engine, fresh_orthanc_peer: Any) -> None:
    res = ingest(engine, study(fresh_orthanc_peer, ct_series(generate_uid(), n=5)))
    assert res.outcome == Outcome.NO_ELIGIBLE_SERIES.value and "5" in res.reason


def test_inconsistent_spacing(engine: Engine, fresh_orthanc_peer: Any) -> None:
    series = ct_series(generate_uid(), n=20)
    for ds in series:  # a 15 mm gap in the middle of a 5 mm series
        if ds.ImagePositionPatient[2] > 0:
            ds.ImagePositionPatient = [*ds.ImagePositionPatient[:2], ds.ImagePositionPatient[2] + 10.0]
    res = ingest(engine, study(fresh_orthanc_peer, series))
    assert (res.status, res.outcome) == ("failed", Outcome.INCONSISTENT_SPACING.value)
    assert "spacing" in res.reason


def test_corrupt_pixel_data(engine: Engine, fresh_orthanc_peer: Any) -> None:
    series = ct_series(generate_uid(), n=20)
    series[3].PixelData = series[3].PixelData[: len(series[3].PixelData) // 3]  # truncated
    res = ingest(engine, study(fresh_orthanc_peer, series))
    assert (res.status, res.outcome) == ("failed", Outcome.CORRUPT_PIXEL_DATA.value)
    assert series[3].SOPInstanceUID in res.reason


def test_unmatched_patient_is_held(engine: Engine, fresh_orthanc_peer: Any, fresh_fhir_peer: Any) -> None:
    uid = study(fresh_orthanc_peer, ct_series(generate_uid(), patient_id="NOBODY-1"))
    res = ingest(engine, uid)
    assert (res.status, res.outcome) == ("held", Outcome.UNMATCHED_PATIENT.value)
    assert "NOBODY-1" not in res.reason  # the PatientID is PHI: pseudonymised in the reason
    add_patient(fresh_fhir_peer.base_url, "NOBODY-1")
    assert engine.store.requeue_study(uid)
    assert ingest_study(engine.services, uid).status == "ready"


def test_pacs_down_is_retried(tmp_path: Path, fresh_fhir_peer: Any, fresh_orthanc_peer: Any) -> None:
    uid = study(fresh_orthanc_peer, ct_series(generate_uid()))
    good = make_engine(tmp_path, fresh_orthanc_peer.dicomweb_url, fresh_fhir_peer.base_url)
    register_study(good.services, uid)
    good.close()
    down = make_engine(tmp_path, f"http://127.0.0.1:{free_port()}/dicom-web", fresh_fhir_peer.base_url)
    try:
        res = ingest_study(down.services, uid)
        assert (res.status, res.outcome) == ("retry", Outcome.PACS_UNAVAILABLE.value)
        assert down.store.get_study(uid).next_attempt_at is not None
    finally:
        down.close()


def test_implausible_and_unitless_vitals_are_recorded_not_used(engine: Engine, fresh_orthanc_peer: Any,
                                                                 fresh_fhir_peer: Any) -> None:
    pid = add_patient(fresh_fhir_peer.base_url, "SW-TEST-1", [
        vital("8867-4", 72, "/min", 5),
        vital("8867-4", 900, "/min", 4),  # implausible heart rate
        vital("8480-6", 140, None, 3),  # no unit
        vital("8310-5", 37.0, "furlong", 2),  # unknown unit
    ])
    assert ingest(engine, study(fresh_orthanc_peer, ct_series(generate_uid()))).status == "ready"
    result = sync_vitals(engine.services, pid)
    assert (result.accepted, result.rejected) == (1, 3)
    assert open_failures(engine) == {"implausible_value": 1, "missing_unit": 1, "unknown_unit": 1}
    scored = assess_patients(engine.services, [pid])
    assert [r.status for r in scored] == ["scored"]
    assert engine.store.get_assessment(scored[0].identifier).n_vitals == 1


def test_ehr_down_during_vitals_sync_is_ehr_unavailable(tmp_path: Path, fresh_orthanc_peer: Any,
                                                          fresh_fhir_peer: Any) -> None:
    pid = add_patient(fresh_fhir_peer.base_url, "SW-TEST-1", [vital("8867-4", 72, "/min", 5)])
    eng = make_engine(tmp_path, fresh_orthanc_peer.dicomweb_url, fresh_fhir_peer.base_url)
    assert ingest(eng, study(fresh_orthanc_peer, ct_series(generate_uid()))).status == "ready"
    eng.close()
    down = make_engine(tmp_path, fresh_orthanc_peer.dicomweb_url, f"http://127.0.0.1:{free_port()}/fhir")
    try:
        with pytest.raises(DomainError) as err:
            sync_vitals(down.services, pid)
        assert err.value.outcome is Outcome.EHR_UNAVAILABLE
        patient = down.store.get_patient(pid)  # still to sync: nothing lost; backing off, honouring the EHR
        assert patient is not None and patient.vitals_attempts == 1 and patient.vitals_next_attempt_at is not None
        assert down.store.patients_needing_vitals(datetime.now(UTC)) == []
        assert down.store.patients_needing_vitals(patient.vitals_next_attempt_at) == [pid]
        assert down.store.patients_due(datetime.now(UTC), 10) == []  # not scored without its vitals
    finally:
        down.close()


def test_ehr_4xx_on_publish_is_rejected_and_not_retried(engine: Engine, fresh_orthanc_peer: Any,
                                                          fresh_fhir_peer: Any) -> None:
    pid = add_patient(fresh_fhir_peer.base_url, "SW-TEST-1", [vital("8867-4", 72, "/min", 5)])
    ingest(engine, study(fresh_orthanc_peer, ct_series(generate_uid())))
    sync_vitals(engine.services, pid)
    ident = assess_patients(engine.services, [pid])[0].identifier
    fresh_fhir_peer.inject_fault(status=422, count=10, path="RiskAssessment")
    assert publish(engine.services, ident) == "failed"
    row = engine.store.get_assessment(ident)
    assert row.outcome == Outcome.EHR_REJECTED.value and "422" in (row.reason or "")
    fresh_fhir_peer.clear_faults()


def test_ehr_503_on_publish_is_retried_then_published_once(engine: Engine, fresh_orthanc_peer: Any,
                                                             fresh_fhir_peer: Any) -> None:
    pid = add_patient(fresh_fhir_peer.base_url, "SW-TEST-1", [vital("8867-4", 72, "/min", 5)])
    ingest(engine, study(fresh_orthanc_peer, ct_series(generate_uid())))
    sync_vitals(engine.services, pid)
    ident = assess_patients(engine.services, [pid])[0].identifier
    fresh_fhir_peer.inject_fault(status=503, count=20, retry_after=1, path="RiskAssessment")
    assert publish(engine.services, ident) == "retry"
    fresh_fhir_peer.clear_faults()
    engine.store.set_assessment_outcome(ident, AssessmentStatus.RETRY, Outcome.EHR_UNAVAILABLE, "503", None)
    assert publish(engine.services, ident) == "published"
    assert publish(engine.services, ident) == "published"  # replay: no second write
    with httpx.Client() as http:
        bundle = http.get(f"{fresh_fhir_peer.base_url}/RiskAssessment", params={"subject": f"Patient/{pid}"}).json()
    assert len(bundle.get("entry", [])) == 1
