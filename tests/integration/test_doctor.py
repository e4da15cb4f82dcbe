"""`strokewatch doctor`'s checks against the real peers: all good, peers down, credentials wrong, config wrong."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import httpx
import pytest

from integration.adapters.db.session import upgrade
from integration.adapters.fhir_capability import capability_checks
from integration.bootstrap import open_probes
from integration.config import Settings
from integration.domain.checks import CheckResult
from integration.services import doctor
from sandbox import FhirAuth, FhirPeer, OrthancPeer, free_port

pytestmark = pytest.mark.peers

BASIC = ("strokewatch", "correct-horse-battery")
OAUTH_CLIENT = ("sw-engine", "client-secret-for-tests")
STATIC_TOKEN = "static-token-for-tests"


def settings(data_dir: Path, dicomweb_url: str, ehr_base_url: str, **extra: Any) -> Settings:
    pacs = {"dicomweb_url": dicomweb_url, **extra.pop("pacs", {})}
    ehr = {"base_url": ehr_base_url, **extra.pop("ehr", {})}
    return Settings.model_validate({"sandbox": True, "data_dir": data_dir, "pacs": pacs, "ehr": ehr, **extra})


def run_checks(s: Settings | None, timeout_s: float = 10.0) -> list[CheckResult]:
    """`strokewatch doctor`: the probes the composition root builds from these settings."""
    return doctor.run_checks(s, open_probes, timeout_s=timeout_s)


def readiness(s: Settings, timeout_s: float) -> list[CheckResult]:
    with open_probes(s) as probes:
        return doctor.readiness(probes, timeout_s=timeout_s)


def by_name(results: list[CheckResult]) -> dict[str, CheckResult]:
    return {r.name: r for r in results}


def failed(results: list[CheckResult]) -> list[str]:
    return [r.name for r in results if not r.ok]


def no_secret_in(results: list[CheckResult], *secrets: str) -> None:
    for r in results:
        for secret in secrets:
            assert secret not in r.detail and secret not in (r.hint or ""), r


@pytest.fixture
def migrated(tmp_path: Path) -> Path:
    data = tmp_path / "data"
    data.mkdir()
    upgrade(f"sqlite:///{data / 'strokewatch.db'}")
    return data


@pytest.fixture(scope="module")
def fhir_with_auth(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FhirPeer]:
    auth = FhirAuth(basic=BASIC, bearer=STATIC_TOKEN, oauth_clients=dict([OAUTH_CLIENT]))
    with FhirPeer(tmp_path_factory.mktemp("fhir-auth"), auth=auth) as peer:
        yield peer


@pytest.fixture(scope="module")
def orthanc_with_auth(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OrthancPeer]:
    with OrthancPeer(tmp_path_factory.mktemp("orthanc-auth"), users=dict([BASIC])) as peer:
        yield peer


# -- everything in order ------------------------------------------------------------------
def test_doctor_passes_against_the_real_peers(migrated: Path, orthanc_peer: OrthancPeer, fhir_peer: FhirPeer) -> None:
    results = run_checks(settings(migrated, orthanc_peer.dicomweb_url, fhir_peer.base_url))
    assert failed(results) == [], results
    checks = by_name(results)
    for name in (
        "settings",
        "database",
        "broker",
        "pacs",
        "pacs auth",
        "pacs change feed",
        "pacs time zone",
        "ehr",
        "ehr FHIR version",
        "ehr Observation search",
        "ehr RiskAssessment create",
        "ehr conditional create",
        "ehr auth",
        "patient identifier system",
        "model",
        "model trained",
    ):
        assert name in checks, name
    assert "Orthanc" in checks["pacs change feed"].detail and "/changes" in checks["pacs change feed"].detail
    assert "4.0" in checks["ehr FHIR version"].detail
    assert "head" in checks["database"].detail
    assert "onnxruntime" in checks["model"].detail


def test_doctor_states_the_pacs_time_zone(migrated: Path, orthanc_peer: OrthancPeer, fhir_peer: FhirPeer) -> None:
    zoned = run_checks(settings(migrated, orthanc_peer.dicomweb_url, fhir_peer.base_url,
                                pacs={"timezone": "Australia/Sydney", "clock_skew_s": 600}))
    detail = by_name(zoned)["pacs time zone"].detail
    assert "Australia/Sydney (pacs.timezone)" in detail and "600 s" in detail
    default = by_name(run_checks(settings(migrated, orthanc_peer.dicomweb_url, fhir_peer.base_url)))
    assert "this machine's zone" in default["pacs time zone"].detail


def test_generic_pacs_polls_qido(migrated: Path, orthanc_peer: OrthancPeer, fhir_peer: FhirPeer) -> None:
    results = run_checks(settings(migrated, orthanc_peer.dicomweb_url, fhir_peer.base_url, pacs={"kind": "generic"}))
    assert "QIDO-RS polling" in by_name(results)["pacs change feed"].detail


# -- peers down, database behind ------------------------------------------------------------
def test_closed_ports_fail_with_the_setting_to_fix(migrated: Path) -> None:
    pacs_url = f"http://127.0.0.1:{free_port()}/dicom-web"
    ehr_url = f"http://127.0.0.1:{free_port()}/fhir"
    results = run_checks(settings(migrated, pacs_url, ehr_url), timeout_s=3)
    checks = by_name(results)
    assert set(failed(results)) == {"pacs", "ehr"}
    assert pacs_url in checks["pacs"].detail and "unreachable" in checks["pacs"].detail
    assert "STROKEWATCH_PACS__DICOMWEB_URL" in (checks["pacs"].hint or "")
    assert ehr_url in checks["ehr"].detail
    assert "STROKEWATCH_EHR__BASE_URL" in (checks["ehr"].hint or "")


def test_wrong_base_url_path_is_named(migrated: Path, orthanc_peer: OrthancPeer, fhir_peer: FhirPeer) -> None:
    results = run_checks(settings(migrated, orthanc_peer.url + "/no-dicom-web", fhir_peer.url + "/not-fhir"))
    checks = by_name(results)
    assert "HTTP 404" in checks["pacs"].detail and "DICOMweb root" in (checks["pacs"].hint or "")
    assert "not a CapabilityStatement" in checks["ehr"].detail


def test_unmigrated_database_and_unreachable_broker(
    tmp_path: Path, orthanc_peer: OrthancPeer, fhir_peer: FhirPeer
) -> None:
    data = tmp_path / "data"
    data.mkdir()
    upgrade(f"sqlite:///{data / 'strokewatch.db'}", "base")  # the database exists, its schema does not
    broker = f"redis://127.0.0.1:{free_port()}/0"
    results = run_checks(settings(data, orthanc_peer.dicomweb_url, fhir_peer.base_url, broker_url=broker), timeout_s=3)
    checks = by_name(results)
    assert set(failed(results)) == {"database", "broker"}
    assert "migrations head" in checks["database"].detail and "db upgrade" in (checks["database"].hint or "")
    assert "STROKEWATCH_BROKER_URL" in (checks["broker"].hint or "")


def test_real_redis_broker_is_reachable(migrated: Path, orthanc_peer: OrthancPeer, fhir_peer: FhirPeer) -> None:
    s = settings(migrated, orthanc_peer.dicomweb_url, fhir_peer.base_url, broker_url="redis://127.0.0.1:6379/15")
    assert by_name(run_checks(s))["broker"].ok


def test_missing_model_file_names_the_setting(migrated: Path, orthanc_peer: OrthancPeer, fhir_peer: FhirPeer) -> None:
    s = settings(migrated, orthanc_peer.dicomweb_url, fhir_peer.base_url, model_path=migrated / "nope.onnx")
    model = by_name(run_checks(s))["model"]
    assert not model.ok and "nope.onnx" in model.detail and "STROKEWATCH_MODEL_PATH" in (model.hint or "")


def test_invalid_environment_is_reported_not_raised(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("STROKEWATCH_CONFIG", raising=False)
    monkeypatch.setenv("STROKEWATCH_EHR__AUTH__MODE", "oauth2")
    monkeypatch.setenv("STROKEWATCH_EHR__AUTH__CLIENT_ID", "engine")
    (result,) = run_checks(None)
    assert result.name == "settings" and not result.ok
    assert "STROKEWATCH_EHR__AUTH" in result.detail and "token_url" in result.detail


# -- credentials ----------------------------------------------------------------------------
def test_wrong_basic_credentials_are_reported_as_rejected(
    migrated: Path, orthanc_peer: OrthancPeer, fhir_with_auth: FhirPeer
) -> None:
    ehr = {"auth": {"mode": "basic", "username": BASIC[0], "password": "wrong-password"}}
    results = run_checks(settings(migrated, orthanc_peer.dicomweb_url, fhir_with_auth.base_url, ehr=ehr))
    auth = by_name(results)["ehr auth"]
    assert failed(results) == ["ehr auth"]
    assert "rejected the basic credentials" in auth.detail
    assert "STROKEWATCH_EHR__AUTH__USERNAME" in (auth.hint or "") and "STROKEWATCH_EHR__AUTH__PASSWORD" in (
        auth.hint or ""
    )
    no_secret_in(results, "wrong-password")


def test_missing_credentials_say_which_mode_to_set(
    migrated: Path, orthanc_peer: OrthancPeer, fhir_with_auth: FhirPeer
) -> None:
    results = run_checks(settings(migrated, orthanc_peer.dicomweb_url, fhir_with_auth.base_url))
    auth = by_name(results)["ehr auth"]
    assert not auth.ok and "demands authentication" in auth.detail
    assert "STROKEWATCH_EHR__AUTH__MODE" in (auth.hint or "")


@pytest.mark.parametrize(
    ("auth", "says"),
    [
        ({"mode": "basic", "username": BASIC[0], "password": BASIC[1]}, "HTTP Basic"),
        ({"mode": "bearer", "token": STATIC_TOKEN}, "static bearer token"),
        ({"mode": "oauth2", "client_id": OAUTH_CLIENT[0], "client_secret": OAUTH_CLIENT[1]}, "token fetched"),
    ],
)
def test_each_auth_mode_is_accepted(
    migrated: Path, orthanc_peer: OrthancPeer, fhir_with_auth: FhirPeer, auth: dict[str, str], says: str
) -> None:
    if auth["mode"] == "oauth2":
        auth = {**auth, "token_url": fhir_with_auth.token_url}
    results = run_checks(settings(migrated, orthanc_peer.dicomweb_url, fhir_with_auth.base_url, ehr={"auth": auth}))
    assert failed(results) == [], results
    assert says in by_name(results)["ehr auth"].detail
    no_secret_in(results, BASIC[1], STATIC_TOKEN, OAUTH_CLIENT[1])


def test_oauth2_wrong_client_secret_names_the_setting(
    migrated: Path, orthanc_peer: OrthancPeer, fhir_with_auth: FhirPeer
) -> None:
    auth = {
        "mode": "oauth2",
        "client_id": OAUTH_CLIENT[0],
        "client_secret": "not-the-secret",
        "token_url": fhir_with_auth.token_url,
    }
    results = run_checks(settings(migrated, orthanc_peer.dicomweb_url, fhir_with_auth.base_url, ehr={"auth": auth}))
    check = by_name(results)["ehr auth"]
    assert not check.ok and "invalid_client" in check.detail
    assert "STROKEWATCH_EHR__AUTH__CLIENT_SECRET" in (check.hint or "")
    no_secret_in(results, "not-the-secret")


class TokenRelay:
    """A token endpoint on 127.0.0.1 that records how each client authenticated (the sandbox accepts either
    way and cannot tell), refuses any method but ``accept``, and relays the rest to the sandbox's endpoint."""

    def __init__(self, upstream: str, accept: str | None = None) -> None:
        self.seen: list[str] = []
        relay = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                basic = self.headers.get("Authorization", "").lower().startswith("basic ")
                method = "client_secret_basic" if basic else "client_secret_post"
                if not basic and "client_secret" not in parse_qs(body.decode()):
                    method = "none"
                relay.seen.append(method)
                if accept is not None and method != accept:
                    status, content = 401, b'{"error": "invalid_client"}'
                else:
                    kept = ("authorization", "content-type")
                    forwarded = {k: v for k, v in self.headers.items() if k.lower() in kept}
                    answer = httpx.post(upstream, content=body, headers=forwarded)
                    status, content = answer.status_code, answer.content
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(content)))
                self.end_headers()
                self.wfile.write(content)

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/oauth/token"

    def __enter__(self) -> TokenRelay:
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()


@pytest.mark.parametrize("method", ["client_secret_basic", "client_secret_post"])
def test_oauth2_token_is_requested_as_configured(
    migrated: Path, orthanc_peer: OrthancPeer, fhir_with_auth: FhirPeer, method: str
) -> None:
    with TokenRelay(fhir_with_auth.token_url) as relay:
        auth = {"mode": "oauth2", "client_id": OAUTH_CLIENT[0], "client_secret": OAUTH_CLIENT[1],
                "token_url": relay.url, "client_auth": method}
        results = run_checks(settings(migrated, orthanc_peer.dicomweb_url, fhir_with_auth.base_url, ehr={"auth": auth}))
    assert failed(results) == [], results
    assert relay.seen == [method]  # one token, fetched the engine's way and used for every request after it
    assert method in by_name(results)["ehr auth"].detail
    no_secret_in(results, OAUTH_CLIENT[1])


def test_oauth2_wrong_client_auth_method_names_the_setting(
    migrated: Path, orthanc_peer: OrthancPeer, fhir_with_auth: FhirPeer
) -> None:
    with TokenRelay(fhir_with_auth.token_url, accept="client_secret_post") as relay:
        auth = {"mode": "oauth2", "client_id": OAUTH_CLIENT[0], "client_secret": OAUTH_CLIENT[1],
                "token_url": relay.url}  # client_secret_basic, the default
        results = run_checks(settings(migrated, orthanc_peer.dicomweb_url, fhir_with_auth.base_url, ehr={"auth": auth}))
    check = by_name(results)["ehr auth"]
    assert relay.seen == ["client_secret_basic"]
    assert failed(results) == ["ehr auth"] and "invalid_client" in check.detail
    assert "STROKEWATCH_EHR__AUTH__CLIENT_AUTH=client_secret_post" in (check.hint or "")
    no_secret_in(results, OAUTH_CLIENT[1])


def test_pacs_auth_rejected_and_accepted(migrated: Path, orthanc_with_auth: OrthancPeer, fhir_peer: FhirPeer) -> None:
    wrong = {"auth": {"mode": "basic", "username": BASIC[0], "password": "wrong-password"}}
    results = run_checks(settings(migrated, orthanc_with_auth.dicomweb_url, fhir_peer.base_url, pacs=wrong))
    assert set(failed(results)) == {"pacs", "pacs auth"}
    assert "STROKEWATCH_PACS__AUTH__PASSWORD" in (by_name(results)["pacs auth"].hint or "")
    right = {"auth": {"mode": "basic", "username": BASIC[0], "password": BASIC[1]}}
    results = run_checks(settings(migrated, orthanc_with_auth.dicomweb_url, fhir_peer.base_url, pacs=right))
    assert failed(results) == [], results
    assert "Orthanc" in by_name(results)["pacs change feed"].detail


# -- readiness subset -----------------------------------------------------------------------
def test_readiness_is_one_result_per_dependency(migrated: Path, orthanc_peer: OrthancPeer) -> None:
    closed = f"http://127.0.0.1:{free_port()}/fhir"
    results = readiness(settings(migrated, orthanc_peer.dicomweb_url, closed), timeout_s=2)
    assert [r.name for r in results] == ["database", "broker", "pacs", "ehr", "model"]
    assert failed(results) == ["ehr"]


# -- what the CapabilityStatement says (no peer needed) ----------------------------------------
def statement(version: str = "4.0.1", resources: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    rest = [{"mode": "server", "resource": resources}] if resources is not None else []
    return {"resourceType": "CapabilityStatement", "fhirVersion": version, "rest": rest}


def test_capability_unstated_warns_but_passes() -> None:
    results = by_name(capability_checks(statement(), "STROKEWATCH_EHR__BASE_URL"))
    assert all(r.ok for r in results.values())
    assert results["ehr conditional create"].warning and results["ehr Observation search"].warning


def test_capability_refusals_and_wrong_version_fail() -> None:
    resources: list[dict[str, Any]] = [
        {"type": "Observation", "interaction": [{"code": "read"}]},
        {"type": "RiskAssessment", "interaction": [{"code": "create"}], "conditionalCreate": False},
    ]
    results = by_name(capability_checks(statement("5.0.0", resources), "STROKEWATCH_EHR__BASE_URL"))
    assert not results["ehr FHIR version"].ok and "5.0.0" in results["ehr FHIR version"].detail
    assert not results["ehr Observation search"].ok
    assert results["ehr RiskAssessment create"].ok
    assert not results["ehr conditional create"].ok and "duplicates" in results["ehr conditional create"].detail


# -- the model served by Triton ---------------------------------------------------------------
def test_triton_model_ready_and_matching_the_contract(
    migrated: Path, orthanc_peer: OrthancPeer, fhir_peer: FhirPeer, triton_peer: Any
) -> None:
    s = settings(migrated, orthanc_peer.dicomweb_url, fhir_peer.base_url, triton_url=triton_peer.http_url)
    results = by_name(run_checks(s))
    assert results["model"].ok, results["model"]
    assert "Triton" in results["model"].detail and "matches the contract" in results["model"].detail
    assert "model trained" in results
    wrong = settings(
        migrated,
        orthanc_peer.dicomweb_url,
        fhir_peer.base_url,
        triton_url=triton_peer.http_url,
        triton_model_name="no_such_model",
    )
    model = by_name(run_checks(wrong))["model"]
    assert not model.ok and "no_such_model" in model.detail
    assert "STROKEWATCH_TRITON" in (model.hint or "")
    down = settings(migrated, orthanc_peer.dicomweb_url, fhir_peer.base_url, triton_url=f"127.0.0.1:{free_port()}")
    (ready_model,) = [r for r in readiness(down, timeout_s=2) if r.name == "model"]
    assert not ready_model.ok and "STROKEWATCH_TRITON_URL" in (ready_model.hint or "")
