"""TLS and mutual TLS against real servers on loopback, with certificates made here (``cryptography``).

A test CA issues a server certificate for 127.0.0.1/localhost and a client certificate; a second, "wrong" CA
issues a client certificate no server trusts; an expired server certificate and one for another host name
complete the set (validity relative to now). Orthanc serves HTTPS and requires client certificates
(``SslVerifyPeers``); the FHIR sandbox serves HTTPS with its OAuth2 token endpoint and requires them too. Then:
- the engine detects, ingests, scores and publishes over mutual TLS (``bootstrap()`` + the services);
- without a client certificate, with the wrong CA, with a client certificate the server does not trust, it
  records PACS_UNAVAILABLE / EHR_UNAVAILABLE naming the problem, and ``doctor`` names it too, as it does an
  expired certificate and a host name mismatch, each with the STROKEWATCH_* setting to fix;
- Triton: https:// and grpcs:// URLs give TLS clients that pass (or fail) against real KServe v2 servers;
- the API serves HTTPS through uvicorn's flags and can require client certificates.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import signal
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass
from functools import partial
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from pydicom.uid import generate_uid

from inference.runtime import TritonModel
from inference.runtime.transport import GrpcTransport, HttpTransport, TransportError, TritonTls
from integration.adapters.dicomweb import DicomWebPacs
from integration.adapters.model_probe import ModelProbe
from integration.adapters.tls import ssl_context
from integration.bootstrap import Engine, bootstrap, build_model, build_tls, open_probes
from integration.config import Settings, TlsSettings
from integration.domain.checks import CheckResult, tls_problem
from integration.domain.types import Outcome
from integration.entrypoints.processes import _api_live, uvicorn_tls_args
from integration.services import doctor
from integration.services.assess import assess_patients, publish
from integration.services.studies import detect_studies, ingest_study, register_study
from integration.services.vitals import sync_vitals
from sandbox import FhirAuth, FhirPeer, OrthancPeer, free_port
from sandbox.fhir import FhirTls
from sandbox.orthanc import OrthancTls
from tests.integration.test_dicomweb_orthanc import ct_series, dicom_bytes

pytestmark = pytest.mark.peers

MRN_SYSTEM = "urn:oid:1.2.36.146.595.217.0.1"
CLIENT_ID, CLIENT_SECRET = "sw-engine", "client-secret-for-tls-tests"


# -- certificates ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pair:
    cert: Path
    key: Path


@dataclass(frozen=True)
class Pki:
    ca: Path  # the test CA: issued server, client, expired and other_host
    wrong_ca: Path  # another CA: issued wrong_client
    server: Pair  # 127.0.0.1 and localhost
    client: Pair
    wrong_client: Pair
    expired: Pair  # for 127.0.0.1, expired yesterday
    other_host: Pair  # for pacs.example.org only


def _write(directory: Path, name: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> Pair:
    pair = Pair(directory / f"{name}.pem", directory / f"{name}.key")
    pair.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pair.key.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    pair.key.chmod(0o600)
    return pair


def _certificate(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None,
    *,
    ca: bool = False,
    hosts: tuple[str, ...] = (),
    client: bool = False,
    valid: tuple[dt.datetime, dt.datetime] | None = None,
) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    not_before, not_after = valid or (now - dt.timedelta(hours=1), now + dt.timedelta(days=2))
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    issuer_name, signer = (issuer[0].subject, issuer[1]) if issuer else (name, key)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    if issuer:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer[1].public_key()), critical=False
        )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                          key_encipherment=False, data_encipherment=False, key_agreement=False,
                          encipher_only=False, decipher_only=False), critical=True)
    else:
        usage = ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    if hosts:
        names: list[x509.GeneralName] = []
        for host in hosts:
            try:
                names.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                names.append(x509.DNSName(host))
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(signer, hashes.SHA256())


def make_pki(directory: Path) -> Pki:
    directory.mkdir(parents=True, exist_ok=True)
    keys = {name: ec.generate_private_key(ec.SECP256R1()) for name in
            ("ca", "wrong_ca", "server", "client", "wrong_client", "expired", "other_host")}
    ca = _certificate("StrokeWatch test CA", keys["ca"], None, ca=True)
    wrong_ca = _certificate("Some other CA", keys["wrong_ca"], None, ca=True)
    now = dt.datetime.now(dt.UTC)
    loopback = ("127.0.0.1", "localhost")
    issued = {
        "server": _certificate("127.0.0.1", keys["server"], (ca, keys["ca"]), hosts=loopback),
        "client": _certificate("strokewatch-engine", keys["client"], (ca, keys["ca"]), client=True),
        "wrong_client": _certificate("strokewatch-engine", keys["wrong_client"], (wrong_ca, keys["wrong_ca"]),
                                     client=True),
        "expired": _certificate("127.0.0.1", keys["expired"], (ca, keys["ca"]), hosts=loopback,
                                valid=(now - dt.timedelta(days=30), now - dt.timedelta(days=1))),
        "other_host": _certificate("pacs.example.org", keys["other_host"], (ca, keys["ca"]),
                                   hosts=("pacs.example.org",)),
    }
    pairs = {name: _write(directory, name, cert, keys[name]) for name, cert in issued.items()}
    ca_path, wrong_ca_path = directory / "ca.pem", directory / "wrong-ca.pem"
    ca_path.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    wrong_ca_path.write_bytes(wrong_ca.public_bytes(serialization.Encoding.PEM))
    return Pki(ca_path, wrong_ca_path, **pairs)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def client_context(pki: Pki, *, ca: Path | None = None, client: Pair | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(ca or pki.ca))
    pair = client or pki.client
    context.load_cert_chain(str(pair.cert), str(pair.key))
    return context


# -- the peers: Orthanc and the FHIR sandbox, both requiring client certificates -----------------------------------


@pytest.fixture(scope="module")
def mtls_orthanc(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[OrthancPeer]:
    tls = OrthancTls(cert=pki.server.cert, key=pki.server.key, client_ca=pki.ca, ca=pki.ca,
                     client_cert=pki.client.cert, client_key=pki.client.key)
    with OrthancPeer(tmp_path_factory.mktemp("orthanc-tls"), stable_age=1, tls=tls) as peer:
        yield peer


@pytest.fixture(scope="module")
def mtls_fhir(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[FhirPeer]:
    tls = FhirTls(cert=pki.server.cert, key=pki.server.key, client_ca=pki.ca, ca=pki.ca,
                  client_cert=pki.client.cert, client_key=pki.client.key)
    auth = FhirAuth(oauth_clients={CLIENT_ID: CLIENT_SECRET})
    with FhirPeer(tmp_path_factory.mktemp("fhir-tls"), test_controls=True, auth=auth, tls=tls) as peer:
        yield peer


@pytest.fixture
def orthanc(mtls_orthanc: OrthancPeer) -> OrthancPeer:
    mtls_orthanc.reset()
    return mtls_orthanc


@pytest.fixture
def fhir(mtls_fhir: FhirPeer) -> FhirPeer:
    mtls_fhir.reset()
    return mtls_fhir


def store_study(peer: OrthancPeer, pki: Pki, mrn: str = "SW-TLS-0") -> str:
    """A head CT taken a few minutes ago (in UTC), stored over mutual TLS; its StudyInstanceUID."""
    taken = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)
    series = ct_series(generate_uid(), study_date=f"{taken:%Y%m%d}", study_time=f"{taken:%H%M%S}", patient_id=mrn)
    with httpx.Client(verify=client_context(pki), timeout=30) as http:
        for ds in series:
            response = http.post(f"{peer.url}/instances", content=dicom_bytes(ds),
                                 headers={"Content-Type": "application/dicom"})
            assert response.status_code == 200, response.text
    return str(series[0].StudyInstanceUID)


def add_patient(peer: FhirPeer, pki: Pki, mrn: str) -> str:
    """A Patient with one recent heart rate, written over mutual TLS with an OAuth2 token; its FHIR id."""
    with httpx.Client(verify=client_context(pki), timeout=30) as http:
        token = http.post(peer.token_url, data={"grant_type": "client_credentials"},
                          auth=(CLIENT_ID, CLIENT_SECRET)).raise_for_status().json()["access_token"]
        headers = {"Authorization": f"Bearer {token}"}
        patient = http.post(f"{peer.base_url}/Patient", headers=headers, json={
            "resourceType": "Patient", "identifier": [{"system": MRN_SYSTEM, "value": mrn}]}).raise_for_status()
        pid = str(patient.json()["id"])
        http.post(f"{peer.base_url}/Observation", headers=headers, json={
            "resourceType": "Observation", "status": "final", "subject": {"reference": f"Patient/{pid}"},
            "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category",
                                      "code": "vital-signs"}]}],
            "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]},
            "valueQuantity": {"value": 72, "unit": "/min", "system": "http://unitsofmeasure.org", "code": "/min"},
            "effectiveDateTime": (dt.datetime.now(dt.UTC) - dt.timedelta(hours=2)).isoformat(timespec="seconds"),
        }).raise_for_status()
    return pid


def tls(pki: Pki, *, ca: Path | None = None, client: Pair | None = None, no_client: bool = False) -> dict[str, Any]:
    """A TlsSettings group: the test CA and client certificate unless told otherwise."""
    settings: dict[str, Any] = {"ca_bundle": str(ca or pki.ca)}
    if not no_client:
        pair = client or pki.client
        settings |= {"client_cert": str(pair.cert), "client_key": str(pair.key)}
    return settings


def settings(data_dir: Path, orthanc: OrthancPeer | str, fhir: FhirPeer, *, pacs_tls: dict[str, Any],
             ehr_tls: dict[str, Any], oauth: bool = True) -> Settings:
    pacs_url = orthanc if isinstance(orthanc, str) else orthanc.dicomweb_url
    ehr: dict[str, Any] = {"base_url": fhir.base_url, "patient_identifier_system": MRN_SYSTEM, "tls": ehr_tls,
                           "max_retries": 1, "backoff_s": 0.05, "timeout_s": 5}
    if oauth:
        ehr["auth"] = {"mode": "oauth2", "token_url": fhir.token_url, "client_id": CLIENT_ID,
                       "client_secret": CLIENT_SECRET}
    return Settings.model_validate({
        "sandbox": True, "data_dir": data_dir, "explain_drivers": False,
        "pacs": {"dicomweb_url": pacs_url, "timezone": "UTC", "timeout_s": 5, "tls": pacs_tls},
        "ehr": ehr,
    })


@pytest.fixture
def engine_factory() -> Iterator[Any]:
    built: list[Engine] = []

    def make(s: Settings) -> Engine:
        engine = bootstrap(s)
        built.append(engine)
        return engine

    yield make
    for engine in built:
        engine.close()


# -- the engine end to end over mutual TLS -------------------------------------------------------------------------


def test_engine_detects_ingests_and_publishes_over_mutual_tls(
    tmp_path: Path, pki: Pki, orthanc: OrthancPeer, fhir: FhirPeer, engine_factory: Any
) -> None:
    assert orthanc.url.startswith("https://") and fhir.base_url.startswith("https://")
    pid = add_patient(fhir, pki, "SW-TLS-1")
    uid = store_study(orthanc, pki, "SW-TLS-1")
    engine = engine_factory(settings(tmp_path / "data", orthanc, fhir, pacs_tls=tls(pki), ehr_tls=tls(pki)))
    assert engine.feed is not None  # Orthanc recognised over mutual TLS: its change feed is used

    assert uid in detect_studies(engine.services)
    result = ingest_study(engine.services, uid)
    assert (result.status, result.patient_fhir_id) == ("ready", pid)
    assert sync_vitals(engine.services, pid).accepted == 1
    [scored] = assess_patients(engine.services, [pid])
    assert publish(engine.services, scored.identifier) == "published"

    row = engine.store.get_assessment(scored.identifier)
    with httpx.Client(verify=client_context(pki), timeout=10) as http:
        token = http.post(fhir.token_url, data={"grant_type": "client_credentials"},
                          auth=(CLIENT_ID, CLIENT_SECRET)).json()["access_token"]
        written = http.get(f"{fhir.base_url}/RiskAssessment/{row.fhir_id}",
                           headers={"Authorization": f"Bearer {token}"})
    assert written.status_code == 200 and written.json()["subject"]["reference"] == f"Patient/{pid}"


@pytest.mark.parametrize(
    ("variant", "expected", "setting"),
    [
        ("no client certificate", "refused our client certificate", "STROKEWATCH_PACS__TLS__CLIENT_CERT"),
        ("wrong CA", "unknown or wrong CA", "STROKEWATCH_PACS__TLS__CA_BUNDLE"),
        ("untrusted client certificate", "does not trust the CA that issued our client certificate",
         "STROKEWATCH_PACS__TLS__CLIENT_CERT"),
    ],
)
def test_pacs_tls_failure_is_a_named_retried_outcome(
    tmp_path: Path, pki: Pki, orthanc: OrthancPeer, fhir: FhirPeer, engine_factory: Any,
    variant: str, expected: str, setting: str,
) -> None:
    uid = store_study(orthanc, pki)
    good = engine_factory(settings(tmp_path / "data", orthanc, fhir, pacs_tls=tls(pki), ehr_tls=tls(pki)))
    assert register_study(good.services, uid)
    bad_tls = {
        "no client certificate": tls(pki, no_client=True),
        "wrong CA": tls(pki, ca=pki.wrong_ca),
        "untrusted client certificate": tls(pki, client=pki.wrong_client),
    }[variant]
    bad = engine_factory(settings(tmp_path / "data", orthanc, fhir, pacs_tls=bad_tls, ehr_tls=tls(pki)))

    result = ingest_study(bad.services, uid)

    assert (result.status, result.outcome) == ("retry", Outcome.PACS_UNAVAILABLE.value)
    assert "TLS failed" in (result.reason or "") and expected in (result.reason or "")
    assert setting in (result.reason or "")
    assert bad.store.counts()["open_failures"] == {"pacs_unavailable": 1}
    assert bad.store.get_study(uid).next_attempt_at is not None  # retried once the certificates are fixed


def test_ehr_tls_failures_are_named_outcomes(
    tmp_path: Path, pki: Pki, orthanc: OrthancPeer, fhir: FhirPeer, engine_factory: Any
) -> None:
    pid = add_patient(fhir, pki, "SW-TLS-2")
    uid = store_study(orthanc, pki, "SW-TLS-2")
    good = engine_factory(settings(tmp_path / "data", orthanc, fhir, pacs_tls=tls(pki), ehr_tls=tls(pki)))
    assert register_study(good.services, uid)
    assert ingest_study(good.services, uid).status == "ready"
    sync_vitals(good.services, pid)
    [scored] = assess_patients(good.services, [pid])

    # The OAuth2 token endpoint, reached first, with the wrong CA: the token fetch names it.
    wrong_ca = engine_factory(settings(tmp_path / "data", orthanc, fhir, pacs_tls=tls(pki),
                                       ehr_tls=tls(pki, ca=pki.wrong_ca)))
    assert publish(wrong_ca.services, scored.identifier) == "retry"
    row = wrong_ca.store.get_assessment(scored.identifier)
    assert row.outcome == Outcome.EHR_UNAVAILABLE.value
    assert "token endpoint" in (row.reason or "") and "unknown or wrong CA" in (row.reason or "")
    assert "STROKEWATCH_EHR__TLS__CA_BUNDLE" in (row.reason or "")

    # The FHIR server itself, without a client certificate (no OAuth2 here): refused and said so, at once.
    no_cert = engine_factory(settings(tmp_path / "data", orthanc, fhir, pacs_tls=tls(pki),
                                      ehr_tls=tls(pki, no_client=True), oauth=False))
    assert publish(no_cert.services, scored.identifier) == "retry"
    row = no_cert.store.get_assessment(scored.identifier)
    assert row.outcome == Outcome.EHR_UNAVAILABLE.value
    assert "TLS failed: the server refused our client certificate" in (row.reason or "")
    assert "STROKEWATCH_EHR__TLS__CLIENT_CERT" in (row.reason or "")
    assert "after" not in (row.reason or "")  # not retried in-process: retrying cannot fix a certificate

    # Fixed certificates: published, once.
    fixed = engine_factory(settings(tmp_path / "data", orthanc, fhir, pacs_tls=tls(pki), ehr_tls=tls(pki)))
    assert publish(fixed.services, scored.identifier) == "published"


# -- doctor names the problem ---------------------------------------------------------------------------------------


def run_checks(s: Settings) -> dict[str, CheckResult]:
    return {r.name: r for r in doctor.run_checks(s, open_probes, timeout_s=10)}


def test_doctor_passes_with_the_right_certificates(tmp_path: Path, pki: Pki, orthanc: OrthancPeer,
                                                   fhir: FhirPeer) -> None:
    checks = run_checks(settings(tmp_path / "data", orthanc, fhir, pacs_tls=tls(pki), ehr_tls=tls(pki)))
    for name in ("pacs", "pacs auth", "pacs change feed", "ehr", "ehr auth"):
        assert checks[name].ok, checks[name]
    assert "Orthanc" in checks["pacs change feed"].detail


@pytest.mark.parametrize(
    ("variant", "expected", "setting"),
    [
        ("no client certificate", {"pacs": "the server refused our client certificate: it requires a client "
                                           "certificate and none was sent"}, "__TLS__CLIENT_CERT"),
        ("wrong CA", {"pacs": "unknown or wrong CA"}, "__TLS__CA_BUNDLE"),
        # Orthanc answers with a TLS alert; Node checks client certificates after the handshake and just hangs up.
        ("untrusted client certificate", {"pacs": "it does not trust the CA that issued our client certificate",
                                          "ehr": "most likely it refused our client certificate"},
         "__TLS__CLIENT_CERT"),
    ],
)
def test_doctor_names_wrong_ca_and_refused_client_certificate(
    tmp_path: Path, pki: Pki, orthanc: OrthancPeer, fhir: FhirPeer, variant: str, expected: dict[str, str],
    setting: str,
) -> None:
    bad = {
        "no client certificate": tls(pki, no_client=True),
        "wrong CA": tls(pki, ca=pki.wrong_ca),
        "untrusted client certificate": tls(pki, client=pki.wrong_client),
    }[variant]
    checks = run_checks(settings(tmp_path / "data", orthanc, fhir, pacs_tls=bad, ehr_tls=bad))
    for name, prefix in (("pacs", "STROKEWATCH_PACS"), ("ehr", "STROKEWATCH_EHR")):
        check = checks[name]
        wanted = expected.get(name, expected["pacs"])
        assert not check.ok and "TLS failed" in check.detail and wanted in check.detail, check
        assert f"{prefix}{setting}" in (check.hint or ""), check
    # The token endpoint (ehr auth, asked first) is named as precisely.
    token = checks["ehr auth"]
    assert not token.ok and expected.get("ehr", expected["pacs"]) in token.detail, token
    assert f"STROKEWATCH_EHR{setting}" in (token.hint or ""), token


@pytest.mark.parametrize(
    ("certificate", "expected", "hint"),
    [
        ("expired", "the server's certificate has expired", "needs a new certificate"),
        ("other_host", "hostname mismatch", "STROKEWATCH_PACS__DICOMWEB_URL"),
    ],
)
def test_doctor_names_expired_and_hostname_mismatch(
    tmp_path: Path, pki: Pki, fhir: FhirPeer, certificate: str, expected: str, hint: str
) -> None:
    pair: Pair = getattr(pki, certificate)
    served = OrthancTls(cert=pair.cert, key=pair.key)  # no client certificates asked: the server's is the problem
    with OrthancPeer(tmp_path / "orthanc", tls=served) as peer:
        checks = run_checks(settings(tmp_path / "data", peer, fhir, pacs_tls=tls(pki), ehr_tls=tls(pki)))
    pacs = checks["pacs"]
    assert not pacs.ok and expected in pacs.detail, pacs
    assert hint in (pacs.hint or ""), pacs
    assert checks["ehr"].ok  # the other peer is unaffected


def test_doctor_names_a_missing_certificate_file(tmp_path: Path, pki: Pki, orthanc: OrthancPeer,
                                                 fhir: FhirPeer) -> None:
    missing = tmp_path / "nowhere" / "ca.pem"
    checks = run_checks(settings(tmp_path / "data", orthanc, fhir, pacs_tls={"ca_bundle": str(missing)},
                                 ehr_tls=tls(pki)))
    assert not checks["pacs"].ok
    assert f"STROKEWATCH_PACS__TLS__CA_BUNDLE={missing}: no such file" in checks["pacs"].detail


def test_doctor_names_a_plain_http_server_behind_an_https_url(tmp_path: Path, pki: Pki) -> None:
    plain = ThreadingHTTPServer(("127.0.0.1", 0), _KServeHealth)
    threading.Thread(target=plain.serve_forever, daemon=True).start()
    try:
        url = f"https://127.0.0.1:{plain.server_address[1]}/dicom-web"
        with DicomWebPacs(url, tls=build_tls(TlsSettings.model_validate(tls(pki)), "pacs", "tls")) as pacs:
            [check] = pacs.probe(quick=True)
    finally:
        plain.shutdown()
        plain.server_close()
    assert not check.ok and "does not speak TLS" in check.detail, check
    assert "STROKEWATCH_PACS__DICOMWEB_URL" in (check.hint or "")


@pytest.mark.parametrize(
    ("message", "kind"),
    [
        ("[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: certificate is not yet valid (_ssl.c:1006)",
         "not_yet_valid"),
        ("[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: unable to get local issuer certificate",
         "unknown_ca"),
        ("[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: IP address mismatch, certificate is not valid "
         "for '10.0.0.1'", "hostname"),
        ("[SSL: SSLV3_ALERT_CERTIFICATE_EXPIRED] sslv3 alert certificate expired", "client_cert_refused"),
        ("[SSL: TLSV1_ALERT_PROTOCOL_VERSION] tlsv1 alert protocol version", "old_protocol"),
        ("[Errno 111] Connection refused", None),
    ],
)
def test_tls_problems_are_classified_from_openssl_messages(message: str, kind: str | None) -> None:
    problem = tls_problem(message, "STROKEWATCH_EHR__TLS", "STROKEWATCH_EHR__BASE_URL")
    assert (problem.kind if problem else None) == kind
    if problem is not None:
        assert "STROKEWATCH_" in problem.hint or "server" in problem.hint


# -- the shared builder -------------------------------------------------------------------------------------------


def test_ssl_context_is_tls12_or_newer_and_verifies(pki: Pki) -> None:
    context = build_tls(TlsSettings.model_validate(tls(pki)), "pacs", "tls")
    assert context.minimum_version >= ssl.TLSVersion.TLSv1_2
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
    off = build_tls(TlsSettings(verify=False), "pacs", "tls")
    assert off.verify_mode == ssl.CERT_NONE and off.minimum_version >= ssl.TLSVersion.TLSv1_2


def test_ssl_context_refuses_bad_files_naming_the_setting(tmp_path: Path, pki: Pki) -> None:
    not_pem = tmp_path / "ca.der"
    not_pem.write_bytes(b"\x30\x82\x01\x0a")
    with pytest.raises(ValueError, match=r"STROKEWATCH_EHR__TLS__CA_BUNDLE=.*not a PEM file"):
        build_tls(TlsSettings(ca_bundle=not_pem), "ehr", "tls")
    mismatched = TlsSettings(client_cert=pki.client.cert, client_key=pki.server.key)
    with pytest.raises(ValueError, match=r"STROKEWATCH_EHR__TLS__CLIENT_CERT .*the key does not belong"):
        build_tls(mismatched, "ehr", "tls")
    key = serialization.load_pem_private_key(pki.client.key.read_bytes(), password=None)
    encrypted = tmp_path / "encrypted.key"  # refused, never a passphrase prompt on a terminal
    encrypted.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                            serialization.BestAvailableEncryption(b"passphrase")))
    with pytest.raises(ValueError, match=r"STROKEWATCH_EHR__TLS__CLIENT_KEY: the private key is encrypted"):
        build_tls(TlsSettings(client_cert=pki.client.cert, client_key=encrypted), "ehr", "tls")


def test_verify_tls_is_still_accepted_as_a_deprecated_alias() -> None:
    s = Settings.model_validate({"pacs": {"verify_tls": False}, "ehr": {"verify_tls": "true"}})
    assert (s.pacs.tls.verify, s.ehr.tls.verify) == (False, True)


# -- Triton: https:// and grpcs:// ---------------------------------------------------------------------------------


class _KServeHealth(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        status = 200 if self.path in ("/v2/health/live", "/v2/health/ready") else 404
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def kserve_https(pki: Pki) -> Iterator[str]:
    """A tiny KServe v2 health endpoint over HTTPS that requires a client certificate from the test CA."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _KServeHealth)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(str(pki.server.cert), str(pki.server.key))
    context.load_verify_locations(cafile=str(pki.ca))
    context.verify_mode = ssl.CERT_REQUIRED
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"https://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def kserve_grpcs(pki: Pki) -> Iterator[str]:
    """KServe v2 ServerLive/ServerReady over gRPC with TLS, requiring a client certificate from the test CA."""
    import grpc
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    class Health(service_pb2_grpc.GRPCInferenceServiceServicer):  # type: ignore[misc]
        def ServerLive(self, request: Any, context: Any) -> Any:  # noqa: N802 - the KServe v2 method name
            return service_pb2.ServerLiveResponse(live=True)

        def ServerReady(self, request: Any, context: Any) -> Any:  # noqa: N802
            return service_pb2.ServerReadyResponse(ready=True)

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(Health(), server)
    credentials = grpc.ssl_server_credentials(
        [(pki.server.key.read_bytes(), pki.server.cert.read_bytes())],
        root_certificates=pki.ca.read_bytes(), require_client_auth=True,
    )
    port = server.add_secure_port("127.0.0.1:0", credentials)
    server.start()
    yield f"grpcs://127.0.0.1:{port}"
    server.stop(grace=None)


def triton_tls(pki: Pki, *, ca: Path | None = None, client: bool = True) -> TritonTls:
    settings = TlsSettings.model_validate(tls(pki, ca=ca, no_client=not client))
    return TritonTls(
        http_context=partial(ssl_context, settings, ("triton_tls",)),
        ca_bundle=str(settings.ca_bundle),
        client_cert=str(settings.client_cert) if settings.client_cert else None,
        client_key=str(settings.client_key) if settings.client_key else None,
    )


def test_https_triton_url_gives_a_tls_http_client(pki: Pki, kserve_https: str) -> None:
    model = TritonModel(kserve_https, protocol="http", tls=triton_tls(pki), retries=0)
    transport = model._transport()
    assert isinstance(transport, HttpTransport) and transport.tls is not None and model.scheme == "https"
    assert transport.server_live() and transport.server_ready()
    model.close()

    wrong = HttpTransport(kserve_https.removeprefix("https://"), 5.0, triton_tls(pki, ca=pki.wrong_ca))
    with pytest.raises(TransportError, match="CERTIFICATE_VERIFY_FAILED|certificate verify failed") as failed:
        wrong.server_ready()
    assert failed.value.kind == "tls"  # TritonModel: model unavailable at once, naming the TLS failure
    wrong.close()


def test_grpcs_triton_url_gives_a_tls_grpc_client(pki: Pki, kserve_grpcs: str) -> None:
    model = TritonModel(kserve_grpcs, protocol="grpc", tls=triton_tls(pki), retries=0)
    transport = model._transport()
    assert isinstance(transport, GrpcTransport) and transport.tls is not None and model.scheme == "grpcs"
    assert transport.server_live() and transport.server_ready()
    model.close()

    without_client_cert = GrpcTransport(kserve_grpcs.removeprefix("grpcs://"), 5.0, triton_tls(pki, client=False))
    with pytest.raises(TransportError):
        without_client_cert.server_ready()
    without_client_cert.close()
    wrong_ca = GrpcTransport(kserve_grpcs.removeprefix("grpcs://"), 5.0, triton_tls(pki, ca=pki.wrong_ca))
    with pytest.raises(TransportError, match="CERTIFICATE_VERIFY_FAILED") as failed:
        wrong_ca.server_ready()
    assert failed.value.kind == "tls"
    wrong_ca.close()


def test_build_model_wires_triton_tls_from_settings(tmp_path: Path, pki: Pki, kserve_https: str) -> None:
    s = Settings.model_validate({"data_dir": tmp_path, "triton_url": kserve_https, "triton_tls": tls(pki)})
    model = build_model(s)
    assert isinstance(model, TritonModel) and model.tls is not None
    assert model._transport().server_ready()
    model.close()


def test_doctor_names_a_triton_tls_problem(tmp_path: Path, pki: Pki, kserve_https: str) -> None:
    wrong_ca = Settings.model_validate(
        {"data_dir": tmp_path, "triton_url": kserve_https, "triton_tls": tls(pki, ca=pki.wrong_ca)})
    [check] = ModelProbe(lambda: build_model(wrong_ca), model_path=tmp_path / "model.onnx").probe(quick=True)
    assert not check.ok and "TLS failed" in check.detail and "unknown or wrong CA" in check.detail, check
    assert "STROKEWATCH_TRITON_TLS__CA_BUNDLE" in (check.hint or "")
    mismatch = Settings.model_validate({"data_dir": tmp_path, "triton_url": kserve_https, "triton_protocol": "grpc"})
    [check] = ModelProbe(lambda: build_model(mismatch), model_path=tmp_path / "model.onnx").probe(quick=True)
    assert not check.ok and "STROKEWATCH_TRITON_PROTOCOL is grpc" in check.detail, check


def test_triton_scheme_and_settings_mismatches_are_refused(tmp_path: Path, pki: Pki) -> None:
    with pytest.raises(ValueError, match="STROKEWATCH_TRITON_PROTOCOL is grpc"):
        TritonModel("https://127.0.0.1:8000", protocol="grpc")
    with pytest.raises(ValueError, match="STROKEWATCH_TRITON_PROTOCOL is http"):
        TritonModel("grpcs://127.0.0.1:8001", protocol="http")
    with pytest.raises(ValueError, match="plaintext"):
        TritonModel("http://127.0.0.1:8000", protocol="http", tls=TritonTls())
    with pytest.raises(ValueError, match="unknown scheme"):
        TritonModel("ftp://127.0.0.1:8000")
    plaintext_with_tls = Settings.model_validate(
        {"data_dir": tmp_path, "triton_url": "http://127.0.0.1:8000", "triton_tls": tls(pki)})
    with pytest.raises(ValueError, match="STROKEWATCH_TRITON_TLS__.*not https:// or grpcs://"):
        build_model(plaintext_with_tls)
    with pytest.raises(ValueError, match="gRPC cannot skip certificate verification"):
        GrpcTransport("127.0.0.1:8001", 1.0, TritonTls(verify=False))
    assert TritonModel("https://127.0.0.1:8000").tls is not None  # default: verified against the system store
    assert TritonModel("127.0.0.1:8000").tls is None


# -- the API over HTTPS, requiring client certificates ------------------------------------------------------------


def test_api_serves_https_and_requires_client_certificates(tmp_path: Path, pki: Pki) -> None:
    port = free_port()
    api_tls = {"cert": str(pki.server.cert), "key": str(pki.server.key), "client_ca": str(pki.ca),
               "require_client_cert": True}
    s = Settings.model_validate({"sandbox": True, "data_dir": tmp_path / "data", "api_port": port, "api_tls": api_tls})
    assert s.api_base_url == f"https://127.0.0.1:{port}"
    args = uvicorn_tls_args(s)
    assert args[:2] == ["--ssl-certfile", str(pki.server.cert.resolve())] and "--ssl-cert-reqs" in args
    env = {**os.environ, "STROKEWATCH_SANDBOX": "true", "STROKEWATCH_DATA_DIR": str(tmp_path / "data"),
           "STROKEWATCH_PACS__DICOMWEB_URL": f"http://127.0.0.1:{free_port()}/dicom-web",
           "STROKEWATCH_PACS__KIND": "generic", "STROKEWATCH_EHR__BASE_URL": f"http://127.0.0.1:{free_port()}/fhir"}
    log = (tmp_path / "api.log").open("wb")
    api = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "--factory", "integration.entrypoints.api.app:create_app",
         "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning", *args],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 60
        while not _api_live(s):
            assert api.poll() is None, (tmp_path / "api.log").read_text()
            assert time.monotonic() < deadline, "the API did not come up over HTTPS"
            time.sleep(0.3)
        with httpx.Client(verify=client_context(pki), timeout=10) as http:
            assert http.get(f"{s.api_base_url}/health/live").status_code == 200
        no_cert = ssl.create_default_context(cafile=str(pki.ca))
        with httpx.Client(verify=no_cert, timeout=10) as http, pytest.raises(httpx.HTTPError):
            http.get(f"{s.api_base_url}/health/live")
        with httpx.Client(verify=client_context(pki, client=pki.wrong_client), timeout=10) as http, \
                pytest.raises(httpx.HTTPError):
            http.get(f"{s.api_base_url}/health/live")
    finally:
        os.killpg(api.pid, signal.SIGTERM)
        api.wait(20)
        log.close()
