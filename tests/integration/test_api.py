"""The HTTP API against a real SQLite database and the real sandbox peers (Orthanc, FHIR sandbox).

The engine's services run in-process on what the API announced; the queue hop is recorded (the e2e tests
cover Celery), so each test can check exactly what the API handed to the queue. The API is authenticated: the
client sends an operate API key, the webhooks' bearer token, and for CDS Hooks a JWT signed by a test EHR whose
JWKS is served on loopback (the refusals are in test_api_auth.py, test_cds_hooks.py and test_webhooks.py).
"""

from __future__ import annotations

import io
import logging
import os
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

from integration.config import Settings
from integration.entrypoints.api.app import create_app
from integration.entrypoints.api.security.keys import digest, new_key
from integration.services.assess import assess_patients, publish
from integration.services.studies import ingest_study
from integration.services.vitals import sync_vitals
from sandbox import FhirPeer, OrthancPeer, free_port
from tests.integration.test_api_idp import Idp

MRN_SYSTEM = "urn:oid:1.2.36.146.595.217.0.1"
ASSESSMENT_SYSTEM = "urn:strokewatch:risk-assessment:api-test"
CT_STORAGE = "1.2.840.10008.5.1.4.1.1.2"

pytestmark = pytest.mark.peers

API_KEY = new_key()
WEBHOOK_TOKEN = f"webhook-token-{uuid.uuid4().hex}"
#: What a client of the authenticated API sends: an operate key, and the webhooks' bearer token.
CREDENTIALS = {"X-API-Key": API_KEY, "Authorization": f"Bearer {WEBHOOK_TOKEN}"}
CDS_SERVICE_URL = "http://testserver/cds-services/strokewatch-stroke-risk"


@dataclass
class RecordingQueue:
    sent: list[tuple[str, list[str]]] = field(default_factory=list)

    def __call__(self, stage: str, ids: list[str]) -> None:
        if ids:
            self.sent.append((stage, list(ids)))


def settings_for(data_dir: Path, pacs: OrthancPeer, ehr_base_url: str, cds_ehr: Idp | None = None) -> Settings:
    """Sandbox settings with the API's credentials: CREDENTIALS admitted; CDS Hooks calls from ``cds_ehr``."""
    return Settings.model_validate(
        {
            "sandbox": True,
            "data_dir": data_dir,
            "pacs": {"dicomweb_url": pacs.dicomweb_url, "orthanc_url": pacs.url, "kind": "orthanc"},
            "ehr": {"base_url": ehr_base_url, "patient_identifier_system": MRN_SYSTEM},
            "assessment_identifier_system": ASSESSMENT_SYSTEM,
            "api": {"keys": {"test": f"operate:{digest(API_KEY)}"}, "allowed_hosts": ["testserver"]},
            "webhooks": {"orthanc": {"token": WEBHOOK_TOKEN}, "fhir": {"token": WEBHOOK_TOKEN}},
            "cds_hooks": {
                "issuers": [{"iss": cds_ehr.issuer, "jwks_url": cds_ehr.jwks_url}] if cds_ehr else [],
                "public_url": "http://testserver",
            },
        }
    )


@dataclass(frozen=True)
class Loaded:
    mrn: str
    study_uid: str


def ct_head_study(mrn: str, n: int = 20, size: int = 48) -> list[bytes]:
    """A small axial head CT series (Part 10 files) for ``mrn``, taken an hour ago."""
    study_uid, series_uid = generate_uid(), generate_uid()
    taken = datetime.now(UTC) - timedelta(hours=1)
    files = []
    for k in range(n):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = UID(CT_STORAGE), generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CT_STORAGE, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SeriesNumber, ds.InstanceNumber = study_uid, series_uid, 1, k + 1
        ds.PatientID, ds.PatientName = mrn, "Api^Test"
        ds.StudyDate, ds.StudyTime = taken.strftime("%Y%m%d"), taken.strftime("%H%M%S")
        ds.StudyDescription, ds.SeriesDescription = "CT HEAD W/O", "Head 5mm"
        ds.Modality, ds.BodyPartExamined, ds.ImageType = "CT", "HEAD", ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.SliceThickness, ds.PixelSpacing = 5.0, [4.0, 4.0]
        ds.ImageOrientationPatient, ds.ImagePositionPatient = [1, 0, 0, 0, 1, 0], [-96.0, -96.0, 5.0 * k]
        ds.Rows = ds.Columns = size
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
        ds.PixelData = np.full((size, size), 1024 + 35 + k, dtype=np.int16).tobytes()
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        files.append(buf.getvalue())
    return files


def stow(dicomweb_url: str, files: list[bytes]) -> None:
    boundary = "api-test-boundary"
    body = (
        b"".join(f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + f + b"\r\n" for f in files)
        + f"--{boundary}--\r\n".encode()
    )
    ctype = f'multipart/related; type="application/dicom"; boundary={boundary}'
    resp = httpx.post(f"{dicomweb_url}/studies", content=body, headers={"Content-Type": ctype}, timeout=60)
    assert resp.status_code == 200, resp.text


def patient_with_vitals(fhir_base_url: str, mrn: str) -> None:
    """A FHIR Patient with the MRN and a day of heart rates, in one transaction."""
    now = datetime.now(UTC).replace(microsecond=0)
    ref = f"urn:uuid:{uuid.uuid4()}"
    entries: list[dict[str, Any]] = [
        {
            "fullUrl": ref,
            "resource": {
                "resourceType": "Patient",
                "identifier": [{"system": MRN_SYSTEM, "value": mrn}],
                "gender": "female",
                "birthDate": "1950-02-03",
            },
            "request": {"method": "POST", "url": "Patient"},
        }
    ]
    for h in range(1, 25, 2):
        entries.append(
            {
                "resource": {
                    "resourceType": "Observation",
                    "status": "final",
                    "category": [
                        {
                            "coding": [
                                {
                                    "system": "http://terminology.hl7.org/CodeSystem/observation-category",
                                    "code": "vital-signs",
                                }
                            ]
                        }
                    ],
                    "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]},
                    "subject": {"reference": ref},
                    "effectiveDateTime": (now - timedelta(hours=h)).isoformat(),
                    "valueQuantity": {
                        "value": 70 + h,
                        "unit": "/min",
                        "system": "http://unitsofmeasure.org",
                        "code": "/min",
                    },
                },
                "request": {"method": "POST", "url": "Observation"},
            }
        )
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": entries}
    resp = httpx.post(fhir_base_url, json=bundle, headers={"Content-Type": "application/fhir+json"}, timeout=60)
    assert resp.status_code == 200, resp.text


@dataclass
class Api:
    client: TestClient
    queue: RecordingQueue
    matched: Loaded  # its Patient and vitals are in the EHR
    unmatched: Loaded  # only its study is in the PACS: held as unmatched

    @property
    def engine(self) -> Any:
        return self.client.app.state.engine  # type: ignore[attr-defined]


class Captured(logging.Handler):
    """Every log record emitted while the module runs, formatted as it would be written."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(f"{record.name} {record.getMessage()} {record.exc_text or ''}")


@pytest.fixture(scope="module")
def captured_logs() -> Iterator[Captured]:
    root, handler = logging.getLogger(), Captured()
    level = root.level
    root.setLevel(logging.INFO)  # what the worker and `strokewatch run` log at
    root.addHandler(handler)
    yield handler
    root.removeHandler(handler)
    root.setLevel(level)


@pytest.fixture(scope="module")
def cds_ehr() -> Iterator[Idp]:
    """The EHR that calls the CDS Hooks service: its signing keys, its JWKS on loopback."""
    with Idp(issuer="https://ehr.test/fhir") as ehr:
        yield ehr


def cds_call(ehr: Idp) -> dict[str, str]:
    """The Authorization header of one CDS Hooks call (a fresh jti each time)."""
    return {"Authorization": f"Bearer {ehr.token(aud=CDS_SERVICE_URL)}"}


@pytest.fixture(scope="module")
def api(
    captured_logs: Captured,
    tmp_path_factory: pytest.TempPathFactory,
    orthanc_peer: OrthancPeer,
    fhir_peer: FhirPeer,
    cds_ehr: Idp,
) -> Iterator[Api]:
    orthanc_peer.reset()
    fhir_peer.reset()
    loaded = []
    for mrn in ("API-MRN-1", "API-MRN-2"):
        files = ct_head_study(mrn)
        stow(orthanc_peer.dicomweb_url, files)
        loaded.append(Loaded(mrn, str(dcmread(io.BytesIO(files[0])).StudyInstanceUID)))
    patient_with_vitals(fhir_peer.base_url, "API-MRN-1")
    queue = RecordingQueue()
    settings = settings_for(tmp_path_factory.mktemp("api"), orthanc_peer, fhir_peer.base_url, cds_ehr)
    app = create_app(settings, enqueue=queue)
    with TestClient(app, headers=CREDENTIALS) as client:
        yield Api(client, queue, loaded[0], loaded[1])


def announce_and_process(api: Api, study_uid: str) -> None:
    """What the worker would do with what the webhook enqueued: ingest, sync vitals, assess, publish."""
    resp = api.client.post("/webhooks/orthanc/stable-study", json={"StudyInstanceUID": study_uid})
    assert resp.status_code == 202, resp.text
    assert ("ingest", [study_uid]) in api.queue.sent
    svc = api.engine.services
    result = ingest_study(svc, study_uid)
    if result.status != "ready":
        return
    assert result.patient_fhir_id
    sync_vitals(svc, result.patient_fhir_id)
    for assessed in assess_patients(svc, [result.patient_fhir_id]):
        assert assessed.identifier, assessed
        assert publish(svc, assessed.identifier) == "published"


@pytest.fixture(scope="module")
def processed(api: Api) -> Api:
    announce_and_process(api, api.matched.study_uid)
    announce_and_process(api, api.unmatched.study_uid)
    return api


def test_liveness_and_openapi_docs(api: Api) -> None:
    assert api.client.get("/health/live").json() == {"status": "ok"}
    schema = api.client.get("/openapi.json").json()
    for path in ("/health/ready", "/status", "/patients/{fhir_id}", "/studies/{study_uid}/retry", "/failures"):
        assert path in schema["paths"], path
    assert api.client.get("/docs").status_code == 200


def test_readiness_ok_with_every_peer_up(api: Api) -> None:
    resp = api.client.get("/health/ready")
    body = resp.json()
    assert resp.status_code == 200, body
    assert body["status"] == "ready"
    assert [c["name"] for c in body["checks"]] == ["database", "broker", "pacs", "ehr", "model"]
    assert all(c["ok"] for c in body["checks"])


def test_readiness_503_names_the_ehr_when_it_is_down(tmp_path: Path, orthanc_peer: OrthancPeer) -> None:
    closed = f"http://127.0.0.1:{free_port()}/fhir"
    app = create_app(settings_for(tmp_path, orthanc_peer, closed), enqueue=RecordingQueue())
    with TestClient(app, headers=CREDENTIALS) as client:
        resp = client.get("/health/ready")
    body = resp.json()
    assert resp.status_code == 503
    assert body["failing"] == ["ehr"]
    ehr = next(c for c in body["checks"] if c["name"] == "ehr")
    assert closed in ehr["detail"] and "STROKEWATCH_EHR__BASE_URL" in ehr["hint"]


def test_patient_detail_has_studies_series_assessment_and_vitals(processed: Api) -> None:
    patients = processed.client.get("/patients").json()
    assert patients["total"] == 1
    fhir_id = patients["items"][0]["fhir_id"]
    detail = processed.client.get(f"/patients/{fhir_id}").json()

    (study,) = detail["studies"]
    assert study["study_uid"] == processed.matched.study_uid and study["status"] == "ready"
    chosen = [s for s in study["series"] if s["chosen"]]
    assert len(chosen) == 1 and chosen[0]["eligible"] and chosen[0]["reason"]

    (assessment,) = detail["assessments"]
    assert assessment["status"] == "published" and assessment["superseded"] is False
    assert 0.0 <= assessment["probability"] <= 1.0
    assert assessment["band"] in ("low", "moderate", "high")
    assert assessment["fhir_url"].endswith(f"/RiskAssessment/{assessment['fhir_id']}")
    # The link leads to the RiskAssessment in the EHR, carrying the identifier the API reports.
    written = httpx.get(assessment["fhir_url"], headers={"Accept": "application/fhir+json"}).json()
    assert {"system": ASSESSMENT_SYSTEM, "value": assessment["identifier"]} in [
        {"system": i.get("system"), "value": i.get("value")} for i in written["identifier"]
    ]
    assert written["subject"]["reference"] == f"Patient/{fhir_id}"

    assert sum(detail["vitals"].values()) > 0
    assert processed.client.get("/patients/no-such-patient").status_code == 404


def test_studies_filter_by_status_and_show_the_held_one(processed: Api) -> None:
    held = processed.client.get("/studies", params={"status": "held"}).json()
    assert [s["study_uid"] for s in held["items"]] == [processed.unmatched.study_uid]
    assert held["items"][0]["outcome"] == "unmatched_patient"
    ready = processed.client.get("/studies", params={"status": "ready"}).json()
    assert [s["study_uid"] for s in ready["items"]] == [processed.matched.study_uid]
    detail = processed.client.get(f"/studies/{processed.unmatched.study_uid}").json()
    assert detail["series"] and detail["chosen_series_uid"]
    assert processed.client.get("/studies/1.2.3.4.5.6.7.8.9").status_code == 404


def test_failures_list_the_unmatched_patient_with_a_named_outcome(processed: Api) -> None:
    page = processed.client.get("/failures", params={"stage": "ingest", "open": "true"}).json()
    (failure,) = page["items"]
    assert failure["subject"] == processed.unmatched.study_uid
    assert failure["outcome"] == "unmatched_patient" and failure["retryable"] is True
    assert failure["resolved_at"] is None and failure["created_at"]
    assert failure["occurrences"] >= 1 and failure["last_seen_at"] >= failure["created_at"]  # one row, counted
    assert processed.unmatched.mrn not in failure["message"]  # PHI stays out of messages
    none = processed.client.get("/failures", params={"outcome": "ehr_rejected"}).json()
    assert none["total"] == 0


def test_status_counts_model_and_peers(processed: Api) -> None:
    body = processed.client.get("/status").json()
    assert body["counts"]["studies"] == {"ready": 1, "held": 1}
    assert body["counts"]["assessments"] == {"published": 1}
    assert body["counts"]["open_failures"].get("unmatched_patient") == 1
    assert body["model"]["runtime"] == "onnxruntime" and body["model"]["version"]
    assert isinstance(body["model"]["trained"], bool)
    assert body["pacs"]["detection"] == "orthanc-changes"
    assert body["ehr"]["base_url"] == processed.engine.settings.ehr.base_url


def test_metrics_are_prometheus_gauges_of_the_counts(processed: Api) -> None:
    resp = processed.client.get("/metrics")
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/plain")
    assert 'strokewatch_studies{status="ready"} 1.0' in resp.text
    assert 'strokewatch_studies{status="held"} 1.0' in resp.text
    assert 'strokewatch_open_failures{outcome="unmatched_patient"} 1.0' in resp.text


def test_metrics_show_the_stage_histogram_after_a_real_flow(processed: Api) -> None:
    """Both studies were retrieved from Orthanc by WADO-RS and built into volumes (the unmatched one is held after
    that); the matched one was scored, explained and published. Announced by webhook, their completion time is
    their detection: no ``detect`` observation, and end to end from detection to the RiskAssessment written."""
    resp = processed.client.get("/metrics")
    assert resp.status_code == 200
    (family,) = [f for f in text_string_to_metric_families(resp.text) if f.name == "strokewatch_stage_seconds"]
    assert family.type == "histogram"
    samples: dict[str, dict[str, Any]] = {}
    for sample in family.samples:
        per = samples.setdefault(sample.labels["stage"], {"buckets": []})
        if sample.name.endswith("_bucket"):
            per["buckets"].append((float(sample.labels["le"]), sample.value))
        else:
            per[sample.name.rsplit("_", 1)[1]] = sample.value
    assert set(samples) == {"detect", "retrieve", "decode", "preprocess", "vitals", "model", "explain", "publish",
                            "end_to_end"}
    counts = {stage: per["count"] for stage, per in samples.items()}
    explained = 1 if processed.engine.settings.explain_drivers else 0
    assert counts == {  # DICOMweb reports its decoding (2 studies retrieved)
        "detect": 0, "retrieve": 2, "decode": 2, "preprocess": 2, "vitals": 1, "model": 1,
        "explain": explained, "publish": 1, "end_to_end": 1}
    for stage, per in samples.items():
        values = [n for _, n in sorted(per["buckets"])]
        assert values == sorted(values) and values[-1] == per["count"], stage  # cumulative, +Inf is the count
        assert per["sum"] >= 0 and (per["sum"] > 0) == (per["count"] > 0), stage
    sums = {stage: per["sum"] for stage, per in samples.items()}
    # the matched study's end to end spans its vitals sync, forward passes and publish (one process, in turn)
    assert sums["end_to_end"] >= sums["vitals"] + sums["model"] + sums["explain"] + sums["publish"]


def test_operator_retry_requeues_a_held_study(processed: Api) -> None:
    uid = processed.unmatched.study_uid
    before = len(processed.queue.sent)
    resp = processed.client.post(f"/studies/{uid}/retry")
    assert resp.status_code == 202, resp.text
    assert processed.queue.sent[before:] == [("ingest", [uid])]
    assert processed.client.get(f"/studies/{uid}").json()["status"] == "retry"
    assert processed.client.post("/studies/1.2.3.4.5.6.7.8.9/retry").status_code == 404


def test_operator_republish_and_reassess_requeue_and_never_duplicate(processed: Api) -> None:
    svc, client = processed.engine.services, processed.client
    patient = svc.store.get_study(processed.matched.study_uid).patient_fhir_id
    current = svc.store.latest_assessment(patient)
    assert current is not None and current.status == "published"
    before = len(processed.queue.sent)
    resp = client.post(f"/assessments/{current.identifier}/republish")
    assert resp.status_code == 202, resp.text
    assert processed.queue.sent[before:] == [("publish", [current.identifier])]
    assert publish(svc, current.identifier) == "published"  # what the worker does with it: found, not duplicated
    in_ehr = svc.ehr.search("RiskAssessment", {"identifier": f"{ASSESSMENT_SYSTEM}|{current.identifier}"})
    assert [r["id"] for r in in_ehr] == [current.fhir_id]
    assert client.post("/assessments/0123456789abcdef/republish").status_code == 404
    resp = client.post(f"/patients/{patient}/reassess")
    assert resp.status_code == 202, resp.text
    assert processed.queue.sent[-1] == ("assess", [patient])
    assert [(r.status, r.identifier) for r in assess_patients(svc, [patient])] == [("unchanged", current.identifier)]
    assert client.post("/patients/no-such-patient/reassess").status_code == 404


def test_cli_republish_resends_an_assessment_without_duplicating_it(
    processed: Api, orthanc_peer: OrthancPeer, fhir_peer: FhirPeer, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    from integration.entrypoints.cli import app as cli

    svc = processed.engine.services
    current = svc.store.latest_assessment(svc.store.get_study(processed.matched.study_uid).patient_fhir_id)
    assert current is not None and current.fhir_id
    env = {
        "STROKEWATCH_SANDBOX": "true",
        "STROKEWATCH_DATA_DIR": str(processed.engine.settings.data_dir),
        "STROKEWATCH_PACS__DICOMWEB_URL": orthanc_peer.dicomweb_url,
        "STROKEWATCH_PACS__KIND": "generic",
        "STROKEWATCH_EHR__BASE_URL": fhir_peer.base_url,
        "STROKEWATCH_ASSESSMENT_IDENTIFIER_SYSTEM": ASSESSMENT_SYSTEM,
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    result = CliRunner().invoke(cli, ["republish", current.identifier], terminal_width=200)
    assert result.exit_code == 0, result.output
    shown = "".join(result.output.split())  # rich wraps at the terminal's width
    assert f"{current.identifier}:publishedRiskAssessment/{current.fhir_id}" in shown
    in_ehr = svc.ehr.search("RiskAssessment", {"identifier": f"{ASSESSMENT_SYSTEM}|{current.identifier}"})
    assert len(in_ehr) == 1
    unknown = CliRunner().invoke(cli, ["republish", "0" * 40], terminal_width=200)
    assert unknown.exit_code == 1 and "isnotknown" in "".join(unknown.output.split())


def test_orthanc_style_webhook_resolves_the_orthanc_id(processed: Api, orthanc_peer: OrthancPeer) -> None:
    found = httpx.post(
        f"{orthanc_peer.url}/tools/lookup", content=processed.matched.study_uid, headers=orthanc_peer.auth_headers()
    ).json()
    (orthanc_id,) = [f["ID"] for f in found if f["Type"] == "Study"]
    resp = processed.client.post("/webhooks/orthanc/stable-study", json={"ID": orthanc_id, "Path": "/studies/x"})
    assert resp.status_code == 202, resp.text
    assert resp.json()["study_uid"] == processed.matched.study_uid
    assert processed.client.post("/webhooks/orthanc/stable-study", json={}).status_code == 422
    unknown = processed.client.post("/webhooks/orthanc/stable-study", json={"StudyInstanceUID": "1.2.3.999"})
    assert unknown.status_code == 404


def test_fhir_subscription_enqueues_vitals_for_known_patients_only(processed: Api) -> None:
    fhir_id = processed.client.get("/patients").json()["items"][0]["fhir_id"]
    bundle = {
        "resourceType": "Bundle",
        "type": "history",
        "entry": [
            {
                "resource": {
                    "resourceType": "Observation",
                    "status": "final",
                    "subject": {"reference": f"Patient/{fhir_id}"},
                }
            },
            {
                "resource": {
                    "resourceType": "Observation",
                    "status": "final",
                    "subject": {"reference": "Patient/stranger"},
                }
            },
        ],
    }
    before = len(processed.queue.sent)
    resp = processed.client.post(
        "/webhooks/fhir/subscription",
        content=httpx.Request("POST", "/", json=bundle).content,
        headers={"Content-Type": "application/fhir+json"},
    )
    assert resp.status_code == 202, resp.text
    assert resp.json() == {"patients": [fhir_id], "ignored": ["stranger"]}
    assert processed.queue.sent[before:] == [("vitals", [fhir_id])]
    # payload "none": an empty POST is accepted and enqueues nothing
    empty = processed.client.post("/webhooks/fhir/subscription", content=b"")
    assert empty.status_code == 202 and empty.json() == {"patients": [], "ignored": []}
    assert processed.client.post("/webhooks/fhir/subscription", content=b"not json").status_code == 400


def test_no_phi_in_the_logs(processed: Api, captured_logs: Captured) -> None:
    """Study UIDs and FHIR ids may be logged; MRNs (DICOM PatientID), names and birth dates never."""
    processed.client.get(f"/patients/{processed.client.get('/patients').json()['items'][0]['fhir_id']}")
    assert any(processed.matched.study_uid in line for line in captured_logs.lines)  # the capture works
    for line in captured_logs.lines:
        for phi in (processed.matched.mrn, processed.unmatched.mrn, "Api^Test", "1950-02-03"):
            assert phi not in line, line


@pytest.mark.slow
def test_served_by_uvicorn_the_webhook_puts_a_celery_message_on_the_embedded_broker(
    tmp_path: Path, orthanc_peer: OrthancPeer, fhir_peer: FhirPeer
) -> None:
    """As `strokewatch run` serves it: `uvicorn --factory`, settings from STROKEWATCH_*, the real Celery queue."""
    files = ct_head_study("API-MRN-3")
    stow(orthanc_peer.dicomweb_url, files)
    uid = str(dcmread(io.BytesIO(files[0])).StudyInstanceUID)
    port = free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("STROKEWATCH_")},
        "STROKEWATCH_SANDBOX": "true",
        "STROKEWATCH_DATA_DIR": str(tmp_path / "data"),
        "STROKEWATCH_PACS__DICOMWEB_URL": orthanc_peer.dicomweb_url,
        "STROKEWATCH_EHR__BASE_URL": fhir_peer.base_url,
        "STROKEWATCH_API__KEYS__TEST": f"operate:{digest(API_KEY)}",
        "STROKEWATCH_WEBHOOKS__ORTHANC__TOKEN": WEBHOOK_TOKEN,
    }
    argv = [sys.executable, "-m", "uvicorn", "--factory", "integration.entrypoints.api.app:create_app"]
    with open(tmp_path / "api.log", "wb") as log:
        server = subprocess.Popen([*argv, "--port", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):  # start-up (imports, migrations): wait for liveness, not for a fixed time
            try:
                if httpx.get(f"{base}/health/live").status_code == 200:
                    break
            except httpx.TransportError:
                assert server.poll() is None, (tmp_path / "api.log").read_text()
                time.sleep(0.1)
        assert httpx.get(f"{base}/studies/{uid}").status_code == 401  # served by uvicorn, still authenticated
        resp = httpx.post(f"{base}/webhooks/orthanc/stable-study", json={"StudyInstanceUID": uid}, headers=CREDENTIALS)
        assert resp.status_code == 202, resp.text
        assert httpx.get(f"{base}/studies/{uid}", headers=CREDENTIALS).json()["source"] == "webhook"
    finally:
        server.terminate()
        server.wait(30)
    with closing(sqlite3.connect(tmp_path / "data" / "broker.db")) as broker:
        payloads = [
            bytes(p).decode() if isinstance(p, bytes) else str(p)
            for (p,) in broker.execute("SELECT payload FROM kombu_message")
        ]
    (message,) = payloads
    assert "strokewatch.ingest" in message and uid in message


def test_cds_hooks_discovery_lists_the_patient_view_service(api: Api) -> None:
    services = api.client.get("/cds-services", headers={"X-API-Key": "", "Authorization": ""}).json()["services"]
    assert [(s["hook"], s["id"]) for s in services] == [("patient-view", "strokewatch-stroke-risk")]


def test_cds_hooks_patient_view_card_shows_the_latest_risk(processed: Api, cds_ehr: Idp) -> None:
    pid = processed.engine.store.get_study(processed.matched.study_uid).patient_fhir_id
    body = {"hook": "patient-view", "hookInstance": "d1577c69-dfbe-44ad-ba6d-3e05e953b2ea",
            "context": {"patientId": pid, "userId": "Practitioner/1"}}
    cards = processed.client.post(
        "/cds-services/strokewatch-stroke-risk", json=body, headers=cds_call(cds_ehr)
    ).json()["cards"]
    assert len(cards) == 1
    card = cards[0]
    row = processed.engine.store.latest_assessment(pid)
    assert f"({row.probability:.0%} within" in card["summary"] and row.band in card["summary"]
    assert card["indicator"] == {"low": "info", "moderate": "warning", "high": "critical"}[row.band]
    assert card["links"][0]["url"].endswith(f"/RiskAssessment/{row.fhir_id}")
    assert httpx.get(card["links"][0]["url"]).status_code == 200  # the link resolves in the EHR
    assert card["source"]["label"] == "StrokeWatch"


def test_cds_hooks_unknown_patient_gets_no_card_and_bad_hooks_are_refused(api: Api, cds_ehr: Idp) -> None:
    body = {"hook": "patient-view", "hookInstance": "x", "context": {"patientId": "nobody"}}
    url = "/cds-services/strokewatch-stroke-risk"
    assert api.client.post(url, json=body, headers=cds_call(cds_ehr)).json() == {"cards": []}
    assert api.client.post(url, json={**body, "hook": "order-sign"}, headers=cds_call(cds_ehr)).status_code == 400
    assert api.client.post(url, json={**body, "context": {}}, headers=cds_call(cds_ehr)).status_code == 400
