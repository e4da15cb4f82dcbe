"""Hostile Retry-After values and a trickling PACS against the real FHIR sandbox, a stub DICOMweb PACS on
127.0.0.1 and the API: every value is clamped to ``retry_after_cap_s`` or refused, the work goes to ``retry`` with a
bounded ``next_attempt_at`` (never left ``processing``), and the API keeps answering (never a 500)."""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from pydicom.uid import generate_uid

from integration.adapters.dicomweb import DicomWebPacs
from integration.adapters.fhir import FhirEhr
from integration.adapters.fhir_auth import ClientCredentialsAuth
from integration.bootstrap import Engine, build_auth
from integration.config import AuthSettings, Settings
from integration.domain.records import AssessmentStatus, StudyStatus
from integration.domain.types import DomainError, Outcome, StudyRef
from integration.entrypoints.api.app import create_app
from integration.entrypoints.api.security.keys import digest, new_key
from integration.services.assess import assess_patients, publish
from integration.services.studies import ingest_study
from integration.services.vitals import sync_vitals
from sandbox import FhirAuth, FhirPeer, OrthancPeer
from tests.integration.test_dicomweb_orthanc import ct_series, store

pytestmark = pytest.mark.peers

MRN_SYSTEM = "urn:oid:1.2.36.146.595.217.0.1"
CAP_S = 120.0  # retry_after_cap_s in these tests
API_KEY = new_key()
WEBHOOK_TOKEN = "webhook-token-retry-after-tests"
CREDENTIALS = {"X-API-Key": API_KEY, "Authorization": f"Bearer {WEBHOOK_TOKEN}"}
CLIENT_ID, CLIENT_SECRET = "strokewatch", "client-secret-42"

#: (Retry-After as sent, what the engine makes of it): None = refused (no hint), "cap" = clamped to the cap.
HOSTILE: list[tuple[str, float | str | None]] = [
    ("inf", None),
    ("-1", None),
    ("1e9", None),
    ("nan", None),
    ("soon", None),
    ("99999999999999999999999999", "cap"),
    ("1000000000", "cap"),
    ("Fri, 31 Dec 9999 23:59:59 GMT", "cap"),
    ("Sat, 01 Jan 2000 00:00:00 GMT", 0.0),
    ("30", 30.0),
]
IDS = [raw for raw, _ in HOSTILE]


def expected(value: float | str | None) -> float | None:
    return CAP_S if value == "cap" else value  # type: ignore[return-value]


def aware(moment: datetime | None) -> datetime:
    assert moment is not None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


# -- a stub DICOMweb PACS ------------------------------------------------------------------------------------------


def _attr(vr: str, *values: Any) -> dict[str, Any]:
    return {"vr": vr, "Value": list(values)}


@dataclass
class Fault:
    status: int
    retry_after: str | None


class StubPacs:
    """DICOMweb on 127.0.0.1: answers ``fault`` (status + Retry-After) to every request while it is set; otherwise
    QIDO-RS lists one head CT series per known study, and WADO-RS starts a multipart answer and then trickles one
    byte every ``trickle_s`` for as long as the client listens (``trickled`` counts the bytes)."""

    def __init__(self, trickle_s: float = 0.02) -> None:
        self.fault: Fault | None = None
        self.trickle_s = trickle_s
        self.trickled = 0
        self.series: dict[str, str] = {}  # study UID -> series UID
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def dicomweb_url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/dicom-web"

    def __enter__(self) -> StubPacs:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # quiet
                pass

            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                if stub.fault is not None:
                    headers = {"Retry-After": stub.fault.retry_after} if stub.fault.retry_after is not None else {}
                    return self._send(stub.fault.status, b'{"error": "busy"}', "application/json", headers)
                path = self.path.split("?")[0]
                match = re.fullmatch(r"/dicom-web/studies/([0-9.]+)/series(?:/([0-9.]+)(/instances)?)?", path)
                if match is None or match[1] not in stub.series:
                    return self._send(404, b"[]", "application/dicom+json")
                study_uid, series_uid = match[1], stub.series[match[1]]
                if match[2] is None:
                    return self._json(
                        [
                            {
                                "0020000E": _attr("UI", series_uid),
                                "00080060": _attr("CS", "CT"),
                                "0008103E": _attr("LO", "Head 5mm"),
                                "00180015": _attr("CS", "HEAD"),
                                "00201209": _attr("IS", 20),
                                "00081030": _attr("LO", "CT HEAD"),
                            }
                        ]
                    )
                if match[3]:
                    return self._json(
                        [
                            {
                                "00080016": _attr("UI", "1.2.840.10008.5.1.4.1.1.2"),
                                "00080008": _attr("CS", "ORIGINAL", "PRIMARY", "AXIAL"),
                                "00180050": _attr("DS", 5.0),
                                "00200037": _attr("DS", 1, 0, 0, 0, 1, 0),
                                "00280010": _attr("US", 64),
                                "00280011": _attr("US", 64),
                            }
                        ]
                    )
                self._trickle(study_uid)

            def _trickle(self, _study_uid: str) -> None:
                self.send_response(200)
                self.send_header("Content-Type", 'multipart/related; type="application/dicom"; boundary=slow')
                self.end_headers()
                try:
                    self.wfile.write(b"--slow\r\nContent-Type: application/dicom\r\n\r\n")
                    self.wfile.flush()
                    for _ in range(60_000):  # 20 minutes at the default pace: the engine must give up first
                        time.sleep(stub.trickle_s)
                        self.wfile.write(b"\0")
                        self.wfile.flush()
                        stub.trickled += 1
                except OSError:  # the engine hung up: what the test wants
                    return

            def _json(self, body: Any) -> None:
                self._send(200, json.dumps(body).encode(), "application/dicom+json")

            def _send(self, status: int, body: bytes, ctype: str, headers: dict[str, str] | None = None) -> None:
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(body)

        return Handler


@pytest.fixture()
def stub_pacs() -> Iterator[StubPacs]:
    with StubPacs() as pacs:
        yield pacs


# -- the engine and its API -----------------------------------------------------------------------------------------


def settings_for(data_dir: Path, dicomweb_url: str, ehr_url: str) -> Settings:
    return Settings.model_validate(
        {
            "sandbox": True,
            "data_dir": data_dir,
            "pacs": {"dicomweb_url": dicomweb_url, "kind": "generic", "timeout_s": 10, "retrieve_deadline_s": 1.0},
            "ehr": {
                "base_url": ehr_url,
                "patient_identifier_system": MRN_SYSTEM,
                "max_retries": 1,
                "backoff_s": 0.05,
                "timeout_s": 5,
            },
            "retry_after_cap_s": CAP_S,
            "api": {"keys": {"test": f"operate:{digest(API_KEY)}"}, "allowed_hosts": ["testserver"]},
            "webhooks": {"orthanc": {"token": WEBHOOK_TOKEN}, "fhir": {"token": WEBHOOK_TOKEN}},
        }
    )


@pytest.fixture()
def api(tmp_path: Path, stub_pacs: StubPacs, fresh_fhir_peer: FhirPeer) -> Iterator[TestClient]:
    app = create_app(
        settings_for(tmp_path / "data", stub_pacs.dicomweb_url, fresh_fhir_peer.base_url),
        enqueue=lambda stage, ids: None,
    )
    with TestClient(app, headers=CREDENTIALS) as client:
        yield client


def engine_of(client: TestClient) -> Engine:
    return client.app.state.engine  # type: ignore[attr-defined, no-any-return]


def known_study(engine: Engine, pacs: StubPacs) -> str:
    uid = generate_uid()
    pacs.series[uid] = generate_uid()
    ref = StudyRef(
        study_uid=uid,
        patient_id="SW-RA-1",
        issuer=None,
        modalities=("CT",),
        description="CT HEAD",
        study_datetime=datetime.now(UTC) - timedelta(hours=1),
    )
    engine.store.add_study(ref, "test", datetime.now(UTC))
    return uid


def the_api_still_answers(client: TestClient) -> None:
    for path in ("/studies", "/failures", "/status", "/patients", "/metrics"):
        response = client.get(path)
        assert response.status_code == 200, (path, response.status_code, response.text[:300])


# -- the PACS ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("raw", "value"), HOSTILE, ids=IDS)
def test_a_pacs_retry_after_sends_the_study_to_retry_with_a_bounded_next_attempt(
    api: TestClient, stub_pacs: StubPacs, raw: str, value: float | str | None
) -> None:
    engine = engine_of(api)
    uid = known_study(engine, stub_pacs)
    stub_pacs.fault = Fault(503, raw)
    before = datetime.now(UTC)
    result = ingest_study(engine.services, uid)
    after = datetime.now(UTC)
    assert (result.status, result.outcome) == ("retry", Outcome.PACS_UNAVAILABLE.value)
    row = engine.store.get_study(uid)
    assert row is not None and row.status is StudyStatus.RETRY  # not left processing
    next_at = aware(row.next_attempt_at)
    hint = expected(value)
    backoff = engine.services.retry_backoff_s
    assert before + timedelta(seconds=max(backoff, hint or 0)) <= next_at
    assert next_at <= after + timedelta(seconds=max(backoff, hint or 0))
    assert next_at <= after + timedelta(seconds=CAP_S)
    the_api_still_answers(api)
    assert uid in [s["study_uid"] for s in api.get("/studies", params={"status": "retry"}).json()["items"]]


@pytest.mark.parametrize(("raw", "value"), HOSTILE, ids=IDS)
def test_a_webhook_meeting_a_busy_pacs_answers_503_with_a_bounded_retry_after(
    api: TestClient, stub_pacs: StubPacs, raw: str, value: float | str | None
) -> None:
    stub_pacs.fault = Fault(429, raw)
    response = api.post("/webhooks/orthanc/stable-study", json={"StudyInstanceUID": generate_uid()})
    assert response.status_code == 503, response.text
    assert response.json()["outcome"] == Outcome.PACS_UNAVAILABLE.value
    hint = expected(value)
    if hint:
        assert response.headers["retry-after"] == str(int(hint))
    else:
        assert "retry-after" not in response.headers
    stub_pacs.fault = None
    the_api_still_answers(api)


def test_a_trickling_pacs_is_cut_off_at_the_retrieve_deadline(api: TestClient, stub_pacs: StubPacs) -> None:
    engine = engine_of(api)
    uid = known_study(engine, stub_pacs)
    result = ingest_study(engine.services, uid)
    assert (result.status, result.outcome) == ("retry", Outcome.PACS_UNAVAILABLE.value)
    assert "STROKEWATCH_PACS__RETRIEVE_DEADLINE_S" in (result.reason or "")
    assert stub_pacs.trickled > 0  # it was sending, slowly, when the engine gave up
    row = engine.store.get_study(uid)
    assert row is not None and row.status is StudyStatus.RETRY and row.next_attempt_at is not None
    failures = api.get("/failures").json()["items"]
    assert any(f["outcome"] == Outcome.PACS_UNAVAILABLE.value and "RETRIEVE_DEADLINE" in f["message"] for f in failures)
    the_api_still_answers(api)


def test_the_retrieve_deadline_is_checked_on_an_injected_clock(stub_pacs: StubPacs) -> None:
    """The same cut-off with a clock that jumps 30 s per look: no waiting on the wall clock."""
    ticks = iter(range(0, 10**6, 30))
    uid = generate_uid()
    stub_pacs.series[uid] = generate_uid()
    pacs = DicomWebPacs(stub_pacs.dicomweb_url, retrieve_deadline_s=100, clock=lambda: float(next(ticks)))
    with pacs, pytest.raises(DomainError) as info:
        pacs.retrieve_series(uid, stub_pacs.series[uid])
    assert info.value.outcome is Outcome.PACS_UNAVAILABLE and info.value.retryable
    assert "cut off after 100 s" in info.value.message
    assert 0 < stub_pacs.trickled < 10  # a handful of chunks, then the clock ran out


# -- the EHR (FHIR sandbox) ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("raw", "value"), HOSTILE, ids=IDS)
def test_the_fhir_client_clamps_or_refuses_retry_after(
    fresh_fhir_peer: FhirPeer, raw: str, value: float | str | None
) -> None:
    waits: list[float] = []
    ehr = FhirEhr(
        fresh_fhir_peer.base_url,
        timeout=5,
        max_retries=1,
        backoff=0.01,
        max_retry_after=10,
        retry_after_cap_s=CAP_S,
        sleep=waits.append,
    )
    fresh_fhir_peer.inject_fault(status=429, count=5, retry_after=raw)
    with ehr, pytest.raises(DomainError) as info:
        ehr.search("Patient", {})
    fresh_fhir_peer.clear_faults()
    assert info.value.outcome is Outcome.EHR_UNAVAILABLE
    assert info.value.retry_after == expected(value)
    assert all(0 <= w <= 10 for w in waits)  # never waits in-process beyond max_retry_after


@pytest.fixture()
def fhir_engine(tmp_path: Path, fresh_orthanc_peer: OrthancPeer, fresh_fhir_peer: FhirPeer) -> Iterator[Engine]:
    from integration.bootstrap import bootstrap

    engine = bootstrap(settings_for(tmp_path / "data", fresh_orthanc_peer.dicomweb_url, fresh_fhir_peer.base_url))
    yield engine
    engine.close()


def scored_patient(engine: Engine, orthanc: OrthancPeer, fhir: FhirPeer) -> tuple[str, str]:
    """A patient with a study and vitals, assessed: (patient id, assessment identifier)."""
    from tests.integration.test_ingest_outcomes import add_patient, vital

    pid = add_patient(fhir.base_url, "SW-TEST-1", [vital("8867-4", 72, "/min", 5)])
    datasets = ct_series(generate_uid())
    store(orthanc, datasets)
    from integration.services.studies import register_study

    assert register_study(engine.services, str(datasets[0].StudyInstanceUID))
    assert ingest_study(engine.services, str(datasets[0].StudyInstanceUID)).status == "ready"
    sync_vitals(engine.services, pid)
    return pid, str(assess_patients(engine.services, [pid])[0].identifier)


@pytest.mark.parametrize(("raw", "value"), HOSTILE, ids=IDS)
def test_a_publish_throttled_with_any_retry_after_goes_to_retry_with_a_bounded_next_attempt(
    fhir_engine: Engine,
    fresh_orthanc_peer: OrthancPeer,
    fresh_fhir_peer: FhirPeer,
    raw: str,
    value: float | str | None,
) -> None:
    pid, ident = scored_patient(fhir_engine, fresh_orthanc_peer, fresh_fhir_peer)
    fresh_fhir_peer.inject_fault(status=503, count=10, retry_after=raw, path="RiskAssessment")
    before = datetime.now(UTC)
    assert publish(fhir_engine.services, ident) == "retry"
    after = datetime.now(UTC)
    fresh_fhir_peer.clear_faults()
    row = fhir_engine.store.get_assessment(ident)
    assert row is not None and row.status is AssessmentStatus.RETRY
    next_at = aware(row.next_attempt_at)
    assert before <= next_at <= after + timedelta(seconds=CAP_S)
    hint = expected(value)
    if hint:
        assert next_at >= before + timedelta(seconds=hint)


@pytest.mark.parametrize(("raw", "value"), HOSTILE[:8], ids=IDS[:8])
def test_a_vitals_sync_throttled_with_any_retry_after_backs_off_within_the_cap(
    fhir_engine: Engine,
    fresh_orthanc_peer: OrthancPeer,
    fresh_fhir_peer: FhirPeer,
    raw: str,
    value: float | str | None,
) -> None:
    pid, _ = scored_patient(fhir_engine, fresh_orthanc_peer, fresh_fhir_peer)
    fresh_fhir_peer.inject_fault(status=429, count=10, retry_after=raw, path="Observation")
    before = datetime.now(UTC)
    with pytest.raises(DomainError) as info:
        sync_vitals(fhir_engine.services, pid)
    after = datetime.now(UTC)
    fresh_fhir_peer.clear_faults()
    assert info.value.outcome is Outcome.EHR_UNAVAILABLE and info.value.retry_after == expected(value)
    patient = fhir_engine.store.get_patient(pid)
    assert patient is not None
    next_at = aware(patient.vitals_next_attempt_at)
    assert before < next_at <= after + timedelta(seconds=CAP_S)


# -- the OAuth2 token endpoint -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def oauth_peer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FhirPeer]:
    auth = FhirAuth(oauth_clients={CLIENT_ID: CLIENT_SECRET})
    with FhirPeer(tmp_path_factory.mktemp("fhir-oauth"), test_controls=True, auth=auth) as peer:
        yield peer


@pytest.mark.parametrize(("raw", "value"), HOSTILE, ids=IDS)
def test_a_throttled_token_endpoint_gives_a_bounded_hint_then_a_token(
    oauth_peer: FhirPeer, raw: str, value: float | str | None
) -> None:
    auth = ClientCredentialsAuth(oauth_peer.token_url, CLIENT_ID, CLIENT_SECRET, retry_after_cap_s=CAP_S)
    oauth_peer.inject_fault(status=429, count=1, retry_after=raw, path="oauth/token")
    try:
        with pytest.raises(DomainError) as info:
            auth.access_token()
        assert info.value.outcome is Outcome.EHR_UNAVAILABLE and info.value.retry_after == expected(value)
        assert auth.access_token()  # the fault is spent: the next fetch gets a token
    finally:
        oauth_peer.clear_faults()
        auth.close()


def test_the_token_client_times_out_after_the_configured_timeout(oauth_peer: FhirPeer) -> None:
    settings = AuthSettings(
        mode="oauth2", token_url=oauth_peer.token_url, client_id=CLIENT_ID, client_secret=CLIENT_SECRET, timeout_s=0.5
    )
    auth = build_auth(settings, timeout_s=30.0)  # auth.timeout_s wins over the peer's
    assert isinstance(auth, ClientCredentialsAuth)
    oauth_peer.inject_fault(delay_ms=3000, count=1, path="oauth/token")
    try:
        with pytest.raises(DomainError) as info:
            auth.access_token()
        assert info.value.outcome is Outcome.EHR_UNAVAILABLE and "Timeout" in info.value.message
    finally:
        oauth_peer.clear_faults()
        auth.close()
