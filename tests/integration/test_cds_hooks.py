"""CDS Hooks 2.0 "Trusting CDS Clients" with real signed tokens: the EHR's keys are published as a JWKS on loopback,
the engine runs against the real Orthanc and FHIR sandbox. Valid, expired, wrong aud, unknown issuer, replayed jti,
jku not allow-listed, iat in the future, a token that lives too long; discovery stays open; the client's
fhirAuthorization is never logged or stored."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from integration.config import Settings
from integration.entrypoints.api.app import create_app
from sandbox import FhirPeer, OrthancPeer
from tests.integration.test_api import RecordingQueue
from tests.integration.test_api_idp import Idp

pytestmark = pytest.mark.peers

SERVICE = "/cds-services/strokewatch-stroke-risk"
AUD = f"https://strokewatch.hospital.test{SERVICE}"


def hook(patient: str = "p-1", **extra: Any) -> dict[str, Any]:
    return {"hook": "patient-view", "hookInstance": str(uuid.uuid4()), "context": {"patientId": patient}, **extra}


class Cds:
    def __init__(self, client: TestClient, ehr: Idp, mirror: Idp, data_dir: Path) -> None:
        self.client, self.ehr, self.mirror, self.data_dir = client, ehr, mirror, data_dir

    def call(self, token: str | None, body: dict[str, Any] | None = None) -> Any:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return self.client.post(SERVICE, json=body or hook(), headers=headers)


@pytest.fixture(scope="module")
def cds(tmp_path_factory: pytest.TempPathFactory, orthanc_peer: OrthancPeer, fhir_peer: FhirPeer) -> Iterator[Cds]:
    data_dir = tmp_path_factory.mktemp("cds")
    # ``mirror`` publishes the same EHR's keys at a second URL, allow-listed as a jku of that issuer.
    with Idp(issuer="https://ehr.hospital.test/fhir") as ehr, Idp(issuer=ehr.issuer) as mirror:
        mirror.rsa, mirror.ec = ehr.rsa, ehr.ec
        settings = Settings.model_validate({
            "sandbox": True,
            "data_dir": data_dir,
            "pacs": {"dicomweb_url": orthanc_peer.dicomweb_url, "orthanc_url": orthanc_peer.url, "kind": "orthanc"},
            "ehr": {"base_url": fhir_peer.base_url},
            "api": {"keys": {}, "allowed_hosts": ["testserver"]},
            "cds_hooks": {"issuers": [{"iss": ehr.issuer, "jwks_url": ehr.jwks_url, "jku": [mirror.jwks_url]}],
                          "public_url": "https://strokewatch.hospital.test"},
        })
        with TestClient(create_app(settings, enqueue=RecordingQueue())) as client:
            yield Cds(client, ehr, mirror, data_dir)


def test_discovery_is_open(cds: Cds) -> None:
    services = cds.client.get("/cds-services").json()["services"]
    assert [s["id"] for s in services] == ["strokewatch-stroke-risk"]


def test_a_valid_token_from_the_allow_listed_ehr_is_answered(cds: Cds) -> None:
    for key in ("rsa", "ec"):
        resp = cds.call(cds.ehr.token(key=key, aud=AUD))
        assert resp.status_code == 200, resp.text
        assert resp.json() == {"cards": []}  # a patient StrokeWatch does not follow


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("none", "needs the EHR's JWT"),
        ("expired", "token expired"),
        ("wrong_aud", "audience is not this service"),
        ("iat_future", "not yet valid"),
        ("too_long", "lives longer than 300 s"),
        ("no_jti", "lacks the 'jti' claim"),
        ("forged", "signature does not verify"),
    ],
)
def test_invalid_tokens_are_refused_with_401(cds: Cds, case: str, reason: str) -> None:
    token = {
        "none": None,
        "expired": cds.ehr.token(aud=AUD, lifetime_s=120, issued_ago_s=900),
        "wrong_aud": cds.ehr.token(aud="https://other-service.test/cds-services/x"),
        "iat_future": cds.ehr.token(aud=AUD, issued_ago_s=-600),
        "too_long": cds.ehr.token(aud=AUD, lifetime_s=3600),
        "no_jti": cds.ehr.token(aud=AUD, jti=None),
        "forged": cds.ehr.token(key="rogue", aud=AUD),
    }[case]
    resp = cds.call(token)
    assert resp.status_code == 401, resp.text
    assert reason in resp.json()["detail"]
    assert resp.headers["WWW-Authenticate"].startswith("Bearer")


def test_an_issuer_not_on_the_allow_list_is_refused_without_fetching_its_keys(cds: Cds) -> None:
    with Idp(issuer="https://stranger.test/fhir") as stranger:
        resp = cds.call(stranger.token(aud=AUD, headers={"jku": stranger.jwks_url}))
        assert resp.status_code == 401 and "not on the CDS Hooks allow-list" in resp.json()["detail"]
        assert stranger.requests == []


def test_a_replayed_jti_is_refused(cds: Cds) -> None:
    token = cds.ehr.token(aud=AUD)
    assert cds.call(token).status_code == 200
    again = cds.call(token)
    assert again.status_code == 401 and "jti replayed" in again.json()["detail"]


def test_jku_only_when_allow_listed_for_the_issuer(cds: Cds) -> None:
    with Idp(issuer=cds.ehr.issuer) as attacker:  # claims to be the EHR, publishes its own keys
        attacker.kids = dict(cds.ehr.kids)
        resp = cds.call(attacker.token(aud=AUD, headers={"jku": attacker.jwks_url}))
        assert resp.status_code == 401 and "jku not allow-listed" in resp.json()["detail"]
        assert attacker.requests == []  # never fetched
    before = len(cds.mirror.requests)
    assert cds.call(cds.ehr.token(aud=AUD, headers={"jku": cds.mirror.jwks_url})).status_code == 200
    assert len(cds.mirror.requests) == before + 1  # the allow-listed jku was used


def test_fhir_authorization_is_never_logged_or_stored(cds: Cds, caplog: pytest.LogCaptureFixture) -> None:
    secret = f"ehr-access-token-{uuid.uuid4().hex}"
    body = hook(fhirServer="https://ehr.hospital.test/fhir", fhirAuthorization={
        "access_token": secret, "token_type": "Bearer", "expires_in": 300, "scope": "patient/*.read",
        "subject": "strokewatch"})
    with caplog.at_level(logging.DEBUG):
        assert cds.call(cds.ehr.token(aud=AUD), body).status_code == 200
        bad = cds.call(cds.ehr.token(aud=AUD), {**body, "hook": "order-sign"})
        assert bad.status_code == 400 and secret not in bad.text
        refused = cds.call(cds.ehr.token(aud=AUD, lifetime_s=60, issued_ago_s=600), body)  # logged: refused
        assert refused.status_code == 401 and secret not in refused.text
    assert caplog.records and not any(secret in r.getMessage() for r in caplog.records)
    time.sleep(0.1)
    for path in cds.data_dir.rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path
    audit = (cds.data_dir / "audit" / "audit.log").read_text()
    assert '"who":"cds:tester"' in audit and '"patients":["p-1"]' in audit
