"""Every door of the API asks for the right credential: an authorization matrix over every route of the OpenAPI
schema, a schemathesis fuzz run of the authenticated API, the start-up refusals, docs, hosts, CORS, the body limit
and the audit trail. Real Orthanc and FHIR sandbox behind the engine; the identity provider and the EHR that calls
CDS Hooks are `Idp`s serving their JWKS on loopback.
"""

from __future__ import annotations

import io
import json
import logging
import stat
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
import uvicorn
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, settings
from pydicom import dcmread
from schemathesis.checks import not_a_server_error

from integration.config import Settings
from integration.entrypoints.api.app import create_app
from integration.entrypoints.api.security.guard import ApiStartRefused
from integration.entrypoints.api.security.keys import digest, new_key
from integration.entrypoints.api.security.webhooks import SIGNATURE_HEADER, TIMESTAMP_HEADER, signature
from integration.entrypoints.processes import start_engine
from integration.services.assess import assess_patients, publish
from integration.services.studies import ingest_study, register_study
from integration.services.vitals import sync_vitals
from sandbox import FhirPeer, OrthancPeer, free_port
from tests.integration.test_api import MRN_SYSTEM, RecordingQueue, ct_head_study, patient_with_vitals, stow
from tests.integration.test_api_idp import Idp

pytestmark = pytest.mark.peers

OPERATE_KEY, READ_KEY = new_key(), new_key()
ORTHANC_SECRET, FHIR_SECRET = f"orthanc-{uuid.uuid4().hex}", f"fhir-{uuid.uuid4().hex}"
WEBHOOK_TOKEN = f"token-{uuid.uuid4().hex}"
AUDIENCE = "strokewatch-api"
SERVICE_PATH = "/cds-services/strokewatch-stroke-risk"

# What each route needs, as this test expects it (not read from the code): open routes are listed; every other GET
# needs read, every other method operate. A new route that the code leaves open fails the matrix.
PUBLIC = {("GET", "/health/live"), ("GET", "/cds-services")}
CDS = {("POST", SERVICE_PATH)}
WEBHOOKS = {("POST", "/webhooks/orthanc/stable-study"): "orthanc", ("POST", "/webhooks/fhir/subscription"): "fhir"}


def expected_access(method: str, path: str) -> str:
    if (method, path) in PUBLIC:
        return "public"
    if (method, path) in CDS:
        return "cds"
    if (method, path) in WEBHOOKS:
        return "webhook"
    return "read" if method == "GET" else "operate"


def base_settings(data_dir: Path, **extra: Any) -> dict[str, Any]:
    return {"sandbox": True, "data_dir": data_dir, **extra}


def auth_settings(
    data_dir: Path, orthanc: OrthancPeer, ehr_url: str, idp: Idp, cds_ehr: Idp, **api: Any
) -> Settings:
    return Settings.model_validate(
        {
            "sandbox": True,
            "data_dir": data_dir,
            "pacs": {"dicomweb_url": orthanc.dicomweb_url, "orthanc_url": orthanc.url, "kind": "orthanc"},
            "ehr": {"base_url": ehr_url, "patient_identifier_system": MRN_SYSTEM},
            "assessment_identifier_system": "urn:strokewatch:risk-assessment:auth-test",
            "api": {
                "keys": {"operator": f"operate:{digest(OPERATE_KEY)}", "viewer": f"read:{digest(READ_KEY)}"},
                "jwt": {"issuer": idp.issuer, "audience": AUDIENCE, "jwks_url": idp.jwks_url},
                "allowed_hosts": ["testserver", "127.0.0.1"],
                **api,
            },
            "cds_hooks": {"issuers": [{"iss": cds_ehr.issuer, "jwks_url": cds_ehr.jwks_url}],
                          "public_url": "http://testserver"},
            "webhooks": {"orthanc": {"secret": ORTHANC_SECRET, "token": WEBHOOK_TOKEN},
                         "fhir": {"secret": FHIR_SECRET, "token": WEBHOOK_TOKEN}},
        }
    )


@dataclass
class World:
    client: TestClient
    queue: RecordingQueue
    idp: Idp
    cds_ehr: Idp
    settings: Settings
    patient: str
    study_uid: str
    identifier: str  # the patient's published assessment


@pytest.fixture(scope="module")
def identity() -> Iterator[tuple[Idp, Idp]]:
    with Idp() as idp, Idp(issuer="https://ehr.test/fhir") as cds_ehr:
        yield idp, cds_ehr


@pytest.fixture(scope="module")
def world(
    identity: tuple[Idp, Idp], tmp_path_factory: pytest.TempPathFactory, orthanc_peer: OrthancPeer, fhir_peer: FhirPeer
) -> Iterator[World]:
    """One patient with a study, scored and published, behind the authenticated API."""
    orthanc_peer.reset()
    fhir_peer.reset()
    files = ct_head_study("AUTH-MRN-1")
    stow(orthanc_peer.dicomweb_url, files)
    uid = str(dcmread(io.BytesIO(files[0])).StudyInstanceUID)
    patient_with_vitals(fhir_peer.base_url, "AUTH-MRN-1")
    idp, cds_ehr = identity
    queue = RecordingQueue()
    settings_ = auth_settings(tmp_path_factory.mktemp("auth"), orthanc_peer, fhir_peer.base_url, idp, cds_ehr)
    with TestClient(create_app(settings_, enqueue=queue)) as client:
        svc = client.app.state.engine.services  # type: ignore[attr-defined]
        assert register_study(svc, uid, source="test")
        result = ingest_study(svc, uid)
        assert result.status == "ready" and result.patient_fhir_id, result
        sync_vitals(svc, result.patient_fhir_id)
        (assessed,) = assess_patients(svc, [result.patient_fhir_id])
        assert assessed.identifier and publish(svc, assessed.identifier) == "published"
        yield World(client, queue, idp, cds_ehr, settings_, result.patient_fhir_id, uid, assessed.identifier)


# -- the matrix ------------------------------------------------------------------------------------------------

CASES = ("none", "bad_signature", "expired", "wrong_audience", "wrong_role", "valid_token", "valid_api_key")


def request_for(world: World, method: str, path: str) -> tuple[str, bytes, dict[str, str]]:
    """A well-formed request for the route (so that, once admitted, it succeeds): URL, body, content type."""
    url = path.replace("{fhir_id}", world.patient).replace("{study_uid}", world.study_uid)
    url = url.replace("{identifier}", world.identifier)
    bodies: dict[tuple[str, str], Any] = {
        ("POST", "/webhooks/orthanc/stable-study"): {"StudyInstanceUID": world.study_uid},
        ("POST", "/webhooks/fhir/subscription"): {"resourceType": "Bundle", "type": "history", "entry": []},
        ("POST", SERVICE_PATH): {"hook": "patient-view", "hookInstance": str(uuid.uuid4()),
                                 "context": {"patientId": world.patient, "userId": "Practitioner/1"}},
    }
    body = json.dumps(bodies[(method, path)]).encode() if (method, path) in bodies else b""
    return url, body, ({"Content-Type": "application/json"} if body else {})


def api_token(world: World, **claims: Any) -> dict[str, str]:
    return {"Authorization": f"Bearer {world.idp.token(**{'aud': AUDIENCE, 'scope': 'strokewatch.operate', **claims})}"}


def cds_token(world: World, **claims: Any) -> dict[str, str]:
    cds_url = f"http://testserver{SERVICE_PATH}"
    return {"Authorization": f"Bearer {world.cds_ehr.token(**{'aud': cds_url, 'sub': 'ehr-client', **claims})}"}


def signed(secret: str, body: bytes, at: float | None = None) -> dict[str, str]:
    stamp = str(int(time.time() if at is None else at))
    return {TIMESTAMP_HEADER: stamp, SIGNATURE_HEADER: signature(secret, stamp, body)}


def credentials(world: World, access: str, case: str, path: str, body: bytes) -> dict[str, str]:
    if case == "none":
        return {}
    if case == "valid_api_key":
        return {"X-API-Key": OPERATE_KEY}
    if access == "webhook":
        secret = ORTHANC_SECRET if WEBHOOKS[("POST", path)] == "orthanc" else FHIR_SECRET
        other = FHIR_SECRET if secret == ORTHANC_SECRET else ORTHANC_SECRET
        return {
            "bad_signature": {**signed(secret, body), SIGNATURE_HEADER: "sha256=" + "0" * 64},
            "expired": signed(secret, body, at=time.time() - 3600),
            "wrong_audience": signed(other, body),  # the other source's secret
            "wrong_role": api_token(world),  # the API's credentials do not open a webhook
            "valid_token": signed(secret, body),
        }[case]
    if access == "cds":
        return {
            "bad_signature": {"Authorization": f"Bearer {world.cds_ehr.token(key='rogue', aud='x')}"},
            "expired": cds_token(world, lifetime_s=60, issued_ago_s=600),
            "wrong_audience": cds_token(world, aud="https://elsewhere.test/cds-services/strokewatch-stroke-risk"),
            "wrong_role": api_token(world),  # the hospital IdP is not a CDS client
            "valid_token": cds_token(world),
        }[case]
    return {
        "bad_signature": api_token(world, key="rogue"),
        "expired": api_token(world, lifetime_s=60, issued_ago_s=600),
        "wrong_audience": api_token(world, aud="another-api"),
        # read routes: a token without any StrokeWatch role; operate routes: a read-only token
        "wrong_role": api_token(world, scope="openid" if access == "read" else "openid strokewatch.read"),
        "valid_token": api_token(world),
    }.get(case, {})


def expected_status(access: str, case: str) -> str:
    if access == "public" or case == "valid_token":
        return "2xx"
    if case == "valid_api_key":
        return "2xx" if access in ("read", "operate") else "401"
    if case == "wrong_role" and access in ("read", "operate"):
        return "403"
    return "401"


def test_authorization_matrix_over_every_route_of_the_openapi_schema(world: World) -> None:
    schema = world.client.app.openapi()  # type: ignore[attr-defined]
    routes = [(m.upper(), p) for p, ops in schema["paths"].items() for m in ops]
    assert len(routes) >= 13, routes
    assert {("GET", "/patients/{fhir_id}"), ("POST", "/studies/{study_uid}/retry"), *PUBLIC, *CDS} <= set(routes)
    replays = {("POST", "/patients/{fhir_id}/reassess"), ("POST", "/assessments/{identifier}/republish")}
    assert replays <= set(routes)  # operator replays: operate role (the matrix below checks each case)
    wrong: list[str] = []
    for method, path in routes:
        access = expected_access(method, path)
        for case in CASES:
            url, body, ctype = request_for(world, method, path)
            headers = {**ctype, **credentials(world, access, case, path, body)}
            resp = world.client.request(method, url, content=body or None, headers=headers)
            want = expected_status(access, case)
            got = "2xx" if 200 <= resp.status_code < 300 else str(resp.status_code)
            if got != want:
                wrong.append(f"{method} {path} [{case}] -> {resp.status_code} (want {want}): {resp.text[:120]}")
            if got == "401":
                assert "WWW-Authenticate" in resp.headers, (method, path, case)
    assert wrong == [], "\n".join(wrong)


def test_a_read_key_reads_but_cannot_operate(world: World) -> None:
    read = {"X-API-Key": READ_KEY}
    assert world.client.get(f"/patients/{world.patient}", headers=read).status_code == 200
    refused = world.client.post(f"/studies/{world.study_uid}/retry", headers=read)
    assert refused.status_code == 403 and "key:viewer lacks the operate role" in refused.json()["detail"]
    assert world.client.get("/patients", headers={"X-API-Key": READ_KEY + "x"}).status_code == 401


def test_jwt_roles_from_a_roles_array_claim(
    world: World, tmp_path: Path, orthanc_peer: OrthancPeer, fhir_peer: FhirPeer
) -> None:
    settings_ = auth_settings(tmp_path, orthanc_peer, fhir_peer.base_url, world.idp, world.cds_ehr)
    settings_.api.jwt.roles_claim = "realm_access.roles"
    with TestClient(create_app(settings_, enqueue=RecordingQueue())) as client:
        def call(roles: list[str]) -> int:
            token = world.idp.token(aud=AUDIENCE, realm_access={"roles": roles})
            return client.post(f"/studies/{world.study_uid}/retry", headers={"Authorization": f"Bearer {token}"}
                               ).status_code
        assert call(["strokewatch.operate"]) == 404  # admitted; this app's fresh database has no such study
        assert call(["strokewatch.read"]) == 403
        assert call([]) == 403


def test_ready_and_metrics_are_protected_unless_set_public(
    world: World, tmp_path: Path, orthanc_peer: OrthancPeer, fhir_peer: FhirPeer
) -> None:
    assert world.client.get("/metrics").status_code == 401
    assert world.client.get("/health/ready").status_code == 401
    settings_ = auth_settings(tmp_path, orthanc_peer, fhir_peer.base_url, world.idp, world.cds_ehr,
                              ready_public=True, metrics_public=True)
    with TestClient(create_app(settings_, enqueue=RecordingQueue())) as client:
        assert client.get("/metrics").status_code == 200
        assert client.get("/health/ready").status_code == 200
        assert client.get("/patients").status_code == 401


# -- fuzzing -----------------------------------------------------------------------------------------------------

def _schema_app() -> Any:
    settings_ = Settings.model_validate(base_settings(Path("/nonexistent-strokewatch-schema-only")))
    return create_app(settings_, enqueue=lambda stage, ids: None).openapi()


fuzzed = schemathesis.openapi.from_dict(_schema_app())


@pytest.fixture(scope="module")
def served(world: World, orthanc_peer: OrthancPeer, fhir_peer: FhirPeer, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[str]:
    """The same API served by a real uvicorn on a free loopback port."""
    settings_ = auth_settings(tmp_path_factory.mktemp("fuzz"), orthanc_peer, fhir_peer.base_url, world.idp,
                              world.cds_ehr)
    settings_.cds_hooks.public_url = "http://testserver"
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(settings_, enqueue=RecordingQueue()), host="127.0.0.1",
                                           port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(30)


@fuzzed.parametrize()
@settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck))
def test_fuzzed_authenticated_api_has_no_server_errors(case: Any, served: str, world: World) -> None:
    path = case.operation.path
    if path.startswith("/webhooks/"):
        headers = {"Authorization": f"Bearer {WEBHOOK_TOKEN}"}
    elif path == SERVICE_PATH:
        headers = cds_token(world)
    else:
        headers = {"X-API-Key": OPERATE_KEY}
    response = case.call_and_validate(base_url=served, headers=headers, checks=[not_a_server_error], timeout=30)
    assert response.status_code not in (401, 403), response.text  # the fuzzing went past the door


# -- start-up, docs, hosts, CORS, body limit -----------------------------------------------------------------------

def test_outside_the_sandbox_the_api_refuses_to_start_without_auth_naming_the_settings(tmp_path: Path) -> None:
    with pytest.raises(ApiStartRefused) as refused:
        create_app(Settings.model_validate({"data_dir": tmp_path}), enqueue=RecordingQueue())
    message = str(refused.value)
    assert "STROKEWATCH_API__KEYS__<NAME>" in message and "STROKEWATCH_API__JWT__JWKS_URL" in message
    assert "strokewatch keys api-key" in message
    # `strokewatch run` says the same before it starts any process
    with pytest.raises(RuntimeError, match="STROKEWATCH_API__KEYS__"):
        start_engine(Settings.model_validate({"data_dir": tmp_path}), {}, detached=False)
    assert not (tmp_path / "logs").exists()  # nothing was spawned


def test_beyond_loopback_without_auth_is_refused_even_in_the_sandbox(tmp_path: Path) -> None:
    with pytest.raises(ApiStartRefused, match="STROKEWATCH_API_HOST=0.0.0.0"):
        create_app(Settings.model_validate(base_settings(tmp_path, api_host="0.0.0.0")), enqueue=RecordingQueue())
    keyed = base_settings(tmp_path, api_host="0.0.0.0", api={"keys": {"k": f"read:{digest(READ_KEY)}"}})
    create_app(Settings.model_validate(keyed), enqueue=RecordingQueue())  # with a credential it may


def test_docs_are_off_outside_the_sandbox_unless_asked_for(tmp_path: Path) -> None:
    api = {"keys": {"k": f"read:{digest(READ_KEY)}"}, "allowed_hosts": ["testserver"]}
    for docs, want in ((None, 404), (True, 200)):
        settings_ = Settings.model_validate({"data_dir": tmp_path, "api": {**api, "docs": docs}})
        client = TestClient(create_app(settings_, enqueue=RecordingQueue()))  # no lifespan: no peers needed
        assert client.get("/docs").status_code == want
        assert client.get("/openapi.json").status_code == want


def test_untrusted_host_oversized_body_and_cors(world: World) -> None:
    client = world.client
    assert client.get("/health/live", headers={"Host": "evil.example"}).status_code == 400
    big = b"{" + b" " * (1024 * 1024 + 10) + b"}"
    before = len(world.queue.sent)
    resp = client.post("/webhooks/fhir/subscription", content=big, headers=signed(FHIR_SECRET, big))
    assert resp.status_code == 413 and "STROKEWATCH_API__MAX_BODY_BYTES" in resp.text

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted as it arrives
        for _ in range(20):
            yield b" " * 65536

    assert client.post("/webhooks/fhir/subscription", content=chunks()).status_code == 413
    assert world.queue.sent[before:] == []
    # No CORS unless configured: a browser on another origin gets no permission.
    resp = client.get("/health/live", headers={"Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in resp.headers


def test_cors_only_for_configured_origins(tmp_path: Path) -> None:
    settings_ = Settings.model_validate(base_settings(tmp_path, api={
        "keys": {"k": f"read:{digest(READ_KEY)}"}, "allowed_hosts": ["testserver"],
        "cors_origins": ["https://dashboard.hospital.test"]}))
    client = TestClient(create_app(settings_, enqueue=RecordingQueue()))
    ok = client.get("/health/live", headers={"Origin": "https://dashboard.hospital.test"})
    assert ok.headers["access-control-allow-origin"] == "https://dashboard.hospital.test"
    other = client.get("/health/live", headers={"Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in other.headers


# -- the audit trail -----------------------------------------------------------------------------------------------

def _audit(settings_: Settings) -> list[dict[str, Any]]:
    path = settings_.data_dir / "audit" / "audit.log"
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_patient_data_access_is_audited_with_fhir_ids_only_in_a_private_file(world: World) -> None:
    client = world.client
    assert client.get(f"/patients/{world.patient}", headers={"X-API-Key": READ_KEY}).status_code == 200
    assert client.get(f"/patients/{world.patient}").status_code == 401
    assert client.get("/patients/AUTH-MRN-1", headers={"X-API-Key": READ_KEY}).status_code == 404
    client.get("/health/live")  # not patient data: not audited
    entries = _audit(world.settings)
    read = [e for e in entries if e["route"] == "/patients/{fhir_id}" and e["who"] == "key:viewer"]
    assert read[-2]["patients"] == [world.patient] and read[-2]["outcome"] == "allowed" and read[-2]["status"] == 200
    assert read[-1]["patients"] == [] and read[-1]["status"] == 404  # an id typed at random is not recorded
    denied = [e for e in entries if e["who"] == "anonymous" and e["route"] == "/patients/{fhir_id}"]
    assert denied and denied[-1]["outcome"] == "denied"
    assert not any(e["route"].startswith("/health") for e in entries)
    assert all(set(e) == {"at", "who", "auth", "method", "route", "status", "outcome", "patients", "studies"}
               for e in entries)
    text = (world.settings.data_dir / "audit" / "audit.log").read_text()
    assert "AUTH-MRN-1" not in text and OPERATE_KEY not in text and READ_KEY not in text
    audit_file = world.settings.data_dir / "audit" / "audit.log"
    assert stat.S_IMODE(audit_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(audit_file.parent.stat().st_mode) == 0o700


def test_audit_records_also_go_to_the_ehr_as_audit_events_and_an_ehr_failure_is_not_fatal(
    world: World, tmp_path: Path, orthanc_peer: OrthancPeer, fhir_peer: FhirPeer, caplog: pytest.LogCaptureFixture
) -> None:
    settings_ = auth_settings(world.settings.data_dir, orthanc_peer, fhir_peer.base_url, world.idp, world.cds_ehr,
                              audit_fhir=True)  # the same database: the patient is known
    with TestClient(create_app(settings_, enqueue=RecordingQueue())) as client:
        assert client.get(f"/patients/{world.patient}", headers={"X-API-Key": READ_KEY}).status_code == 200
    events = httpx.get(f"{fhir_peer.base_url}/AuditEvent", headers={"Accept": "application/fhir+json"}).json()
    mine = [e["resource"] for e in events.get("entry", [])
            if {"reference": f"Patient/{world.patient}"} in [x.get("what") for x in e["resource"].get("entity", [])]]
    assert mine, events
    assert mine[-1]["agent"][0]["who"]["display"] == "key:viewer" and mine[-1]["outcome"] == "0"

    closed = f"http://127.0.0.1:{free_port()}/fhir"
    settings_ = auth_settings(tmp_path / "b", orthanc_peer, closed, world.idp, world.cds_ehr, audit_fhir=True)
    settings_.ehr.max_retries = 0
    with caplog.at_level(logging.WARNING), TestClient(create_app(settings_, enqueue=RecordingQueue())) as client:
        assert client.get("/patients", headers={"X-API-Key": READ_KEY}).status_code == 200
    assert any("AuditEvent" in r.getMessage() and "audit log" in r.getMessage() for r in caplog.records)
    assert _audit(settings_)[-1]["route"] == "/patients"  # the file has it all the same
