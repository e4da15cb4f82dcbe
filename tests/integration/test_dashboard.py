"""The dashboard's routes against a real SQLite database and the real sandbox peers (Orthanc, FHIR sandbox), with a
patient really ingested, synced, scored and published in-process: who may open the pages (outside the sandbox a
credential or the sign-in's session cookie; in the sandbox on loopback, open), CSRF on the forms, what the pages
show, the picture PNG (from the scored volume, and read back from the PACS when the volume is gone), bounded
queries, the audit trail, and no patient data in the logs. The browser test is tests/e2e/test_dashboard_browser.py.
"""

from __future__ import annotations

import io
import json
import re
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from pydicom import dcmread

from integration.adapters.db import dashboard as views
from integration.config import Settings
from integration.entrypoints.api.app import create_app
from integration.entrypoints.api.security.dashboard import CSRF_COOKIE, SESSION_COOKIE
from integration.entrypoints.api.security.keys import digest, new_key
from sandbox import FhirPeer, OrthancPeer
from tests.integration.test_api import (
    MRN_SYSTEM,
    Captured,
    Loaded,
    RecordingQueue,
    ct_head_study,
    patient_with_vitals,
    stow,
)

pytestmark = pytest.mark.peers

OPERATE_KEY, READ_KEY = new_key(), new_key()
MRN, UNMATCHED_MRN = "DASH-MRN-1", "DASH-MRN-2"
BIRTH_DATE = "1950-02-03"  # patient_with_vitals' birth date: PHI that must not reach a log


def settings(data_dir: Path, pacs: OrthancPeer, fhir: FhirPeer, **extra: Any) -> Settings:
    values: dict[str, Any] = {
        "data_dir": data_dir,
        "pacs": {"dicomweb_url": pacs.dicomweb_url, "orthanc_url": pacs.url, "kind": "orthanc"},
        "ehr": {"base_url": fhir.base_url, "patient_identifier_system": MRN_SYSTEM},
        "assessment_identifier_system": "urn:strokewatch:risk-assessment:dashboard-test",
        "api": {"keys": {"ops": f"operate:{digest(OPERATE_KEY)}", "viewer": f"read:{digest(READ_KEY)}"},
                "allowed_hosts": ["testserver"]},
    }
    values.update(extra)
    return Settings.model_validate(values)


@dataclass
class World:
    client: TestClient  # outside the sandbox, no credentials by default
    queue: RecordingQueue
    patient_id: str
    matched: Loaded
    unmatched: Loaded
    data_dir: Path

    @property
    def engine(self) -> Any:
        return self.client.app.state.engine  # type: ignore[attr-defined]


@pytest.fixture(scope="module")
def logs() -> Iterator[Captured]:
    import logging

    root, handler = logging.getLogger(), Captured()
    level = root.level
    root.setLevel(logging.INFO)
    root.addHandler(handler)
    yield handler
    root.removeHandler(handler)
    root.setLevel(level)


@pytest.fixture(scope="module")
def world(
    logs: Captured, tmp_path_factory: pytest.TempPathFactory, orthanc_peer: OrthancPeer, fhir_peer: FhirPeer
) -> Iterator[World]:
    from integration.services.assess import assess_patients, publish
    from integration.services.studies import ingest_study, register_study
    from integration.services.vitals import sync_vitals

    orthanc_peer.reset()
    fhir_peer.reset()
    loaded = []
    for mrn in (MRN, UNMATCHED_MRN):
        files = ct_head_study(mrn)
        stow(orthanc_peer.dicomweb_url, files)
        loaded.append(Loaded(mrn, str(dcmread(io.BytesIO(files[0])).StudyInstanceUID)))
    patient_with_vitals(fhir_peer.base_url, MRN)
    queue = RecordingQueue()
    data_dir = tmp_path_factory.mktemp("dashboard")
    app = create_app(settings(data_dir, orthanc_peer, fhir_peer), enqueue=queue)
    with TestClient(app, follow_redirects=False) as client:
        svc = client.app.state.engine.services  # type: ignore[attr-defined]
        svc.store.snapshot_stages(svc.clock.now(), 0.0, 10)  # a copy of the stage histogram before the work ...
        for item in loaded:
            register_study(svc, item.study_uid)
            ingest_study(svc, item.study_uid)
        study = svc.store.get_study(loaded[0].study_uid)
        assert study is not None and study.patient_fhir_id, study
        sync_vitals(svc, study.patient_fhir_id)
        (result,) = assess_patients(svc, [study.patient_fhir_id])
        assert result.identifier, result
        assert publish(svc, result.identifier) == "published"
        svc.store.snapshot_stages(svc.clock.now(), 0.0, 10)  # ... and after it: one interval of percentiles
        yield World(client, queue, study.patient_fhir_id, loaded[0], loaded[1], data_dir)


def browser(world: World) -> TestClient:
    """A browser of its own: a client with its own cookie jar on the running app."""
    return TestClient(world.client.app, follow_redirects=False)


def signed_in(world: World, key: str) -> TestClient:
    """A browser that signed in with ``key``."""
    b = browser(world)
    form = b.get("/dashboard/login")
    assert CSRF_COOKIE in form.cookies
    resp = b.post("/dashboard/login", data={"credential": key, "next": "/dashboard", "csrf_token": csrf_of(form.text)})
    assert resp.status_code == 303, resp.text
    assert resp.headers["location"] == "/dashboard"
    set_cookie = resp.headers["set-cookie"]
    assert "HttpOnly" in set_cookie and "SameSite=strict" in set_cookie and "Path=/dashboard" in set_cookie
    return b


def csrf_of(page: str) -> str:
    return re.search(r'name="csrf_token" value="([0-9a-f]+)"', page).group(1)  # type: ignore[union-attr]


def test_outside_the_sandbox_every_page_needs_a_credential(world: World) -> None:
    pid = world.patient_id
    for path in ("/dashboard", f"/dashboard/patients/{pid}", f"/dashboard/patients/{pid}/image.png",
                 "/dashboard/failures"):
        resp = world.client.get(path)
        assert resp.status_code == 303, path
        assert resp.headers["location"].startswith("/dashboard/login?next=%2Fdashboard"), resp.headers
    assert world.client.post("/dashboard/failures/1/replay", data={"csrf_token": "x"}).status_code == 401
    # a wrong key or a forged cookie is no credential
    assert world.client.get("/dashboard", headers={"X-API-Key": new_key()}).status_code == 401
    forger = browser(world)
    forger.cookies.set(SESSION_COOKIE, "eyJ3aG8iOiJrZXk6b3BzIiwicm9sZXMiOlsib3BlcmF0ZSJdLCJleHAiOjk5OTk5OTk5OTl9.00",
                       path="/dashboard")
    assert forger.get("/dashboard").status_code == 303
    # the sign-in form, the scripts and the licence are open
    assert world.client.get("/dashboard/login").status_code == 200
    js = world.client.get("/dashboard/static/uPlot.iife.min.js")
    assert js.status_code == 200 and "uPlot" in js.text[:2000]
    assert "MIT" in world.client.get("/dashboard/static/uPlot.LICENSE").text


def test_an_api_key_header_opens_the_pages_as_for_the_api(world: World) -> None:
    resp = world.client.get("/dashboard", headers={"X-API-Key": READ_KEY})
    assert resp.status_code == 200
    assert world.patient_id in resp.text
    assert resp.headers["cache-control"] == "no-store"
    assert "script-src 'self'" in resp.headers["content-security-policy"]


def test_sign_in_gives_a_session_cookie_that_opens_the_pages(world: World) -> None:
    b = signed_in(world, READ_KEY)
    resp = b.get(f"/dashboard/patients/{world.patient_id}")
    assert resp.status_code == 200, resp.text
    assert "key:viewer" in resp.text  # who is signed in


def test_a_session_ends_with_its_key_and_follows_its_role(
    world: World, orthanc_peer: OrthancPeer, fhir_peer: FhirPeer
) -> None:
    cookie = signed_in(world, READ_KEY).cookies[SESSION_COOKIE]
    for viewer, want in ((None, 303), (f"operate:{digest(READ_KEY)}", 200)):
        keys = {"ops": f"operate:{digest(OPERATE_KEY)}", **({"viewer": viewer} if viewer else {})}
        restarted = settings(world.data_dir, orthanc_peer, fhir_peer,  # the same data_dir: the same session key
                             api={"keys": keys, "allowed_hosts": ["testserver"]})
        with TestClient(create_app(restarted, enqueue=RecordingQueue()), follow_redirects=False) as b:
            b.cookies.set(SESSION_COOKIE, cookie, path="/dashboard")
            page = b.get("/dashboard/failures")
            assert page.status_code == want, viewer
            if want == 200:  # the key is an operate key now: its session may replay
                replay = re.search(r'action="(/dashboard/failures/\d+/replay)"', page.text)
                assert replay is not None


def test_sign_in_with_a_wrong_credential_or_without_csrf_is_refused(world: World) -> None:
    b = browser(world)
    token = csrf_of(b.get("/dashboard/login").text)
    wrong = b.post("/dashboard/login", data={"credential": new_key(), "csrf_token": token})
    assert wrong.status_code == 401 and SESSION_COOKIE not in wrong.cookies
    assert "not accepted" in wrong.text
    no_csrf = b.post("/dashboard/login", data={"credential": OPERATE_KEY, "csrf_token": "0" * 64})
    assert no_csrf.status_code == 403 and SESSION_COOKIE not in no_csrf.cookies
    other = browser(world)  # a token is worth nothing with another browser's cookie
    other.get("/dashboard/login")
    assert other.post("/dashboard/login", data={"credential": OPERATE_KEY, "csrf_token": token}).status_code == 403
    # an open redirect through ?next= is not possible
    resp = b.post("/dashboard/login", data={"credential": OPERATE_KEY, "csrf_token": token, "next": "//evil.example/x"})
    assert resp.status_code == 303 and resp.headers["location"] == "/dashboard"


def test_replay_needs_operate_and_the_csrf_token_and_queues_the_retry(world: World) -> None:
    reader = signed_in(world, READ_KEY)
    page = reader.get("/dashboard/failures")  # the unmatched study's failure is there
    assert page.status_code == 200
    ids = re.findall(r'action="/dashboard/failures/(\d+)/replay"', page.text)
    assert ids, page.text
    failure_id = ids[0]
    refused = reader.post(f"/dashboard/failures/{failure_id}/replay", data={"csrf_token": csrf_of(page.text)})
    assert refused.status_code == 403  # read role

    operator = signed_in(world, OPERATE_KEY)
    token = csrf_of(operator.get("/dashboard/failures").text)
    assert operator.post(f"/dashboard/failures/{failure_id}/replay", data={"csrf_token": "f" * 64}).status_code == 403
    cross = operator.post(f"/dashboard/failures/{failure_id}/replay", data={"csrf_token": token},
                          headers={"Origin": "http://evil.example"})
    assert cross.status_code == 403
    world.queue.sent.clear()
    done = operator.post(f"/dashboard/failures/{failure_id}/replay", data={"csrf_token": token})
    assert done.status_code == 303, done.text
    assert done.headers["location"].startswith("/dashboard/failures?done=")
    assert ("ingest", [world.unmatched.study_uid]) in world.queue.sent


def test_overview_shows_states_queues_latency_failures_and_patients(world: World) -> None:
    resp = world.client.get("/dashboard", headers={"X-API-Key": READ_KEY})
    html = resp.text
    assert 'data-count="assessments-published">1<' in html
    assert "Queues" in html and "held (patient not in the EHR)" in html
    assert "unmatched_patient" in html  # open failures by outcome
    assert f'href="/dashboard/patients/{world.patient_id}"' in html
    data = json.loads(re.search(r'<script type="application/json" id="latency-data">(.*?)</script>', html).group(1))
    assert data["times"] and "model" in data["stages"]
    model_p50 = data["p50"][data["stages"].index("model")]
    assert any(v is not None and v > 0 for v in model_p50)


def test_patient_page_shows_risk_drivers_vitals_links(world: World) -> None:
    resp = world.client.get(f"/dashboard/patients/{world.patient_id}", headers={"X-API-Key": READ_KEY})
    html = resp.text
    current = world.engine.store.latest_assessment(world.patient_id)
    assert f"{current.probability * 100:.1f}%" in html
    assert f'id="current-band">{current.band}<' in html
    vitals = json.loads(re.search(r'id="vitals-data">(.*?)</script>', html).group(1))
    assert vitals["end"] - vitals["start"] == 28 * 24 * 3600  # the model's whole window
    heart = next(v for v in vitals["plots"] if v["key"] == "hr")
    assert len(heart["data"][0]) == 12 and sorted(heart["data"][1]) == [71 + 2 * k for k in range(12)]
    risk = json.loads(re.search(r'id="risk-data">(.*?)</script>', html).group(1))
    assert risk["data"][1] == [round(current.probability, 4)]
    assert f"/RiskAssessment/{current.fhir_id}" in html and f"/Patient/{world.patient_id}" in html
    assert f"/studies/{world.matched.study_uid}/series/" in html  # the PACS series used
    assert "/Observation/" in html
    assert BIRTH_DATE in html  # PHI on the page is fine for an authenticated clinician
    assert world.client.get("/dashboard/patients/nobody", headers={"X-API-Key": READ_KEY}).status_code == 404


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def png_pixels(data: bytes) -> np.ndarray:
    width, height = png_size(data)
    raw = zlib.decompress(data[data.index(b"IDAT") + 4:data.index(b"IEND") - 8])
    rows = np.frombuffer(raw, dtype=np.uint8).reshape(height, 1 + width * 3)
    assert (rows[:, 0] == 0).all()
    return rows[:, 1:].reshape(height, width, 3)


def test_picture_is_the_key_slice_with_its_heat_map_then_read_back_from_the_pacs(world: World) -> None:
    url = f"/dashboard/patients/{world.patient_id}/image.png"
    resp = world.client.get(url, headers={"X-API-Key": READ_KEY})
    assert resp.status_code == 200 and resp.headers["content-type"] == "image/png"
    assert png_size(resp.content) == (256, 256)
    pixels = png_pixels(resp.content)
    assert resp.headers["x-strokewatch-overlay"] == "1"
    coloured = (pixels[:, :, 0].astype(int) - pixels[:, :, 2].astype(int)) > 30  # red/yellow over grey
    assert coloured.any(), "the heat-map is drawn over the slice"

    # the scored volume removed (retention): the series is read back from the PACS, drawn without the heat-map
    study = world.engine.store.get_study(world.matched.study_uid)
    Path(study.volume_path).rename(Path(study.volume_path).with_suffix(".away"))
    try:
        world.client.app.state.pictures.clear()  # type: ignore[attr-defined]
        again = world.client.get(url, headers={"X-API-Key": READ_KEY})
        assert again.status_code == 200 and again.headers["x-strokewatch-overlay"] == "0"
        grey = png_pixels(again.content)
        assert (grey[:, :, 0] == grey[:, :, 2]).all() and grey.max() > 0
        assert world.engine.store.get_study(world.matched.study_uid).status.value == "ready"  # nothing re-queued
    finally:
        Path(study.volume_path).with_suffix(".away").rename(study.volume_path)


def test_patient_page_queries_are_bounded(world: World) -> None:
    page = views.patient_page(world.engine.store.sessions, world.patient_id, ehr_base_url=None,
                              max_assessments=1, max_vitals=5)
    assert page is not None
    assert len(page.vitals) == 5 and page.vitals_truncated
    assert [v.effective for v in page.vitals] == sorted(v.effective for v in page.vitals)  # the newest five, in order
    assert len(page.assessments) == 1 and page.total_assessments == 1
    assert len(views.recent_patients(world.engine.store.sessions, limit=1)) == 1


def test_patient_pages_are_audited_by_fhir_id_and_logs_carry_no_phi(world: World, logs: Captured) -> None:
    world.client.get(f"/dashboard/patients/{world.patient_id}", headers={"X-API-Key": READ_KEY})
    audit = (world.data_dir / "audit" / "audit.log").read_text()
    line = [json.loads(x) for x in audit.splitlines() if "/dashboard/patients/{fhir_id}" in x][-1]
    assert line["patients"] == [world.patient_id] and line["who"] == "key:viewer"
    text = "\n".join(logs.lines)
    for phi in (MRN, UNMATCHED_MRN, BIRTH_DATE, "Api^Test"):
        assert phi not in text


def test_in_the_sandbox_on_loopback_the_pages_are_open(
    tmp_path: Path, orthanc_peer: OrthancPeer, fhir_peer: FhirPeer
) -> None:
    open_app = create_app(settings(tmp_path / "a", orthanc_peer, fhir_peer, sandbox=True), enqueue=RecordingQueue())
    with TestClient(open_app, follow_redirects=False) as client:
        assert client.get("/dashboard").status_code == 200
        assert client.get("/patients").status_code == 401  # the JSON API is not
    closed = settings(tmp_path / "b", orthanc_peer, fhir_peer, sandbox=True, dashboard={"open_in_sandbox": False})
    with TestClient(create_app(closed, enqueue=RecordingQueue()), follow_redirects=False) as client:
        assert client.get("/dashboard").status_code == 303
    beyond = settings(tmp_path / "c", orthanc_peer, fhir_peer, sandbox=True, api_host="0.0.0.0")
    with TestClient(create_app(beyond, enqueue=RecordingQueue()), follow_redirects=False) as client:
        assert client.get("/dashboard").status_code == 303  # beyond loopback: never open


# -- the CDS Hooks card and the SMART App Launch from the EHR ---------------------------------------------------

class SmartEhr:
    """The authorization side of an EHR on loopback (SMART App Launch, EHR launch): smart-configuration, an
    authorize endpoint that signs its clinician in at once, and a token endpoint that checks the PKCE verifier."""

    def __init__(self, patient: str) -> None:
        import hashlib
        import threading
        from base64 import urlsafe_b64encode
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
        from urllib.parse import parse_qs, urlencode, urlsplit

        self.patient = patient
        self.grants: dict[str, dict[str, str]] = {}
        ehr = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def _send(self, status: int, body: dict[str, Any] | None = None, location: str | None = None) -> None:
                data = json.dumps(body or {}).encode()
                self.send_response(status)
                if location:
                    self.send_header("Location", location)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:  # noqa: N802
                url = urlsplit(self.path)
                if url.path == "/fhir/.well-known/smart-configuration":
                    self._send(200, {"authorization_endpoint": f"{ehr.base}/auth/authorize",
                                     "token_endpoint": f"{ehr.base}/auth/token",
                                     "code_challenge_methods_supported": ["S256"]})
                elif url.path == "/auth/authorize":
                    q = {k: v[0] for k, v in parse_qs(url.query).items()}
                    if q.get("client_id") != "dashboard-app" or q.get("aud") != f"{ehr.base}/fhir" or q.get(
                            "code_challenge_method") != "S256" or q.get("launch") != "launch-123":
                        self._send(400, {"error": "invalid_request"})
                        return
                    code = f"code-{len(ehr.grants)}"
                    ehr.grants[code] = q
                    self._send(302, location=f"{q['redirect_uri']}?{urlencode({'code': code, 'state': q['state']})}")
                else:
                    self._send(404)

            def do_POST(self) -> None:  # noqa: N802
                form = {k: v[0] for k, v in parse_qs(self.rfile.read(int(self.headers["Content-Length"])).decode())
                        .items()}
                grant = ehr.grants.pop(form.get("code", ""), None)
                challenge = urlsafe_b64encode(hashlib.sha256(form.get("code_verifier", "").encode()).digest())
                if grant is None or challenge.decode().rstrip("=") != grant["code_challenge"] or form.get(
                        "redirect_uri") != grant["redirect_uri"]:
                    self._send(400, {"error": "invalid_grant"})
                    return
                self._send(200, {"access_token": "secret-token", "token_type": "Bearer", "patient": ehr.patient,
                                 "fhirUser": "Practitioner/dr-1", "scope": grant["scope"]})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_cds_card_links_to_the_dashboard_and_offers_the_smart_launch(
    world: World, orthanc_peer: OrthancPeer, fhir_peer: FhirPeer
) -> None:
    from tests.integration.test_api_idp import Idp

    with Idp(issuer="https://ehr.test/fhir") as ehr:
        cds = {"issuers": [{"iss": ehr.issuer, "jwks_url": ehr.jwks_url}], "public_url": "http://testserver"}
        app_settings = settings(world.data_dir, orthanc_peer, fhir_peer, cds_hooks=cds,
                                public_base_url="https://strokewatch.hospital.test",
                                dashboard={"smart_client_id": "dashboard-app"})
        with TestClient(create_app(app_settings, enqueue=RecordingQueue())) as client:
            body = {"hook": "patient-view", "hookInstance": "h1", "context": {"patientId": world.patient_id}}
            aud = "http://testserver/cds-services/strokewatch-stroke-risk"
            plain = client.post("/cds-services/strokewatch-stroke-risk", json=body,
                                headers={"Authorization": f"Bearer {ehr.token(aud=aud)}"}).json()["cards"][0]
            launched = client.post("/cds-services/strokewatch-stroke-risk", json={**body, "fhirServer": ehr.issuer},
                                   headers={"Authorization": f"Bearer {ehr.token(aud=aud)}"}).json()["cards"][0]
    page = f"https://strokewatch.hospital.test/dashboard/patients/{world.patient_id}"
    assert [(link["type"], link["url"]) for link in plain["links"][1:]] == [("absolute", page)]
    smart = launched["links"][-1]
    assert smart["type"] == "smart" and smart["url"] == "https://strokewatch.hospital.test/dashboard/launch"
    assert json.loads(smart["appContext"]) == {"patient": world.patient_id}


def test_smart_launch_from_the_ehr_signs_in_and_opens_the_patient(
    world: World, orthanc_peer: OrthancPeer, fhir_peer: FhirPeer, logs: Captured
) -> None:
    import httpx

    ehr = SmartEhr(world.patient_id)
    try:
        fake_ehr = type("Peer", (), {"base_url": f"{ehr.base}/fhir"})()
        app_settings = settings(world.data_dir, orthanc_peer, fake_ehr, dashboard={"smart_client_id": "dashboard-app"})
        with TestClient(create_app(app_settings, enqueue=RecordingQueue()), follow_redirects=False) as b:
            assert b.get("/dashboard/launch", params={"iss": "https://other.test/fhir", "launch": "x"}
                         ).status_code == 400  # only our EHR may launch it
            start = b.get("/dashboard/launch", params={"iss": f"{ehr.base}/fhir", "launch": "launch-123"})
            assert start.status_code == 303 and start.headers["location"].startswith(f"{ehr.base}/auth/authorize?")
            assert "samesite=lax" in start.headers["set-cookie"].lower()
            back = httpx.get(start.headers["location"], follow_redirects=False)  # the EHR signs its clinician in
            assert back.status_code == 302, back.text
            callback = httpx.URL(back.headers["location"])
            assert callback.path == "/dashboard/launch/callback"
            forged = b.get("/dashboard/launch/callback", params={"code": callback.params["code"], "state": "forged"})
            assert forged.status_code == 400
            done = b.get("/dashboard/launch/callback", params=dict(callback.params))
            assert done.status_code == 200, done.text
            target = f"/dashboard/patients/{world.patient_id}"
            assert f'url={target}"' in done.text and SESSION_COOKIE in done.cookies
            page = b.get(target)
            assert page.status_code == 200 and "smart:Practitioner/dr-1" in page.text
            assert b.post("/dashboard/failures/1/replay", data={"csrf_token": csrf_of(page.text)}).status_code == 403
            again = b.get("/dashboard/launch/callback", params=dict(callback.params))  # the code is spent
            assert again.status_code in (400, 502)
        closed = settings(world.data_dir, orthanc_peer, fake_ehr)
        with TestClient(create_app(closed, enqueue=RecordingQueue()), follow_redirects=False) as b:
            assert b.get("/dashboard/launch", params={"iss": f"{ehr.base}/fhir", "launch": "x"}).status_code == 404
    finally:
        ehr.close()
    assert not any("secret-token" in line for line in logs.lines)
