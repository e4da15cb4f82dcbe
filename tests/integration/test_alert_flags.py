"""The EHR alert against the FHIR sandbox: a Flag opened when an assessment crosses the alert threshold, kept (and
pointed at each later RiskAssessment) while the risk stays high, closed (inactive + period.end) when a later one
falls below, a new one for a new episode, and never a duplicate across re-runs of the publish."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from integration.bootstrap import Engine, bootstrap
from integration.config import Settings
from integration.domain.alerts import FLAG_DETAIL_URL, FLAG_IDENTIFIER_SYSTEM
from integration.domain.assessment import AssessmentFacts, build_risk_assessment
from integration.domain.records import NewAssessment
from integration.services.assess import publish
from sandbox import FhirPeer, OrthancPeer

pytestmark = pytest.mark.peers

MRN_SYSTEM = "urn:oid:1.2.36.146.595.217.0.1"


@pytest.fixture()
def engine(tmp_path: Path, orthanc_peer: OrthancPeer, fresh_fhir_peer: FhirPeer) -> Iterator[Engine]:
    eng = bootstrap(Settings(
        sandbox=True, data_dir=tmp_path / "data",
        pacs={"dicomweb_url": orthanc_peer.dicomweb_url, "kind": "generic"},
        ehr={"base_url": fresh_fhir_peer.base_url, "patient_identifier_system": MRN_SYSTEM},
        policy={"alert_at_or_above": 0.30},
        pacs_results={"enabled": False},  # no study here: the EHR side alone
    ))
    yield eng
    eng.close()


def new_patient(fhir: FhirPeer, eng: Engine) -> str:
    body = {"resourceType": "Patient", "identifier": [{"system": MRN_SYSTEM, "value": "FLAG-1"}], "gender": "female"}
    created = httpx.post(f"{fhir.base_url}/Patient", json=body, timeout=10).raise_for_status().json()
    eng.services.store.upsert_patient(created["id"], "1950-01-01", "female")
    return str(created["id"])


class Scores:
    """Assessments of one patient, each newer than the last (as new vital signs would make them)."""

    def __init__(self, eng: Engine, patient: str) -> None:
        self.eng, self.patient, self.latest = eng, patient, None
        self.at = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=10)

    def publish_new(self, probability: float) -> str:
        svc = self.eng.services
        self.at += timedelta(hours=1)
        identifier = f"flag-test-{self.patient[:8]}-{self.at:%H%M}"
        facts = AssessmentFacts(
            identifier_system=svc.assessment_identifier_system, identifier=identifier,
            patient_fhir_id=self.patient, window_end=self.at, probability=probability, model_version="0.6.0",
            trained=True, runtime="onnxruntime", study_uid=None, modality=None, observation_ids=(),
            supersedes_identifier=self.latest,
        )
        svc.store.add_assessment(NewAssessment(
            identifier=identifier, patient_fhir_id=self.patient, study_uid=None, window_end=self.at,
            model_version="0.6.0", runtime="onnxruntime", trained=True, probability=probability,
            band=svc.policy.band(probability), input_fingerprint=identifier, n_vitals=3,
            resource=build_risk_assessment(facts, svc.policy), supersedes_identifier=self.latest,
        ))
        self.latest = identifier
        assert publish(svc, identifier) == "published"
        return identifier

    def republish(self, identifier: str) -> None:
        svc = self.eng.services
        assert svc.store.requeue_assessment(identifier)
        assert publish(svc, identifier) == "published"

    def risk_assessment_id(self, identifier: str) -> str:
        row = self.eng.services.store.get_assessment(identifier)
        assert row is not None and row.fhir_id
        return row.fhir_id


def flags(fhir: FhirPeer, patient: str) -> list[dict[str, Any]]:
    bundle = httpx.get(f"{fhir.base_url}/Flag", params={"patient": f"Patient/{patient}"}, timeout=10).json()
    return [e["resource"] for e in bundle.get("entry", [])]


def details(flag: dict[str, Any]) -> list[str]:
    return [e["valueReference"]["reference"] for e in flag.get("extension", []) if e["url"] == FLAG_DETAIL_URL]


def test_a_flag_opens_on_crossing_stays_one_and_closes_on_falling(engine: Engine, fresh_fhir_peer: FhirPeer) -> None:
    patient = new_patient(fresh_fhir_peer, engine)
    scores = Scores(engine, patient)

    low = scores.publish_new(0.05)
    assert flags(fresh_fhir_peer, patient) == []  # below the threshold and nothing open: no Flag

    high = scores.publish_new(0.62)
    [flag] = flags(fresh_fhir_peer, patient)
    assert flag["status"] == "active" and "end" not in flag["period"]
    assert flag["subject"]["reference"] == f"Patient/{patient}"
    assert details(flag) == [f"RiskAssessment/{scores.risk_assessment_id(high)}"]
    assert flag["identifier"][0]["system"] == FLAG_IDENTIFIER_SYSTEM

    scores.republish(high)  # a retried or replayed publish of the same assessment
    assert [f["id"] for f in flags(fresh_fhir_peer, patient)] == [flag["id"]]

    higher = scores.publish_new(0.71)  # still high: the same Flag, now pointing at this assessment too
    [kept] = flags(fresh_fhir_peer, patient)
    assert kept["id"] == flag["id"] and kept["status"] == "active"
    assert details(kept)[-1] == f"RiskAssessment/{scores.risk_assessment_id(higher)}"

    fell = scores.publish_new(0.12)
    [closed] = flags(fresh_fhir_peer, patient)
    assert closed["id"] == flag["id"] and closed["status"] == "inactive"
    assert closed["period"]["end"] >= closed["period"]["start"]
    assert details(closed)[-1] == f"RiskAssessment/{scores.risk_assessment_id(fell)}"

    scores.republish(fell)
    scores.republish(high)  # a late replay of an older assessment: the latest one decides, nothing changes
    assert [(f["id"], f["status"]) for f in flags(fresh_fhir_peer, patient)] == [(flag["id"], "inactive")]
    del low

    again = scores.publish_new(0.55)  # a new episode: a new Flag, the closed one stays closed
    current = {f["id"]: f for f in flags(fresh_fhir_peer, patient)}
    assert len(current) == 2 and current[flag["id"]]["status"] == "inactive"
    [opened] = [f for f in current.values() if f["id"] != flag["id"]]
    assert opened["status"] == "active"
    assert details(opened) == [f"RiskAssessment/{scores.risk_assessment_id(again)}"]
    scores.republish(again)
    assert len(flags(fresh_fhir_peer, patient)) == 2


def test_flags_can_be_turned_off(tmp_path: Path, orthanc_peer: OrthancPeer, fresh_fhir_peer: FhirPeer) -> None:
    eng = bootstrap(Settings(
        sandbox=True, data_dir=tmp_path / "off",
        pacs={"dicomweb_url": orthanc_peer.dicomweb_url, "kind": "generic"},
        ehr={"base_url": fresh_fhir_peer.base_url, "patient_identifier_system": MRN_SYSTEM},
        alerts={"flag": False}, pacs_results={"enabled": False},
    ))
    try:
        patient = new_patient(fresh_fhir_peer, eng)
        Scores(eng, patient).publish_new(0.9)
        assert flags(fresh_fhir_peer, patient) == []
    finally:
        eng.close()
