"""Webhooks must be signed (HMAC-SHA256 over timestamp + body, per source) or carry the source's bearer token:
unsigned, wrongly signed, stale and replayed calls are refused and nothing is enqueued. Orthanc ids and DICOM UIDs
are checked by pattern before any request: the engine's PACS is the real Orthanc behind a recording proxy, so
"no request reached Orthanc" is observed, not assumed."""

from __future__ import annotations

import io
import json
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from pydicom import dcmread

from integration.adapters.dicomweb import DicomWebPacs
from integration.adapters.orthanc import OrthancChangeFeed
from integration.config import Settings
from integration.domain.ids import is_dicom_uid, is_orthanc_id
from integration.domain.types import DomainError
from integration.entrypoints.api.app import create_app
from integration.entrypoints.api.security.webhooks import SIGNATURE_HEADER, TIMESTAMP_HEADER, signature
from sandbox import FhirPeer, OrthancPeer
from tests.integration.test_api import RecordingQueue, ct_head_study, stow

pytestmark = pytest.mark.peers

ORTHANC_SECRET = f"orthanc-secret-{uuid.uuid4().hex}"
FHIR_TOKEN = f"fhir-token-{uuid.uuid4().hex}"
STABLE = "/webhooks/orthanc/stable-study"
SUBSCRIPTION = "/webhooks/fhir/subscription"
BAD_IDS = ["../instances/x/file", "x?y"]


class RecordingProxy:
    """Forwards every request to ``upstream`` (Orthanc) and records its method and path."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream.rstrip("/")
        self.seen: list[str] = []
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def _forward(self) -> None:
                proxy.seen.append(f"{self.command} {self.path}")
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "content-length")}
                answer = httpx.request(self.command, proxy.upstream + self.path, content=body, headers=headers,
                                       timeout=30)
                self.send_response(answer.status_code)
                for key, value in answer.headers.items():
                    if key.lower() not in ("content-length", "transfer-encoding", "connection", "content-encoding"):
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(answer.content)))
                self.end_headers()
                self.wfile.write(answer.content)

            do_GET = do_POST = _forward  # noqa: N815 - http.server's names

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


@dataclass
class Hooks:
    client: TestClient
    queue: RecordingQueue
    proxy: RecordingProxy
    study_uid: str
    orthanc_id: str


@pytest.fixture(scope="module")
def hooks(tmp_path_factory: pytest.TempPathFactory, orthanc_peer: OrthancPeer, fhir_peer: FhirPeer) -> Iterator[Hooks]:
    orthanc_peer.reset()
    files = ct_head_study("HOOK-MRN-1", n=4)
    stow(orthanc_peer.dicomweb_url, files)
    uid = str(dcmread(io.BytesIO(files[0])).StudyInstanceUID)
    found = httpx.post(f"{orthanc_peer.url}/tools/lookup", content=uid, headers=orthanc_peer.auth_headers()).json()
    (orthanc_id,) = [f["ID"] for f in found if f["Type"] == "Study"]
    proxy = RecordingProxy(orthanc_peer.url)
    settings = Settings.model_validate({
        "sandbox": True,
        "data_dir": tmp_path_factory.mktemp("hooks"),
        "pacs": {"dicomweb_url": f"{proxy.url}/dicom-web", "orthanc_url": proxy.url, "kind": "orthanc"},
        "ehr": {"base_url": fhir_peer.base_url},
        "api": {"allowed_hosts": ["testserver"]},
        "webhooks": {"orthanc": {"secret": ORTHANC_SECRET}, "fhir": {"token": FHIR_TOKEN}},
    })
    queue = RecordingQueue()
    with TestClient(create_app(settings, enqueue=queue)) as client:
        yield Hooks(client, queue, proxy, uid, orthanc_id)
    proxy.close()


def signed(body: bytes, *, secret: str = ORTHANC_SECRET, at: float | None = None) -> dict[str, str]:
    stamp = str(int(time.time() if at is None else at))
    return {TIMESTAMP_HEADER: stamp, SIGNATURE_HEADER: signature(secret, stamp, body),
            "Content-Type": "application/json"}


def post(hooks: Hooks, body: dict[str, Any], headers: dict[str, str] | None = None, path: str = STABLE) -> Any:
    raw = json.dumps(body).encode()
    return hooks.client.post(path, content=raw, headers=signed(raw) if headers is None else headers)


def refused(hooks: Hooks, resp: Any, status: int, reason: str) -> None:
    assert resp.status_code == status, resp.text
    assert reason in resp.json()["detail"], resp.json()


def test_a_signed_call_is_accepted_and_enqueued(hooks: Hooks) -> None:
    before = len(hooks.queue.sent)
    resp = post(hooks, {"ID": hooks.orthanc_id})
    assert resp.status_code == 202, resp.text
    assert resp.json()["study_uid"] == hooks.study_uid
    assert hooks.queue.sent[before:] == [("ingest", [hooks.study_uid])]


def test_respond_async_answers_first_and_registers_after(hooks: Hooks) -> None:
    """Orthanc's Lua holds its event lock until the call returns: with ``Prefer: respond-async`` the answer does not
    wait for the PACS lookup (done after it, here by the test client before it hands the response back)."""
    before, seen = len(hooks.queue.sent), len(hooks.proxy.seen)
    raw = json.dumps({"ID": hooks.orthanc_id, "StudyInstanceUID": hooks.study_uid}).encode()
    resp = hooks.client.post(STABLE, content=raw, headers={**signed(raw), "Prefer": "respond-async"})
    assert resp.status_code == 202 and resp.json() == {"study_uid": hooks.study_uid, "enqueued": True}
    assert hooks.queue.sent[before:] == [("ingest", [hooks.study_uid])]
    assert len(hooks.proxy.seen) > seen  # the PACS was asked (QIDO-RS), after the answer

    unknown = "1.2.826.0.1.3680043.8.498.1234567890"
    raw = json.dumps({"StudyInstanceUID": unknown}).encode()
    before = len(hooks.queue.sent)
    resp = hooks.client.post(STABLE, content=raw, headers={**signed(raw), "Prefer": "respond-async"})
    assert resp.status_code == 202  # answered before the PACS said it does not know it: logged, nothing queued
    assert hooks.queue.sent[before:] == []


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("unsigned", "unsigned webhook: send X-StrokeWatch-Signature"),
        ("wrong_signature", "signature does not match"),
        ("other_secret", "signature does not match"),
        ("body_changed", "signature does not match"),
        ("stale", "stale webhook"),
        ("future", "stale webhook"),
        ("bad_timestamp", "must be unix seconds"),
        ("bearer", "unsigned webhook"),  # the Orthanc source has a secret only: a bearer token opens nothing
    ],
)
def test_unsigned_wrongly_signed_and_stale_calls_are_refused_and_nothing_is_enqueued(
    hooks: Hooks, case: str, reason: str
) -> None:
    body = json.dumps({"StudyInstanceUID": hooks.study_uid}).encode()
    headers = {
        "unsigned": {"Content-Type": "application/json"},
        "wrong_signature": {**signed(body), SIGNATURE_HEADER: "sha256=" + "ab" * 32},
        "other_secret": signed(body, secret="a-different-secret-0123456789"),
        "body_changed": signed(body.replace(b"}", b', "x": 1}')),
        "stale": signed(body, at=time.time() - 301),
        "future": signed(body, at=time.time() + 600),
        "bad_timestamp": {**signed(body), TIMESTAMP_HEADER: "yesterday"},
        "bearer": {"Authorization": f"Bearer {FHIR_TOKEN}", "Content-Type": "application/json"},
    }[case]
    before, seen = len(hooks.queue.sent), len(hooks.proxy.seen)
    resp = hooks.client.post(STABLE, content=body, headers=headers)
    refused(hooks, resp, 401, reason)
    assert hooks.queue.sent[before:] == [] and hooks.proxy.seen[seen:] == []


def test_a_replayed_call_is_refused(hooks: Hooks) -> None:
    body = json.dumps({"StudyInstanceUID": hooks.study_uid}).encode()
    headers = signed(body)
    assert hooks.client.post(STABLE, content=body, headers=headers).status_code == 202
    before, seen = len(hooks.queue.sent), len(hooks.proxy.seen)
    again = hooks.client.post(STABLE, content=body, headers=headers)
    refused(hooks, again, 401, "replayed webhook")
    assert hooks.queue.sent[before:] == [] and hooks.proxy.seen[seen:] == []


def test_the_fhir_source_takes_its_bearer_token_and_nothing_else(hooks: Hooks) -> None:
    bundle = {"resourceType": "Bundle", "type": "history", "entry": []}
    ok = post(hooks, bundle, {"Authorization": f"Bearer {FHIR_TOKEN}"}, SUBSCRIPTION)
    assert ok.status_code == 202, ok.text
    before = len(hooks.queue.sent)
    wrong = post(hooks, bundle, {"Authorization": f"Bearer {FHIR_TOKEN}x"}, SUBSCRIPTION)
    refused(hooks, wrong, 401, "bearer token does not match")
    hmac_signed = post(hooks, bundle, None, SUBSCRIPTION)  # signed with Orthanc's secret; fhir has no secret
    refused(hooks, hmac_signed, 401, "STROKEWATCH_WEBHOOKS__FHIR__SECRET")
    assert hooks.queue.sent[before:] == []


@pytest.mark.parametrize("bad", BAD_IDS)
@pytest.mark.parametrize("field", ["ID", "StudyInstanceUID"])
def test_ids_that_are_not_orthanc_ids_or_uids_never_reach_orthanc(hooks: Hooks, field: str, bad: str) -> None:
    before, seen = len(hooks.queue.sent), len(hooks.proxy.seen)
    resp = post(hooks, {field: bad})  # properly signed: only the id is wrong
    assert resp.status_code == 422, resp.text
    assert "not a DICOM UID" in resp.text or "not an Orthanc id" in resp.text
    assert hooks.queue.sent[before:] == [] and hooks.proxy.seen[seen:] == []


@pytest.mark.parametrize("bad", BAD_IDS)
def test_the_adapters_refuse_them_too_before_any_request(hooks: Hooks, bad: str) -> None:
    seen = len(hooks.proxy.seen)
    feed = OrthancChangeFeed(hooks.proxy.url)
    pacs = DicomWebPacs(f"{hooks.proxy.url}/dicom-web")
    try:
        with pytest.raises(ValueError, match="not an Orthanc id"):
            feed.study_uid(bad)
        with pytest.raises(DomainError, match="not a DICOM UID"):
            pacs.get_study(bad)
        with pytest.raises(DomainError, match="not a DICOM UID"):
            pacs.list_series(bad)
        with pytest.raises(DomainError, match="not a DICOM UID"):
            pacs.retrieve_series(hooks.study_uid, bad)
    finally:
        feed.close()
        pacs.close()
    assert hooks.proxy.seen[seen:] == []
    # the real ones still work through the same proxy
    assert OrthancChangeFeed(hooks.proxy.url).study_uid(hooks.orthanc_id) == hooks.study_uid


@pytest.mark.parametrize(
    ("value", "uid", "orthanc"),
    [
        ("1.2.840.10008.5.1.4.1.1.2", True, False),
        ("0.0", True, False),
        ("1.02.3", False, False),  # a component with a leading zero
        ("1." + "2" * 63, False, False),  # 65 characters
        ("1.2.", False, False),
        ("../instances/x/file", False, False),
        ("x?y", False, False),
        ("6b5e9b51-8a4e0f3a-a3fc1c7a-9fa3e6d1-6c5e7b9a", False, True),
        ("6B5E9B51-8A4E0F3A-A3FC1C7A-9FA3E6D1-6C5E7B9A", False, False),
        ("6b5e9b51-8a4e0f3a-a3fc1c7a-9fa3e6d1", False, False),
    ],
)
def test_id_patterns(value: str, uid: bool, orthanc: bool) -> None:
    assert is_dicom_uid(value) is uid
    assert is_orthanc_id(value) is orthanc
