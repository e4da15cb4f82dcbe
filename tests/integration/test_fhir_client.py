"""FhirEhr and its auth modes against the real FHIR sandbox (deploy/fhir-sandbox): paging, search, writes,
error mapping with retries, and HTTP Basic / bearer / OAuth2 client credentials."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from integration.adapters.fhir import FhirEhr, FhirRejected, _retry_after
from integration.adapters.fhir_auth import BasicAuth, BearerAuth, ClientCredentialsAuth
from integration.domain.types import DomainError, Outcome
from integration.domain.vitals import parse_observations, vital_codes
from sandbox import FhirAuth, FhirPeer, free_port

pytestmark = pytest.mark.peers

LOINC = "http://loinc.org"
UCUM = "http://unitsofmeasure.org"
MRN = "urn:oid:1.2.36.146.595.217.0.1"
OTHER_MRN = "urn:oid:2.16.840.1.113883.19.5"
USER, PASSWORD = "ehr-user", "s3cret-pass"
BEARER = "static-token-1234567890"
CLIENT_ID, CLIENT_SECRET = "strokewatch", "client-secret-42"
TOKEN_TTL_S = 2


# ----------------------------------------------------------------------------------------------
# Peers and seeding
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def secured_peer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FhirPeer]:
    """A second sandbox that omits Bundle.total and demands authentication (all three modes)."""
    auth = FhirAuth(
        basic=(USER, PASSWORD), bearer=BEARER, oauth_clients={CLIENT_ID: CLIENT_SECRET}, token_ttl=TOKEN_TTL_S
    )
    with FhirPeer(tmp_path_factory.mktemp("fhir-secured"), omit_total=True, test_controls=True, auth=auth) as peer:
        yield peer


@pytest.fixture
def secured(secured_peer: FhirPeer) -> Iterator[FhirPeer]:
    secured_peer.reset()
    yield secured_peer
    secured_peer.clear_faults()


class Sleeps(list[float]):
    """Records the client's back-off waits instead of sleeping, so tests stay fast and can check them."""

    def __call__(self, seconds: float) -> None:
        self.append(seconds)


def make_ehr(peer: FhirPeer, sleeps: Sleeps | None = None, **options: Any) -> FhirEhr:
    defaults: dict[str, Any] = {"timeout": 5.0, "max_retries": 3, "backoff": 0.05, "page_size": 50}
    return FhirEhr(peer.base_url, sleep=sleeps if sleeps is not None else time.sleep, **{**defaults, **options})


@pytest.fixture
def ehr(fresh_fhir_peer: FhirPeer) -> Iterator[FhirEhr]:
    with make_ehr(fresh_fhir_peer) as client:
        yield client


def post(peer: FhirPeer, resource: dict[str, Any]) -> dict[str, Any]:
    response = httpx.post(
        f"{peer.base_url}/{resource['resourceType']}",
        json=resource,
        headers={"Content-Type": "application/fhir+json", **peer.auth_headers()},
        timeout=10,
    )
    assert response.status_code == 201, response.text
    created: dict[str, Any] = response.json()
    return created


def seed_transaction(peer: FhirPeer, resources: list[dict[str, Any]]) -> list[dict[str, Any]]:
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [{"resource": r, "request": {"method": "POST", "url": r["resourceType"]}} for r in resources],
    }
    response = httpx.post(
        peer.base_url, json=bundle, headers={"Content-Type": "application/fhir+json", **peer.auth_headers()}, timeout=30
    )
    assert response.status_code == 200, response.text
    return [e["resource"] for e in response.json()["entry"]]


def patient(value: str, system: str = MRN, **extra: Any) -> dict[str, Any]:
    return {
        "resourceType": "Patient",
        "identifier": [{"system": system, "value": value}],
        "gender": "female",
        "birthDate": "1950-02-03",
        **extra,
    }


def vital(pid: str, loinc: str, value: float, unit: str, when: datetime) -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "status": "final",
        "code": {"coding": [{"system": LOINC, "code": loinc}]},
        "subject": {"reference": f"Patient/{pid}"},
        "effectiveDateTime": when.isoformat(),
        "valueQuantity": {"value": value, "unit": unit, "system": UCUM, "code": unit},
    }


def bp(pid: str, sys_v: float, dia_v: float, when: datetime) -> dict[str, Any]:
    def component(code: str, v: float) -> dict[str, Any]:
        return {
            "code": {"coding": [{"system": LOINC, "code": code}]},
            "valueQuantity": {"value": v, "unit": "mmHg", "system": UCUM, "code": "mm[Hg]"},
        }

    return {
        "resourceType": "Observation",
        "status": "final",
        "code": {"coding": [{"system": LOINC, "code": "85354-9"}]},
        "subject": {"reference": f"Patient/{pid}"},
        "effectiveDateTime": when.isoformat(),
        "component": [component("8480-6", sys_v), component("8462-4", dia_v)],
    }


T0 = datetime(2024, 5, 1, 10, 0, tzinfo=UTC)


# ----------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------


def test_paging_follows_next_links_when_total_is_omitted(secured: FhirPeer) -> None:
    pid = post(secured, patient("PAGING-1"))["id"]
    seeded = seed_transaction(
        secured, [vital(pid, "8867-4", 60 + i % 40, "/min", T0 - timedelta(hours=i)) for i in range(95)]
    )
    first_page = httpx.get(
        f"{secured.base_url}/Observation", params={"_count": "10"}, headers=secured.auth_headers(), timeout=10
    ).json()
    assert "total" not in first_page  # the server really does not count

    with make_ehr(secured, auth=BasicAuth(USER, PASSWORD), page_size=10) as ehr:
        before = secured.stats()["requests"]
        found = ehr.search_observations(pid, vital_codes(), None, None)
        pages = secured.stats()["requests"] - before

    assert sorted(r["id"] for r in found) == sorted(r["id"] for r in seeded)
    assert pages == 10  # 95 resources at 10 a page


def test_find_patient_by_identifier_system(ehr: FhirEhr, fresh_fhir_peer: FhirPeer) -> None:
    a = post(fresh_fhir_peer, patient("MRN-7", MRN))
    b = post(fresh_fhir_peer, patient("MRN-7", OTHER_MRN, gender="male"))
    post(fresh_fhir_peer, patient("MRN-77", MRN))  # the sandbox's string search is "contains": token search is not

    found = ehr.find_patient(MRN, "MRN-7")
    assert found is not None and found.fhir_id == a["id"]
    assert (found.birth_date, found.gender) == ("1950-02-03", "female")
    other = ehr.find_patient(OTHER_MRN, "MRN-7")
    assert other is not None and other.fhir_id == b["id"] and other.gender == "male"
    assert ehr.find_patient(MRN, "MRN-404") is None
    assert ehr.find_patient("urn:oid:9.9.9", "MRN-7") is None


def test_identifier_without_system_matching_two_patients_is_ambiguous(ehr: FhirEhr, fresh_fhir_peer: FhirPeer) -> None:
    post(fresh_fhir_peer, patient("MRN-8", MRN))
    post(fresh_fhir_peer, patient("MRN-8", OTHER_MRN))
    with pytest.raises(DomainError) as info:
        ehr.find_patient(None, "MRN-8")
    assert info.value.outcome is Outcome.AMBIGUOUS_PATIENT
    assert "MRN-8" not in info.value.message  # the MRN is PHI


def test_duplicate_patients_in_one_system_are_ambiguous_unless_one_was_merged(
    ehr: FhirEhr, fresh_fhir_peer: FhirPeer
) -> None:
    first = post(fresh_fhir_peer, patient("MRN-9"))
    post(fresh_fhir_peer, patient("MRN-9"))
    with pytest.raises(DomainError) as info:
        ehr.find_patient(MRN, "MRN-9")
    assert info.value.outcome is Outcome.AMBIGUOUS_PATIENT

    survivor = post(fresh_fhir_peer, patient("MRN-10"))
    post(
        fresh_fhir_peer,
        patient(
            "MRN-10", active=False, link=[{"other": {"reference": f"Patient/{survivor['id']}"}, "type": "replaced-by"}]
        ),
    )
    found = ehr.find_patient(MRN, "MRN-10")
    assert found is not None and found.fhir_id == survivor["id"] and first["id"] != survivor["id"]


def test_observation_search_by_codes_date_and_last_updated(ehr: FhirEhr, fresh_fhir_peer: FhirPeer) -> None:
    pid = post(fresh_fhir_peer, patient("OBS-1"))["id"]
    other = post(fresh_fhir_peer, patient("OBS-2"))["id"]
    seed_transaction(
        fresh_fhir_peer,
        [
            vital(pid, "8867-4", 72, "/min", T0),
            vital(pid, "8310-5", 100.4, "[degF]", T0 - timedelta(hours=3)),
            bp(pid, 150, 95, T0 - timedelta(hours=5)),
            vital(pid, "8302-2", 170, "cm", T0),  # body height: not a code we ask for
            vital(pid, "8867-4", 65, "/min", T0 - timedelta(days=40)),  # before `since`
            vital(other, "8867-4", 90, "/min", T0),  # another patient
        ],
    )
    since = T0 - timedelta(days=28)
    found = ehr.search_observations(pid, vital_codes(), since, None)
    parsed = parse_observations(found)
    assert sorted((v.feature, round(v.value, 1)) for v in parsed.accepted) == [
        ("dbp", 95),
        ("hr", 72),
        ("sbp", 150),
        ("temp", 38.0),
    ]
    assert all(r["subject"]["reference"] == f"Patient/{pid}" for r in found)

    assert {r["code"]["coding"][0]["code"] for r in ehr.search_observations(pid, ["8310-5"], since, None)} == {"8310-5"}

    cursor = max(datetime.fromisoformat(r["meta"]["lastUpdated"]) for r in found)
    time.sleep(0.01)  # lastUpdated has millisecond resolution: the next write must be later than the cursor
    newer = post(fresh_fhir_peer, vital(pid, "59408-5", 97, "%", T0 + timedelta(hours=1)))
    incremental = ehr.search_observations(pid, vital_codes(), since, cursor)
    assert [r["id"] for r in incremental] == [newer["id"]]
    with make_ehr(fresh_fhir_peer, incremental=False) as full_reads:
        assert len(full_reads.search_observations(pid, vital_codes(), since, cursor)) == len(found) + 1


def test_search_sends_params_and_reads_every_page(ehr: FhirEhr, fresh_fhir_peer: FhirPeer) -> None:
    seed_transaction(fresh_fhir_peer, [patient(f"MANY-{i}") for i in range(7)])
    with make_ehr(fresh_fhir_peer, page_size=3) as small_pages:
        assert len(small_pages.search("Patient", {"gender": "female"})) == 7
        assert small_pages.search("Patient", {"gender": "male"}) == []


def test_capability_statement(ehr: FhirEhr) -> None:
    capability = ehr.capability()
    assert capability["resourceType"] == "CapabilityStatement"
    assert capability["fhirVersion"].startswith("4.0")


def test_capability_of_a_wrong_base_url_says_so(fresh_fhir_peer: FhirPeer) -> None:
    with FhirEhr(fresh_fhir_peer.url + "/not-fhir", max_retries=0) as wrong, pytest.raises(DomainError) as info:
        wrong.capability()
    assert info.value.outcome is Outcome.EHR_REJECTED


# ----------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------


def risk_assessment(pid: str, identifier: str) -> dict[str, Any]:
    return {
        "resourceType": "RiskAssessment",
        "identifier": [{"system": "urn:strokewatch:assessment", "value": identifier}],
        "status": "final",
        "subject": {"reference": f"Patient/{pid}"},
        "occurrenceDateTime": T0.isoformat(),
        "prediction": [{"probabilityDecimal": 0.12}],
    }


def test_conditional_create_twice_gives_the_same_id(ehr: FhirEhr, fresh_fhir_peer: FhirPeer) -> None:
    pid = post(fresh_fhir_peer, patient("RA-1"))["id"]
    key = f"ra-{uuid.uuid4()}"
    first_id, created = ehr.conditional_create(risk_assessment(pid, key), "urn:strokewatch:assessment", key)
    again_id, created_again = ehr.conditional_create(risk_assessment(pid, key), "urn:strokewatch:assessment", key)
    assert (created, created_again) == (True, False)
    assert first_id == again_id
    assert len(ehr.search("RiskAssessment", {"subject": f"Patient/{pid}"})) == 1

    with make_ehr(fresh_fhir_peer, create_mode="search-first") as searching:
        assert searching.conditional_create(risk_assessment(pid, key), "urn:strokewatch:assessment", key) == (
            first_id,
            False,
        )
        other_id, other_created = searching.conditional_create(
            risk_assessment(pid, key + "-b"), "urn:strokewatch:assessment", key + "-b"
        )
    assert other_created and other_id != first_id


def test_conditional_create_is_safe_to_repeat_after_a_lost_response(fresh_fhir_peer: FhirPeer) -> None:
    pid = post(fresh_fhir_peer, patient("RA-2"))["id"]
    sleeps = Sleeps()
    with make_ehr(fresh_fhir_peer, sleeps) as ehr:
        fresh_fhir_peer.inject_fault(status=503, count=1, path="RiskAssessment")
        rid, created = ehr.conditional_create(risk_assessment(pid, "lost"), "urn:strokewatch:assessment", "lost")
        assert created and len(sleeps) == 1
        stored = ehr.search("RiskAssessment", {"identifier": "urn:strokewatch:assessment|lost"})
    assert [r["id"] for r in stored] == [rid]


def test_update_uses_if_match(ehr: FhirEhr, fresh_fhir_peer: FhirPeer) -> None:
    created = post(fresh_fhir_peer, patient("UPD-1"))
    current = ehr.read("Patient", created["id"])
    assert current is not None
    ehr.update({**current, "gender": "other"})
    after = ehr.read("Patient", created["id"])
    assert after is not None and after["gender"] == "other"
    with pytest.raises(FhirRejected) as info:
        ehr.update({**current, "gender": "unknown"})  # still carries the old versionId
    assert info.value.outcome is Outcome.EHR_REJECTED and info.value.status == 412
    assert ehr.read("Patient", "does-not-exist") is None


def test_invalid_resource_is_caught_before_sending(ehr: FhirEhr, fresh_fhir_peer: FhirPeer) -> None:
    before = fresh_fhir_peer.stats()["requests"]
    bad = {
        "resourceType": "RiskAssessment",
        "status": "final",
        "subject": {"reference": "Patient/x"},
        "prediction": "no",
    }
    with pytest.raises(DomainError) as info:
        ehr.conditional_create(bad, "urn:x", "1")
    assert info.value.outcome is Outcome.INTERNAL_ERROR and "prediction" in info.value.message
    assert fresh_fhir_peer.stats()["requests"] == before


# ----------------------------------------------------------------------------------------------
# Errors and retries
# ----------------------------------------------------------------------------------------------


def test_400_is_rejected_with_diagnostics_and_not_retried(fresh_fhir_peer: FhirPeer) -> None:
    sleeps = Sleeps()
    with make_ehr(fresh_fhir_peer, sleeps) as ehr:
        before = fresh_fhir_peer.stats()["requests"]
        with pytest.raises(FhirRejected) as info:
            ehr.search("Observation", {"value-quantity": "gt5"})  # the sandbox refuses what it cannot evaluate
    assert info.value.outcome is Outcome.EHR_REJECTED and info.value.status == 400
    assert "value-quantity" in info.value.message
    assert not info.value.retryable
    assert sleeps == [] and fresh_fhir_peer.stats()["requests"] - before == 1


def test_server_rejection_of_a_write_carries_the_operation_outcome(ehr: FhirEhr, fresh_fhir_peer: FhirPeer) -> None:
    pid = post(fresh_fhir_peer, patient("REJ-1"))["id"]
    fresh_fhir_peer.inject_fault(status=422, count=1, path="RiskAssessment")
    before = fresh_fhir_peer.stats()["requests"]
    with pytest.raises(FhirRejected) as info:
        ehr.conditional_create(risk_assessment(pid, "rej"), "urn:strokewatch:assessment", "rej")
    assert info.value.status == 422 and "injected fault 422" in info.value.message
    assert fresh_fhir_peer.stats()["requests"] - before == 1


def test_429_with_retry_after_is_retried_then_succeeds(fresh_fhir_peer: FhirPeer) -> None:
    sleeps = Sleeps()
    with make_ehr(fresh_fhir_peer, sleeps) as ehr:
        fresh_fhir_peer.inject_fault(status=429, count=2, retry_after=1)
        assert ehr.search("Patient", {}) == []
    assert sleeps == [1.0, 1.0]


def test_503_past_max_retries_is_unavailable(fresh_fhir_peer: FhirPeer) -> None:
    sleeps = Sleeps()
    with make_ehr(fresh_fhir_peer, sleeps, max_retries=2) as ehr:
        fresh_fhir_peer.inject_fault(status=503, count=10)
        before = fresh_fhir_peer.stats()["requests"]
        with pytest.raises(DomainError) as info:
            ehr.find_patient(MRN, "X")
    assert info.value.outcome is Outcome.EHR_UNAVAILABLE and info.value.retryable
    assert "503" in info.value.message and "3 attempts" in info.value.message
    assert fresh_fhir_peer.stats()["requests"] - before == 3
    assert len(sleeps) == 2 and sleeps[1] > sleeps[0]  # exponential back-off


def test_long_retry_after_is_handed_to_the_task_layer(fresh_fhir_peer: FhirPeer) -> None:
    sleeps = Sleeps()
    with make_ehr(fresh_fhir_peer, sleeps, max_retry_after=10) as ehr:
        fresh_fhir_peer.inject_fault(status=429, count=1, retry_after=120)
        with pytest.raises(DomainError) as info:
            ehr.search("Patient", {})
    assert info.value.outcome is Outcome.EHR_UNAVAILABLE and info.value.retry_after == 120
    assert sleeps == []


def test_the_waits_of_one_request_add_up_to_max_retry_after_at_most(fresh_fhir_peer: FhirPeer) -> None:
    """Each Retry-After is short, but a task must not sleep through its time limit on one request: once the waits
    would pass max_retry_after together, the task layer takes over (retryable, with the server's hint)."""
    sleeps = Sleeps()
    with make_ehr(fresh_fhir_peer, sleeps, max_retries=10, max_retry_after=25) as ehr:
        fresh_fhir_peer.inject_fault(status=429, count=10, retry_after=10)
        with pytest.raises(DomainError) as info:
            ehr.search("Patient", {})
    assert info.value.outcome is Outcome.EHR_UNAVAILABLE and info.value.retryable
    assert info.value.retry_after == 10 and "3 attempts" in info.value.message
    assert sleeps == [10.0, 10.0]  # a third wait would make 30 s > 25 s


def test_timeout_is_retried(fresh_fhir_peer: FhirPeer) -> None:
    sleeps = Sleeps()
    with make_ehr(fresh_fhir_peer, sleeps, timeout=0.5) as ehr:
        fresh_fhir_peer.inject_fault(delay_ms=2000, count=1)
        assert ehr.search("Patient", {}) == []
        assert len(sleeps) == 1
    fresh_fhir_peer.inject_fault(delay_ms=2000, count=3)
    with make_ehr(fresh_fhir_peer, sleeps, timeout=0.5, max_retries=1) as impatient, pytest.raises(DomainError) as info:
        impatient.search("Patient", {})
    assert info.value.outcome is Outcome.EHR_UNAVAILABLE and "timed out" in info.value.message


def test_dropped_connection_is_retried(fresh_fhir_peer: FhirPeer) -> None:
    sleeps = Sleeps()
    with make_ehr(fresh_fhir_peer, sleeps) as ehr:
        fresh_fhir_peer.inject_fault(drop=True, count=2)
        assert ehr.search("Patient", {}) == []
    assert len(sleeps) == 2


def test_ehr_down_is_unavailable(tmp_path: Path) -> None:
    sleeps = Sleeps()
    port = free_port()  # nothing listens there
    ehr = FhirEhr(f"http://127.0.0.1:{port}/fhir", timeout=2, max_retries=2, backoff=0.01, sleep=sleeps)
    with ehr, pytest.raises(DomainError) as info:
        ehr.search_observations("p1", vital_codes(), None, None)
    assert info.value.outcome is Outcome.EHR_UNAVAILABLE and info.value.retryable
    assert f"127.0.0.1:{port}" in info.value.message and len(sleeps) == 2


def test_retry_after_accepts_seconds_and_http_dates() -> None:
    assert _retry_after("7") == 7.0
    later = format_datetime(datetime.now(UTC) + timedelta(seconds=30), usegmt=True)
    seconds = _retry_after(later)
    assert seconds is not None and 25 <= seconds <= 31
    assert _retry_after(format_datetime(datetime(2000, 1, 1, tzinfo=UTC), usegmt=True)) == 0.0
    assert _retry_after("soon") is None and _retry_after(None) is None


# ----------------------------------------------------------------------------------------------
# Authentication
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "auth",
    [
        pytest.param(lambda peer: BasicAuth(USER, PASSWORD), id="basic"),
        pytest.param(lambda peer: BearerAuth(BEARER), id="bearer"),
        pytest.param(lambda peer: ClientCredentialsAuth(peer.token_url, CLIENT_ID, CLIENT_SECRET), id="oauth-basic"),
        pytest.param(
            lambda peer: ClientCredentialsAuth(
                peer.token_url, CLIENT_ID, CLIENT_SECRET, client_auth="client_secret_post", scope="system/*.read"
            ),
            id="oauth-post",
        ),
    ],
)
def test_each_auth_mode_is_accepted(secured: FhirPeer, auth: Any) -> None:
    post(secured, patient("AUTH-1"))
    with make_ehr(secured, auth=auth(secured)) as ehr:
        found = ehr.find_patient(MRN, "AUTH-1")
    assert found is not None


@pytest.mark.parametrize(
    "auth",
    [
        pytest.param(lambda peer: None, id="none"),
        pytest.param(lambda peer: BasicAuth(USER, "wrong"), id="basic"),
        pytest.param(lambda peer: BearerAuth("wrong-token"), id="bearer"),
    ],
)
def test_wrong_credentials_are_rejected_with_401(secured: FhirPeer, auth: Any) -> None:
    sleeps = Sleeps()
    with make_ehr(secured, sleeps, auth=auth(secured)) as ehr, pytest.raises(FhirRejected) as info:
        ehr.search("Patient", {})
    assert info.value.outcome is Outcome.EHR_REJECTED and info.value.status == 401
    assert "credentials" in info.value.message and sleeps == []
    assert "wrong" not in info.value.message


def test_wrong_client_secret_is_rejected_without_leaking_it(secured: FhirPeer) -> None:
    auth = ClientCredentialsAuth(secured.token_url, CLIENT_ID, "not-the-secret")
    with make_ehr(secured, auth=auth) as ehr, pytest.raises(DomainError) as info:
        ehr.search("Patient", {})
    assert info.value.outcome is Outcome.EHR_REJECTED and "invalid_client" in info.value.message
    assert "not-the-secret" not in info.value.message and "not-the-secret" not in repr(auth)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_oauth_token_is_cached_and_refreshed_before_expiry(secured: FhirPeer) -> None:
    clock = FakeClock()
    auth = ClientCredentialsAuth(secured.token_url, CLIENT_ID, CLIENT_SECRET, clock=clock)
    issued = secured.stats()["tokensIssued"]
    with make_ehr(secured, auth=auth) as ehr:
        for _ in range(3):
            ehr.search("Patient", {})
        assert secured.stats()["tokensIssued"] - issued == 1 and auth.tokens_fetched == 1

        clock.now += TOKEN_TTL_S / 2 + 0.01  # past the refresh point (half the lifetime for short tokens)
        ehr.search("Patient", {})
        assert secured.stats()["tokensIssued"] - issued == 2 and auth.tokens_fetched == 2


def test_oauth_token_expired_on_the_server_is_replaced_after_a_401(secured: FhirPeer) -> None:
    clock = FakeClock()  # frozen: the client believes its token is still fresh
    auth = ClientCredentialsAuth(secured.token_url, CLIENT_ID, CLIENT_SECRET, clock=clock)
    with make_ehr(secured, auth=auth) as ehr:
        ehr.search("Patient", {})
        time.sleep(TOKEN_TTL_S + 0.5)  # the server's clock moves on and expires the token
        ehr.search("Patient", {})
    assert auth.tokens_fetched == 2


def test_oauth_token_endpoint_down_is_unavailable(secured: FhirPeer) -> None:
    auth = ClientCredentialsAuth(f"http://127.0.0.1:{free_port()}/oauth/token", CLIENT_ID, CLIENT_SECRET)
    with make_ehr(secured, auth=auth) as ehr, pytest.raises(DomainError) as info:
        ehr.search("Patient", {})
    assert info.value.outcome is Outcome.EHR_UNAVAILABLE and "token endpoint" in info.value.message


def test_oauth_token_is_fetched_once_by_concurrent_threads(secured: FhirPeer) -> None:
    from concurrent.futures import ThreadPoolExecutor

    auth = ClientCredentialsAuth(secured.token_url, CLIENT_ID, CLIENT_SECRET, clock=FakeClock())
    issued = secured.stats()["tokensIssued"]
    with make_ehr(secured, auth=auth) as ehr, ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(lambda _: ehr.search("Patient", {}), range(16)))
    assert results == [[]] * 16
    assert secured.stats()["tokensIssued"] - issued == 1 and auth.tokens_fetched == 1


def test_identifiers_in_query_strings_stay_out_of_the_logs(
    ehr: FhirEhr, fresh_fhir_peer: FhirPeer, caplog: pytest.LogCaptureFixture
) -> None:
    post(fresh_fhir_peer, patient("PHI-MRN-123"))
    # httpx's own level too: the engine's entrypoints set it to WARNING, a library user may not
    with caplog.at_level("DEBUG"), caplog.at_level("DEBUG", logger="httpx"):
        assert ehr.find_patient(MRN, "PHI-MRN-123") is not None
        assert ehr.find_patient(MRN, "PHI-MRN-404") is None
    assert "HTTP Request: GET" in caplog.text  # httpx did log the requests...
    assert "PHI-MRN" not in caplog.text  # ...without the identifier
