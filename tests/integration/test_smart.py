"""SMART Backend Services against the real FHIR sandbox, which verifies each client assertion against the JWKS
that `strokewatch keys jwks` printed and limits tokens to the granted scopes.

- the engine's whole flow (Orthanc -> ingest -> vitals -> assess -> publish) authenticates by private_key_jwt,
  with the token endpoint discovered and one token reused for every request;
- a key the EHR does not know, an expired assertion (clock skew), a replayed jti and a missing scope each fail
  with a named reason, and the doctor's `ehr auth` check says which setting (or clock) to fix;
- `strokewatch keys generate` + `keys jwks` round-trip: the printed JWKS verifies what the key signs.
"""

from __future__ import annotations

import json
import stat
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from pydicom.uid import generate_uid
from typer.testing import CliRunner

from integration.adapters.fhir import FhirEhr
from integration.adapters.smart import (
    ASSERTION_TYPE,
    SmartBackendAuth,
    client_assertion,
    key_alg,
    load_private_key,
    public_jwk,
    write_key_pair,
)
from integration.bootstrap import Engine, bootstrap, build_auth, open_probes
from integration.config import SMART_DEFAULT_SCOPE, AuthSettings, Settings
from integration.domain.checks import CheckResult
from integration.domain.types import DomainError, Outcome
from integration.entrypoints.cli import app
from integration.services import doctor
from integration.services.assess import assess_patients, publish
from integration.services.studies import ingest_study, register_study
from integration.services.vitals import sync_vitals
from sandbox.fhir import FhirAuth, FhirPeer, SmartClient
from tests.integration.test_dicomweb_orthanc import ct_series, store

pytestmark = pytest.mark.peers

MRN_SYSTEM = "urn:oid:1.2.36.146.595.217.0.1"
CLIENT = "sw-backend"  # registered with an ES384 and an RS384 key and every system scope
LIMITED = "sw-no-riskassessment"  # registered without system/RiskAssessment.c
LIMITED_SCOPES = "system/Patient.rs system/Observation.rs system/Device.cu"
SEED_TOKEN = "seed-token-for-tests"  # a static bearer the test uses to put patients into the EHR

runner = CliRunner()


@dataclass(frozen=True)
class Keys:
    es384: Path  # private keys, made by `strokewatch keys generate`
    rs384: Path
    unregistered: Path  # a key the EHR has never seen
    jwks: Path  # what `strokewatch keys jwks` printed for es384 and rs384, registered for CLIENT and LIMITED


def cli(*args: str) -> str:
    result = runner.invoke(app, list(args))
    assert result.exit_code == 0, result.output
    return result.output


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    root = tmp_path_factory.mktemp("smart-keys")
    cli("keys", "generate", "--alg", "ES384", "--out", str(root / "es"))
    cli("keys", "generate", "--alg", "RS384", "--out", str(root / "rs"))
    printed = [json.loads(cli("keys", "jwks", "--key", str(root / d / "private-key.pem"))) for d in ("es", "rs")]
    registered = root / "registered-jwks.json"
    registered.write_text(json.dumps({"keys": [k for jwks in printed for k in jwks["keys"]]}))
    unregistered, _ = write_key_pair(root / "other", "ES384")
    return Keys(root / "es" / "private-key.pem", root / "rs" / "private-key.pem", unregistered, registered)


@pytest.fixture(scope="module")
def ehr(tmp_path_factory: pytest.TempPathFactory, keys: Keys) -> Iterator[FhirPeer]:
    clients = {CLIENT: SmartClient(keys.jwks), LIMITED: SmartClient(keys.jwks, LIMITED_SCOPES)}
    auth = FhirAuth(bearer=SEED_TOKEN, smart_clients=clients)
    with FhirPeer(tmp_path_factory.mktemp("smart-fhir"), auth=auth, test_controls=True) as peer:
        yield peer


def smart_auth(key: Path, **extra: Any) -> dict[str, Any]:
    return {"mode": "smart-backend", "client_id": CLIENT, "private_key_file": key, **extra}


def settings(tmp_path: Path, pacs_url: str, ehr_url: str, auth: dict[str, Any]) -> Settings:
    return Settings(
        sandbox=False,
        data_dir=tmp_path / "data",
        pacs={"dicomweb_url": pacs_url, "kind": "generic"},
        ehr={"base_url": ehr_url, "patient_identifier_system": MRN_SYSTEM, "max_retries": 0, "timeout_s": 10,
             "auth": auth},
    )


def seed_patient(ehr: FhirPeer, mrn: str) -> str:
    """A synthetic patient (no name, no birth date) with a heart rate five hours ago, written with the seed token."""
    headers = {"Authorization": f"Bearer {SEED_TOKEN}"}
    with httpx.Client(base_url=ehr.base_url, headers=headers, timeout=10) as http:
        patient = {"resourceType": "Patient", "identifier": [{"system": MRN_SYSTEM, "value": mrn}]}
        pid = str(http.post("/Patient", json=patient).raise_for_status().json()["id"])
        when = (datetime.now(UTC) - timedelta(hours=5)).isoformat(timespec="seconds")
        http.post("/Observation", json={
            "resourceType": "Observation", "status": "final", "subject": {"reference": f"Patient/{pid}"},
            "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category",
                                      "code": "vital-signs"}]}],
            "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]},
            "effectiveDateTime": when,
            "valueQuantity": {"value": 72, "unit": "/min", "system": "http://unitsofmeasure.org", "code": "/min"},
        }).raise_for_status()
    return pid


def risk_assessments(ehr: FhirPeer, pid: str) -> list[dict[str, Any]]:
    headers = {"Authorization": f"Bearer {SEED_TOKEN}"}
    bundle = httpx.get(f"{ehr.base_url}/RiskAssessment", params={"subject": f"Patient/{pid}"}, headers=headers)
    return [e["resource"] for e in bundle.raise_for_status().json().get("entry", [])]


def flow(engine: Engine, orthanc: Any, ehr: FhirPeer) -> tuple[str, str]:
    """Ingest a fresh study for a fresh patient, sync vitals, assess: the patient's id and the assessment's."""
    mrn = f"SW-SMART-{uuid.uuid4().hex[:8]}"
    pid = seed_patient(ehr, mrn)
    taken = datetime.now() - timedelta(hours=1)  # the PACS's local time, as modalities write it
    series = ct_series(generate_uid(), patient_id=mrn, study_date=f"{taken:%Y%m%d}", study_time=f"{taken:%H%M%S}")
    store(orthanc, series)
    uid = str(series[0].StudyInstanceUID)
    assert register_study(engine.services, uid)
    ingested = ingest_study(engine.services, uid)
    assert ingested.status == "ready" and ingested.patient_fhir_id == pid, ingested
    assert sync_vitals(engine.services, pid).accepted == 1
    assessed = assess_patients(engine.services, [pid])[0]
    assert assessed.status == "scored" and assessed.identifier, assessed
    return pid, assessed.identifier


def ehr_auth_check(s: Settings) -> CheckResult:
    """`strokewatch doctor`'s `ehr auth` line for these settings."""
    results = {r.name: r for r in doctor.run_checks(s, open_probes)}
    return results["ehr auth"]


def no_secret_in(text: str, *secrets: str) -> None:
    for secret in secrets:
        assert secret not in text


# -- the engine, end to end --------------------------------------------------------------------------------------


@pytest.mark.parametrize("alg", ["ES384", "RS384"])
def test_engine_flow_authenticates_by_private_key_jwt(
    tmp_path: Path, fresh_orthanc_peer: Any, ehr: FhirPeer, keys: Keys, alg: str
) -> None:
    key = keys.es384 if alg == "ES384" else keys.rs384
    before = ehr.stats()
    engine = bootstrap(settings(tmp_path, fresh_orthanc_peer.dicomweb_url, ehr.base_url, smart_auth(key)))
    try:
        auth = engine.ehr._auth
        assert isinstance(auth, SmartBackendAuth) and auth.alg == alg
        pid, identifier = flow(engine, fresh_orthanc_peer, ehr)
        assert publish(engine.services, identifier) == "published"
    finally:
        engine.close()
    written = risk_assessments(ehr, pid)
    assert len(written) == 1 and written[0]["identifier"][0]["value"] == identifier
    after = ehr.stats()
    # Patient match, Observation search, Device + RiskAssessment creates: one token for all of them.
    assert after["requests"] - before["requests"] >= 4
    assert after["tokenRequests"] - before["tokenRequests"] == 1
    assert after["tokensIssued"] - before["tokensIssued"] == 1
    assert auth.token_url == ehr.token_url  # discovered from .well-known/smart-configuration
    assert auth.scope == SMART_DEFAULT_SCOPE


def test_token_is_reused_until_due_then_refreshed(ehr: FhirPeer, keys: Keys) -> None:
    now = [1000.0]
    key = load_private_key(keys.es384)
    auth = SmartBackendAuth(ehr.base_url, CLIENT, key, alg="ES384", kid=public_jwk(key, "ES384")["kid"],
                            clock=lambda: now[0])
    try:
        before = ehr.stats()["tokenRequests"]
        first = auth.access_token()
        assert auth.access_token() == first
        now[0] += 3600 - 61  # the sandbox's tokens last 3600 s; a new one is fetched 60 s before expiry
        assert auth.access_token() == first
        now[0] += 2
        second = auth.access_token()
        assert second != first and ehr.stats()["tokenRequests"] - before == 2
    finally:
        auth.close()


def test_missing_scope_at_the_ehr_is_a_403_recorded_on_publish(
    tmp_path: Path, fresh_orthanc_peer: Any, ehr: FhirPeer, keys: Keys
) -> None:
    # The client asks only for what it is registered for, so its token is fine -- but it cannot write the result.
    auth = smart_auth(keys.rs384, client_id=LIMITED, scope=LIMITED_SCOPES)
    engine = bootstrap(settings(tmp_path, fresh_orthanc_peer.dicomweb_url, ehr.base_url, auth))
    try:
        pid, identifier = flow(engine, fresh_orthanc_peer, ehr)
        assert publish(engine.services, identifier) == "failed"
        row = engine.store.get_assessment(identifier)
    finally:
        engine.close()
    assert row is not None and row.outcome == Outcome.EHR_REJECTED.value
    assert "403" in (row.reason or "") and "system/RiskAssessment.c" in (row.reason or "")
    assert risk_assessments(ehr, pid) == []


# -- failures, each named ------------------------------------------------------------------------------------------


def test_unregistered_key_fails_clearly(tmp_path: Path, fresh_orthanc_peer: Any, ehr: FhirPeer, keys: Keys) -> None:
    s = settings(tmp_path, fresh_orthanc_peer.dicomweb_url, ehr.base_url, smart_auth(keys.unregistered))
    check = ehr_auth_check(s)
    assert not check.ok and "invalid_client" in check.detail and "no key with kid" in check.detail
    assert "keys jwks" in (check.hint or "") and "STROKEWATCH_EHR__AUTH__PRIVATE_KEY_FILE" in (check.hint or "")

    # The same failure in the running engine: the study's patient cannot be matched, and the outcome says why.
    engine = bootstrap(s)
    try:
        series = ct_series(generate_uid(), patient_id="SW-SMART-NOKEY")
        store(fresh_orthanc_peer, series)
        uid = str(series[0].StudyInstanceUID)
        assert register_study(engine.services, uid)
        result = ingest_study(engine.services, uid)
    finally:
        engine.close()
    assert result.outcome == Outcome.EHR_REJECTED.value and "no key with kid" in (result.reason or "")


def test_wrong_key_under_the_registered_kid_fails_the_signature(ehr: FhirPeer, keys: Keys) -> None:
    registered = load_private_key(keys.es384)
    impostor = load_private_key(keys.unregistered)
    auth = SmartBackendAuth(ehr.base_url, CLIENT, impostor, alg="ES384", kid=public_jwk(registered, "ES384")["kid"])
    with FhirEhr(ehr.base_url, auth=auth) as client:
        check = {r.name: r for r in client.probe(quick=False)}["ehr auth"]
    assert not check.ok and "signature does not verify" in check.detail
    assert "register the JWKS" in (check.hint or "")


def test_expired_assertion_names_the_clock(ehr: FhirPeer, keys: Keys) -> None:
    key = load_private_key(keys.es384)
    slow = SmartBackendAuth(ehr.base_url, CLIENT, key, alg="ES384", kid=public_jwk(key, "ES384")["kid"],
                            wall_clock=lambda: time.time() - 600)  # this machine's clock ten minutes behind
    with FhirEhr(ehr.base_url, auth=slow) as client:
        check = {r.name: r for r in client.probe(quick=False)}["ehr auth"]
        with pytest.raises(DomainError) as raised:
            client.search("Patient", {"identifier": f"{MRN_SYSTEM}|none"})
    assert not check.ok and "has expired" in check.detail
    assert "behind the EHR's" in (check.hint or "") and "NTP" in (check.hint or "")
    assert raised.value.outcome is Outcome.EHR_REJECTED and "has expired" in raised.value.message


def test_missing_scope_in_the_granted_token_is_named(
    tmp_path: Path, fresh_orthanc_peer: Any, ehr: FhirPeer, keys: Keys
) -> None:
    # LIMITED asks for the default scopes; the EHR grants all but system/RiskAssessment.c.
    s = settings(tmp_path, fresh_orthanc_peer.dicomweb_url, ehr.base_url, smart_auth(keys.es384, client_id=LIMITED))
    check = ehr_auth_check(s)
    assert not check.ok and "without system/RiskAssessment.c" in check.detail
    assert "STROKEWATCH_EHR__AUTH__SCOPE" in (check.hint or "")


def test_doctor_passes_with_smart_backend(tmp_path: Path, fresh_orthanc_peer: Any, ehr: FhirPeer, keys: Keys) -> None:
    s = settings(tmp_path, fresh_orthanc_peer.dicomweb_url, ehr.base_url, smart_auth(keys.rs384))
    check = ehr_auth_check(s)
    assert check.ok, check
    assert "SMART Backend Services (RS384" in check.detail and ehr.token_url in check.detail


def test_discovery_refuses_an_ehr_without_private_key_jwt(keys: Keys) -> None:
    document = {"token_endpoint": "http://127.0.0.1:9/token", "token_endpoint_auth_methods_supported": [
        "client_secret_basic"]}
    with StaticJson(document) as base_url:
        key = load_private_key(keys.es384)
        auth = SmartBackendAuth(base_url, CLIENT, key, alg="ES384", kid="k")
        check = auth.probe_token("ehr", quick=False)
        with pytest.raises(DomainError) as raised:
            auth.access_token()
        auth.close()
    assert not check.ok and "does not accept private_key_jwt (offers: client_secret_basic)" in check.detail
    assert "STROKEWATCH_EHR__AUTH__TOKEN_URL" in (check.hint or "")
    assert raised.value.outcome is Outcome.EHR_REJECTED


# -- the sandbox's token endpoint: what it verifies ------------------------------------------------------------------


def post_assertion(ehr: FhirPeer, assertion: str, scope: str = "system/Patient.rs") -> httpx.Response:
    form = {"grant_type": "client_credentials", "scope": scope, "client_assertion_type": ASSERTION_TYPE,
            "client_assertion": assertion}
    return httpx.post(ehr.token_url, data=form, timeout=10)


def signed(key_file: Path, ehr: FhirPeer, **changes: Any) -> str:
    key = load_private_key(key_file)
    alg = key_alg(key)
    now = int(time.time())
    claims = {"iss": CLIENT, "sub": CLIENT, "aud": ehr.token_url, "jti": str(uuid.uuid4()), "iat": now,
              "exp": now + 240, **changes.pop("claims", {})}
    if "exp_in" in changes:  # relative to signing, not to collection: a long suite must not age the case
        claims["exp"] = now + changes.pop("exp_in")
    header = {"kid": public_jwk(key, alg)["kid"], **changes.pop("header", {})}
    return jwt.encode({k: v for k, v in claims.items() if v is not None}, key, algorithm=alg, headers=header)


@pytest.mark.parametrize(
    ("changes", "refusal"),
    [
        ({"exp_in": -30}, "has expired"),
        ({"claims": {"exp": None}}, "no exp"),
        ({"exp_in": 900}, "at most 300 s"),
        ({"claims": {"aud": "https://elsewhere.example/token"}}, "aud must be this token URL"),
        ({"claims": {"sub": "someone-else"}}, "sub must equal iss"),
        ({"claims": {"iss": "unknown-client", "sub": "unknown-client"}}, "unknown client"),
        ({"header": {"kid": "not-registered"}}, "no key with kid not-registered"),
        ({"claims": {"jti": None}}, "needs a jti"),
    ],
)
def test_token_endpoint_verifies_each_claim(ehr: FhirPeer, keys: Keys, changes: dict[str, Any], refusal: str) -> None:
    response = post_assertion(ehr, signed(keys.es384, ehr, **changes))
    assert response.status_code == 401 and response.json()["error"] == "invalid_client"
    assert refusal in response.json()["error_description"]


def test_token_endpoint_refuses_a_reused_jti_and_unsigned_assertions(ehr: FhirPeer, keys: Keys) -> None:
    assertion = signed(keys.rs384, ehr)
    assert post_assertion(ehr, assertion).status_code == 200
    replayed = post_assertion(ehr, assertion)
    assert replayed.status_code == 401 and "jti was used before" in replayed.json()["error_description"]

    header, claims, _ = signed(keys.es384, ehr).split(".")
    assert "signature does not verify" in post_assertion(ehr, f"{header}.{claims}.AAAA").json()["error_description"]
    unsigned = jwt.encode({"iss": CLIENT, "sub": CLIENT, "aud": ehr.token_url, "jti": "x", "exp": time.time() + 60},
                          key=None, algorithm="none", headers={"kid": "k"})
    assert "alg none is not supported" in post_assertion(ehr, unsigned).json()["error_description"]


def test_tokens_carry_only_granted_scopes_and_the_ehr_enforces_them(ehr: FhirPeer, keys: Keys) -> None:
    wanted = "system/Patient.rs system/RiskAssessment.c"
    limited = post_assertion(ehr, signed(keys.es384, ehr, claims={"iss": LIMITED, "sub": LIMITED}), scope=wanted)
    assert limited.status_code == 200 and limited.json()["scope"] == "system/Patient.rs"
    bearer = {"Authorization": f"Bearer {limited.json()['access_token']}"}
    assert httpx.get(f"{ehr.base_url}/Patient", headers=bearer).status_code == 200
    assessment = {"resourceType": "RiskAssessment", "status": "final", "subject": {"reference": "Patient/x"}}
    refused = httpx.post(f"{ehr.base_url}/RiskAssessment", json=assessment, headers=bearer)
    assert refused.status_code == 403 and "system/RiskAssessment.c" in refused.text
    in_a_bundle = {"resourceType": "Bundle", "type": "transaction",
                   "entry": [{"resource": assessment, "request": {"method": "POST", "url": "RiskAssessment"}}]}
    assert httpx.post(ehr.base_url, json=in_a_bundle, headers=bearer).status_code == 403

    full = post_assertion(ehr, signed(keys.es384, ehr), scope=wanted)
    assert full.json()["scope"] == wanted
    created = httpx.post(f"{ehr.base_url}/RiskAssessment", json=assessment,
                         headers={"Authorization": f"Bearer {full.json()['access_token']}"})
    assert created.status_code == 201

    none = post_assertion(ehr, signed(keys.es384, ehr, claims={"iss": LIMITED, "sub": LIMITED}),
                          scope="system/RiskAssessment.c")
    assert none.status_code == 400 and none.json()["error"] == "invalid_scope"


def test_smart_configuration_offers_private_key_jwt(ehr: FhirPeer) -> None:
    document = httpx.get(f"{ehr.base_url}/.well-known/smart-configuration").json()
    assert document["token_endpoint"] == ehr.token_url
    assert "private_key_jwt" in document["token_endpoint_auth_methods_supported"]
    assert {"RS384", "ES384"} <= set(document["token_endpoint_auth_signing_alg_values_supported"])


# -- keys: generate, print, load -------------------------------------------------------------------------------------


@pytest.mark.parametrize("alg", ["RS384", "ES384"])
def test_keys_generate_and_jwks_round_trip(tmp_path: Path, alg: str) -> None:
    cli("keys", "generate", "--alg", alg, "--out", str(tmp_path / "k"))
    private = tmp_path / "k" / "private-key.pem"
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    printed = json.loads(cli("keys", "jwks", "--key", str(private)))
    [jwk] = printed["keys"]
    assert jwk["alg"] == alg and jwk["use"] == "sig" and jwk["kid"]
    assert "d" not in jwk and "p" not in jwk  # public members only
    assert json.loads((tmp_path / "k" / "jwks.json").read_text()) == printed

    key = load_private_key(private)
    assertion = client_assertion(key, key_alg(key), jwk["kid"], "client", "https://ehr.example/token", time.time())
    assert jwt.get_unverified_header(assertion)["kid"] == jwk["kid"]
    claims = jwt.decode(assertion, jwt.PyJWK(jwk).key, algorithms=[alg], audience="https://ehr.example/token")
    assert claims["iss"] == claims["sub"] == "client" and 0 < claims["exp"] - time.time() <= 300

    other = json.loads(cli("keys", "jwks", "--key", str(write_key_pair(tmp_path / "o", alg)[0])))["keys"][0]
    with pytest.raises(jwt.InvalidSignatureError):
        jwt.decode(assertion, jwt.PyJWK(other).key, algorithms=[alg], audience="https://ehr.example/token")

    again = runner.invoke(app, ["keys", "generate", "--alg", alg, "--out", str(tmp_path / "k")])
    assert again.exit_code == 1 and "never overwritten" in again.output


def test_encrypted_key_needs_its_passphrase(tmp_path: Path) -> None:
    secret_file = tmp_path / "passphrase"
    secret_file.write_text("a long passphrase for tests\n")
    cli("keys", "generate", "--alg", "ES384", "--out", str(tmp_path / "k"), "--passphrase-file", str(secret_file))
    private = tmp_path / "k" / "private-key.pem"
    assert b"ENCRYPTED" in private.read_bytes()
    without = runner.invoke(app, ["keys", "jwks", "--key", str(private)])
    assert without.exit_code == 1 and "encrypted" in without.output
    printed = json.loads(cli("keys", "jwks", "--key", str(private), "--passphrase-file", str(secret_file)))
    assert printed["keys"][0]["alg"] == "ES384"

    auth = AuthSettings(mode="smart-backend", client_id="c", private_key_file=private)
    with pytest.raises(ValueError, match="STROKEWATCH_EHR__AUTH__PRIVATE_KEY_PASSPHRASE"):
        build_auth(auth, base_url="http://127.0.0.1:9/fhir")
    ok = AuthSettings(mode="smart-backend", client_id="c", private_key_file=private,
                      private_key_passphrase="a long passphrase for tests")
    built = build_auth(ok, base_url="http://127.0.0.1:9/fhir")
    assert isinstance(built, SmartBackendAuth) and built.kid == printed["keys"][0]["kid"]
    built.close()
    no_secret_in(repr(built), "a long passphrase for tests")


def test_unusable_key_files_name_the_setting(tmp_path: Path) -> None:
    not_pem = tmp_path / "not.pem"
    not_pem.write_text("hello")
    p256 = tmp_path / "p256.pem"
    p256.write_bytes(ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    big = tmp_path / "big.pem"
    big.write_bytes(b"x" * (70 * 1024))
    for path, says in ((tmp_path / "missing.pem", "no such file"), (not_pem, "not a PEM private key"),
                       (p256, "needs P-384"), (big, "larger than")):
        auth = AuthSettings(mode="smart-backend", client_id="c", private_key_file=path)
        with pytest.raises(ValueError, match="STROKEWATCH_EHR__AUTH__PRIVATE_KEY_FILE") as raised:
            build_auth(auth, base_url="http://127.0.0.1:9/fhir")
        assert says in str(raised.value)
    es = tmp_path / "es"
    private, _ = write_key_pair(es, "ES384")
    wrong_alg = AuthSettings(mode="smart-backend", client_id="c", private_key_file=private, alg="RS384")
    with pytest.raises(ValueError, match="STROKEWATCH_EHR__AUTH__ALG=RS384"):
        build_auth(wrong_alg, base_url="http://127.0.0.1:9/fhir")


def test_settings_say_what_smart_backend_needs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="needs client_id, private_key_file"):
        AuthSettings(mode="smart-backend")
    with pytest.raises(ValueError, match="unset client_secret"):
        AuthSettings(mode="smart-backend", client_id="c", private_key_file=tmp_path / "k.pem", client_secret="s3cr3t!")
    auth = AuthSettings(mode="smart-backend", client_id="c", private_key_file=tmp_path / "k.pem")
    assert auth.scope == SMART_DEFAULT_SCOPE and auth.token_url is None
    passphrase_file = tmp_path / "passphrase"
    passphrase_file.write_text("from-a-secret-file\n")
    monkeypatch.setenv("STROKEWATCH_EHR__AUTH__PRIVATE_KEY_PASSPHRASE_FILE", str(passphrase_file))
    s = Settings(sandbox=True, ehr={"auth": {"mode": "smart-backend", "client_id": "c",
                                             "private_key_file": str(tmp_path / "k.pem")}})
    assert s.ehr.auth.private_key_passphrase is not None
    assert s.ehr.auth.private_key_passphrase.get_secret_value() == "from-a-secret-file"


class StaticJson:
    """A loopback server answering every GET with one JSON document (a foreign EHR's SMART configuration)."""

    def __init__(self, document: dict[str, Any]) -> None:
        body = json.dumps(document).encode()

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)

    def __enter__(self) -> str:
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return f"http://127.0.0.1:{self._server.server_address[1]}/fhir"

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
