"""The FHIR sandbox (deploy/fhir-sandbox) against its own contract: a real server process, real HTTP."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from sandbox import FhirAuth, FhirPeer, SandboxError

pytestmark = pytest.mark.peers

FHIR_JSON = {"Content-Type": "application/fhir+json"}
HEART_RATE = {"coding": [{"system": "http://loinc.org", "code": "8867-4", "display": "Heart rate"}]}


@pytest.fixture
def fhir(fresh_fhir_peer: FhirPeer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=fresh_fhir_peer.base_url, headers=FHIR_JSON, timeout=10) as client:
        yield client


def base(client: httpx.Client) -> str:
    return str(client.base_url).rstrip("/")  # httpx adds a trailing slash


def observation(subject: str, minute: int, value: float = 70.0) -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "status": "final",
        "code": HEART_RATE,
        "subject": {"reference": subject},
        "effectiveDateTime": f"2024-03-01T10:{minute:02d}:00Z",
        "valueQuantity": {"value": value, "unit": "/min", "system": "http://unitsofmeasure.org", "code": "/min"},
    }


def transaction(*entries: dict[str, Any]) -> dict[str, Any]:
    return {"resourceType": "Bundle", "type": "transaction", "entry": list(entries)}


def post_entry(
    resource: dict[str, Any], full_url: str | None = None, if_none_exist: str | None = None
) -> dict[str, Any]:
    entry: dict[str, Any] = {"resource": resource, "request": {"method": "POST", "url": resource["resourceType"]}}
    if full_url:
        entry["fullUrl"] = full_url
    if if_none_exist:
        entry["request"]["ifNoneExist"] = if_none_exist
    return entry


def count(client: httpx.Client, resource_type: str) -> int:
    response = client.get(f"/{resource_type}", params={"_summary": "count"})
    assert response.status_code == 200
    return int(response.json()["total"])


def assert_outcome(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/fhir+json")
    body: dict[str, Any] = response.json()
    assert body["resourceType"] == "OperationOutcome"
    assert body["issue"][0]["severity"] == "error"
    return body


def test_metadata_is_an_r4_capability_statement(fhir: httpx.Client) -> None:
    response = fhir.get("/metadata")
    assert response.status_code == 200
    statement = response.json()
    assert statement["resourceType"] == "CapabilityStatement"
    assert statement["fhirVersion"] == "4.0.1"
    rest = statement["rest"][0]
    assert {"transaction", "batch"} <= {i["code"] for i in rest["interaction"]}
    observation_caps = next(r for r in rest["resource"] if r["type"] == "Observation")
    assert {"read", "vread", "create", "update", "delete", "search-type"} <= {
        i["code"] for i in observation_caps["interaction"]
    }
    params = {p["name"]: p["type"] for p in observation_caps["searchParam"]}
    assert params["date"] == "date" and params["subject"] == "reference" and params["code"] == "token"
    assert "value-quantity" not in params  # refused with 400, so not advertised
    assert "security" not in rest
    assert "Project" not in {r["type"] for r in rest["resource"]}  # R4 only, no Medplum types


def test_create_read_update_history_delete(fhir: httpx.Client) -> None:
    created = fhir.post("/Patient", json={"resourceType": "Patient", "id": "client-id", "name": [{"family": "Ng"}]})
    assert created.status_code == 201
    patient = created.json()
    assert patient["id"] != "client-id"  # the server assigns ids on create
    version1 = patient["meta"]["versionId"]
    assert created.headers["etag"] == f'W/"{version1}"'
    assert created.headers["location"] == f"{base(fhir)}/Patient/{patient['id']}/_history/{version1}"
    assert "last-modified" in created.headers

    read = fhir.get(f"/Patient/{patient['id']}")
    assert read.status_code == 200 and read.json()["name"] == [{"family": "Ng"}]
    assert read.headers["etag"] == f'W/"{version1}"'

    patient["name"] = [{"family": "Nguyen"}]
    stale = fhir.put(f"/Patient/{patient['id']}", json=patient, headers={"If-Match": 'W/"not-the-version"'})
    assert_outcome(stale, 412)
    updated = fhir.put(f"/Patient/{patient['id']}", json=patient, headers={"If-Match": f'W/"{version1}"'})
    assert updated.status_code == 200
    version2 = updated.json()["meta"]["versionId"]
    assert version2 != version1 and updated.headers["etag"] == f'W/"{version2}"'

    assert fhir.get(f"/Patient/{patient['id']}/_history/{version1}").json()["name"] == [{"family": "Ng"}]
    for _ in range(2):  # upstream reversed the stored history in place on every read
        history = fhir.get(f"/Patient/{patient['id']}/_history").json()
        assert [e["resource"]["meta"]["versionId"] for e in history["entry"]] == [version2, version1]

    patched = fhir.patch(f"/Patient/{patient['id']}", json=[{"op": "add", "path": "/gender", "value": "female"}],
                         headers={"Content-Type": "application/json-patch+json"})
    assert patched.status_code == 200 and patched.json()["gender"] == "female"

    assert fhir.delete(f"/Patient/{patient['id']}").status_code == 200
    assert_outcome(fhir.get(f"/Patient/{patient['id']}"), 404)


@pytest.mark.parametrize(
    "resource",
    [
        {"resourceType": "Patient", "favouriteColour": "blue"},  # unknown element
        {"resourceType": "Observation", "status": "final"},  # missing required code
        {"resourceType": "Patient", "birthDate": "1990-13-45"},  # not a date
        {"resourceType": "Observation", "status": "final", "code": HEART_RATE, "valueQuantity": {"value": "fast"}},
    ],
)
def test_invalid_resources_are_refused(fhir: httpx.Client, resource: dict[str, Any]) -> None:
    assert_outcome(fhir.post(f"/{resource['resourceType']}", json=resource), 400)
    assert count(fhir, resource["resourceType"]) == 0


def test_invalid_update_bad_json_and_wrong_type_are_refused(fhir: httpx.Client) -> None:
    patient = fhir.post("/Patient", json={"resourceType": "Patient"}).json()
    assert_outcome(fhir.put(f"/Patient/{patient['id']}", json={**patient, "gender": 7}), 400)
    assert_outcome(fhir.post("/Patient", content=b"{not json"), 400)
    assert_outcome(fhir.post("/Patient", json={"resourceType": "Observation"}), 400)
    assert_outcome(fhir.get("/NotAResource"), 404)


def test_search_pages_with_absolute_next_links(fhir: httpx.Client) -> None:
    patient = fhir.post("/Patient", json={"resourceType": "Patient"}).json()
    subject = f"Patient/{patient['id']}"
    response = fhir.post("/", json=transaction(*(post_entry(observation(subject, m)) for m in range(45))))
    assert response.status_code == 200

    first = fhir.get("/Observation", params={"subject": subject}).json()
    assert first["total"] == 45 and len(first["entry"]) == 20  # default _count
    seen: list[str] = []
    page: dict[str, Any] | None = first
    pages = 0
    while page is not None:
        pages += 1
        for entry in page.get("entry", []):
            assert entry["fullUrl"] == f"{base(fhir)}/Observation/{entry['resource']['id']}"
            assert entry["search"]["mode"] == "match"
            seen.append(entry["resource"]["id"])
        links = {link["relation"]: link["url"] for link in page["link"]}
        assert links["self"].startswith(f"{base(fhir)}/Observation?")
        if pages > 1:
            assert "previous" in links
        next_url = links.get("next")
        if next_url:
            assert next_url.startswith(f"{base(fhir)}/Observation?")
        page = httpx.get(next_url, timeout=10).json() if next_url else None
    assert pages == 3 and len(seen) == len(set(seen)) == 45

    big = fhir.get("/Observation", params={"subject": subject, "_count": 5000}).json()
    assert len(big["entry"]) == 45


def test_search_filters_and_sorts(fhir: httpx.Client) -> None:
    patient = fhir.post("/Patient", json={"resourceType": "Patient"}).json()
    other = fhir.post("/Patient", json={"resourceType": "Patient"}).json()
    entries = [post_entry(observation(f"Patient/{patient['id']}", m, 60 + m)) for m in (5, 1, 30, 12)]
    entries.append(post_entry(observation(f"Patient/{other['id']}", 20)))
    assert fhir.post("/", json=transaction(*entries)).status_code == 200

    bundle = fhir.get("/Observation", params={
        "subject": f"Patient/{patient['id']}", "code": "http://loinc.org|8867-4",
        "date": "ge2024-03-01T10:05:00Z", "_sort": "-date",
    }).json()
    times = [e["resource"]["effectiveDateTime"][11:16] for e in bundle["entry"]]
    assert times == ["10:30", "10:12", "10:05"]
    # A bare id on a parameter with several target types (subject) still matches, as R4 says.
    assert fhir.get("/Observation", params={"subject": patient["id"]}).json()["total"] == 4
    assert fhir.get("/Observation", params={"code": "http://loinc.org|0000-0"}).json()["total"] == 0
    assert "entry" not in fhir.get("/Observation", params={"code": "http://loinc.org|0000-0"}).json()
    by_post = fhir.post("/Observation/_search", data={"patient": other["id"]},
                        headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert by_post.status_code == 200 and by_post.json()["total"] == 1


@pytest.mark.parametrize(
    "params",
    [
        {"value-quantity": "gt100"},  # quantity
        {"combo-code-value-quantity": "8867-4$gt100"},  # composite
        {"subject.name": "Ng"},  # chained
        {"_has:Observation:patient:code": "8867-4"},  # reverse chained
        {"_include": "Observation:subject"},
        {"_revinclude": "Provenance:target"},
        {"not-a-parameter": "x"},
        {"code:text": "heart"},  # token modifier the matcher ignores
        {"subject:identifier": "urn:x|1"},
        {"_sort": "not-a-parameter"},
    ],
)
def test_searches_the_server_cannot_evaluate_are_400(fhir: httpx.Client, params: dict[str, str]) -> None:
    fhir.post("/Observation", json=observation("Patient/p", 1))
    assert_outcome(fhir.get("/Observation", params=params), 400)


def test_conditional_create_201_then_200(fhir: httpx.Client) -> None:
    patient = {"resourceType": "Patient", "identifier": [{"system": "urn:mrn", "value": "42"}]}
    first = fhir.post("/Patient", json=patient, headers={"If-None-Exist": "identifier=urn:mrn|42"})
    second = fhir.post("/Patient", json=patient, headers={"If-None-Exist": "identifier=urn:mrn|42"})
    assert first.status_code == 201 and second.status_code == 200
    assert first.json()["id"] == second.json()["id"]
    assert count(fhir, "Patient") == 1
    # Criteria the server cannot evaluate must not silently create duplicates.
    assert_outcome(fhir.post("/Patient", json=patient, headers={"If-None-Exist": "general-practitioner.name=x"}), 400)
    assert count(fhir, "Patient") == 1


def test_transaction_resolves_urn_uuid_references(fhir: httpx.Client) -> None:
    patient_urn = f"urn:uuid:{uuid.uuid4()}"
    bundle = transaction(
        post_entry({"resourceType": "Patient", "identifier": [{"system": "urn:mrn", "value": "7"}]}, patient_urn,
                   if_none_exist="identifier=urn:mrn|7"),
        *(post_entry(observation(patient_urn, m), f"urn:uuid:{uuid.uuid4()}") for m in range(12)),
    )
    response = fhir.post("/", json=bundle)
    assert response.status_code == 200, response.text
    result = response.json()
    assert result["type"] == "transaction-response" and len(result["entry"]) == 13
    assert all(e["response"]["status"].startswith("201") for e in result["entry"])
    patient_id = result["entry"][0]["resource"]["id"]
    assert result["entry"][0]["fullUrl"] == f"{base(fhir)}/Patient/{patient_id}"
    assert {e["resource"]["subject"]["reference"] for e in result["entry"][1:]} == {f"Patient/{patient_id}"}
    assert fhir.get("/Observation", params={"patient": patient_id}).json()["total"] == 12

    again = fhir.post("/", json=bundle).json()  # the conditional entry now finds the patient
    assert again["entry"][0]["response"]["status"].startswith("200")
    assert again["entry"][0]["resource"]["id"] == patient_id


def test_failed_transaction_rolls_back(fhir: httpx.Client) -> None:
    existing = fhir.post("/Patient", json={"resourceType": "Patient"}).json()
    bad = transaction(
        post_entry({"resourceType": "Patient", "name": [{"family": "Rolled-back"}]}),
        post_entry(observation(f"Patient/{existing['id']}", 1)),
        {"request": {"method": "DELETE", "url": f"Patient/{existing['id']}"}},
        post_entry({"resourceType": "Observation", "status": "final"}),  # invalid: no code
    )
    assert_outcome(fhir.post("/", json=bad), 400)
    assert count(fhir, "Patient") == 1 and count(fhir, "Observation") == 0
    assert fhir.get(f"/Patient/{existing['id']}").status_code == 200


def test_reset_empties_the_server(fhir_peer: FhirPeer, fhir: httpx.Client) -> None:
    fhir.post("/Patient", json={"resourceType": "Patient"})
    fhir_peer.reset()
    assert count(fhir, "Patient") == 0


def test_injected_429_and_503_carry_retry_after(fresh_fhir_peer: FhirPeer, fhir: httpx.Client) -> None:
    fresh_fhir_peer.inject_fault(status=429, count=2, retry_after=3)
    for _ in range(2):
        response = fhir.get("/Patient")
        assert_outcome(response, 429)
        assert response.headers["retry-after"] == "3"
    assert fhir.get("/Patient").status_code == 200

    fresh_fhir_peer.inject_fault(status=503, path="/Observation")
    assert fhir.get("/Patient").status_code == 200  # path filter: not this one
    assert_outcome(fhir.get("/Observation"), 503)
    assert fhir.get("/Observation").status_code == 200
    assert fresh_fhir_peer.stats()["faulted"] == 3


def test_injected_delay_and_dropped_connection(fresh_fhir_peer: FhirPeer, fhir: httpx.Client) -> None:
    fresh_fhir_peer.inject_fault(delay_ms=1500)
    with pytest.raises(httpx.ReadTimeout):
        fhir.get("/Patient", timeout=0.3)
    fresh_fhir_peer.inject_fault(drop=True)
    with pytest.raises(httpx.TransportError):
        fhir.get("/Patient")
    assert fhir.get("/Patient").status_code == 200


def test_missing_node_modules_is_a_clear_error(tmp_path: Path) -> None:
    app = tmp_path / "fhir-sandbox"
    app.mkdir()
    (app / "server.mjs").write_text("")
    with pytest.raises(SandboxError, match="npm ci --prefix"):
        FhirPeer(tmp_path / "work", app_dir=app).start()


def test_omit_total_still_pages(tmp_path: Path) -> None:
    with FhirPeer(tmp_path, omit_total=True) as peer, \
            httpx.Client(base_url=peer.base_url, headers=FHIR_JSON, timeout=10) as client:
        entries = [post_entry({"resourceType": "Patient", "gender": "other"}) for _ in range(3)]
        assert client.post("/", json=transaction(*entries)).status_code == 200
        page = client.get("/Patient", params={"_count": 2}).json()
        assert "total" not in page and len(page["entry"]) == 2
        assert any(link["relation"] == "next" for link in page["link"])
        assert client.get("/Patient", params={"_summary": "count"}).json()["total"] == 3


@pytest.fixture(scope="module")
def secured_peer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FhirPeer]:
    auth = FhirAuth(basic=("clinician", "pa55"), bearer="static-token", oauth_clients={"engine": "s3cret"},
                    token_ttl=1)
    with FhirPeer(tmp_path_factory.mktemp("secured-fhir"), auth=auth) as peer:
        yield peer


def test_auth_basic_and_static_bearer(secured_peer: FhirPeer) -> None:
    url = f"{secured_peer.base_url}/Patient"
    refused = httpx.get(url)
    assert_outcome(refused, 401)
    assert "Bearer" in refused.headers["www-authenticate"] and "Basic" in refused.headers["www-authenticate"]
    assert httpx.get(url, auth=("clinician", "pa55")).status_code == 200
    assert httpx.get(url, auth=("clinician", "wrong")).status_code == 401
    assert httpx.get(url, headers={"Authorization": "Bearer static-token"}).status_code == 200
    assert httpx.get(url, headers={"Authorization": "Bearer nope"}).status_code == 401

    metadata = httpx.get(f"{secured_peer.base_url}/metadata")  # public, and says where tokens come from
    assert metadata.status_code == 200
    oauth_uris = metadata.json()["rest"][0]["security"]["extension"][0]
    assert oauth_uris["extension"][0] == {"url": "token", "valueUri": secured_peer.token_url}
    smart = httpx.get(f"{secured_peer.base_url}/.well-known/smart-configuration").json()
    assert smart["token_endpoint"] == secured_peer.token_url


def test_oauth_client_credentials_tokens_work_then_expire(secured_peer: FhirPeer) -> None:
    url = f"{secured_peer.base_url}/Patient"
    form = {"grant_type": "client_credentials", "scope": "system/*.read"}
    by_basic = httpx.post(secured_peer.token_url, data=form, auth=("engine", "s3cret"))
    assert by_basic.status_code == 200, by_basic.text
    token = by_basic.json()
    assert token["token_type"] == "Bearer" and token["expires_in"] == 1
    by_post = httpx.post(secured_peer.token_url, data={**form, "client_id": "engine", "client_secret": "s3cret"})
    assert by_post.status_code == 200

    assert httpx.post(secured_peer.token_url, data=form, auth=("engine", "wrong")).json()["error"] == "invalid_client"
    wrong_grant = httpx.post(secured_peer.token_url, data={"grant_type": "password"}, auth=("engine", "s3cret"))
    assert wrong_grant.status_code == 400 and wrong_grant.json()["error"] == "unsupported_grant_type"

    bearer = {"Authorization": f"Bearer {token['access_token']}"}
    assert httpx.get(url, headers=bearer).status_code == 200
    time.sleep(1.2)
    expired = httpx.get(url, headers=bearer)
    assert expired.status_code == 401
    assert 'error="invalid_token"' in expired.headers["www-authenticate"]


class _StatefulFhirPeer(FhirPeer):
    """The sandbox started with ``--state-file`` (what bench/soak.py uses to restart the EHR)."""

    def __init__(self, workdir: Path, state_file: Path) -> None:
        super().__init__(workdir)
        self.state_file = state_file

    def command(self, app_dir: Path) -> list[str]:
        return [*super().command(app_dir), "--state-file", str(self.state_file)]


def test_state_file_keeps_resources_ids_and_content_across_a_restart(tmp_path: Path) -> None:
    state = tmp_path / "state.json"
    with _StatefulFhirPeer(tmp_path / "first", state) as peer:
        patient = httpx.post(
            f"{peer.base_url}/Patient",
            headers=FHIR_JSON,
            timeout=10,
            json={"resourceType": "Patient", "identifier": [{"system": "urn:t", "value": "7"}]},
        ).json()
        obs = httpx.post(
            f"{peer.base_url}/Observation",
            headers=FHIR_JSON,
            timeout=10,
            json=observation(f"Patient/{patient['id']}", 5, 81.0),
        ).json()
    assert state.is_file()  # written on SIGTERM

    with _StatefulFhirPeer(tmp_path / "second", state) as again:
        read = httpx.get(f"{again.base_url}/Observation/{obs['id']}", timeout=10)
        assert read.status_code == 200
        assert read.json()["valueQuantity"]["value"] == 81.0 and read.json()["meta"] == obs["meta"]
        found = httpx.get(f"{again.base_url}/Patient", params={"identifier": "urn:t|7"}, timeout=10).json()
        assert [e["resource"]["id"] for e in found["entry"]] == [patient["id"]]
        version = obs["meta"]["versionId"]
        assert httpx.get(f"{again.base_url}/Observation/{obs['id']}/_history/{version}", timeout=10).status_code == 200


def test_without_a_state_file_a_restart_starts_empty(tmp_path: Path) -> None:
    with FhirPeer(tmp_path / "first") as peer:
        created = httpx.post(
            f"{peer.base_url}/Patient", headers=FHIR_JSON, timeout=10, json={"resourceType": "Patient"}
        ).json()
    with FhirPeer(tmp_path / "second") as again:
        assert httpx.get(f"{again.base_url}/Patient/{created['id']}", timeout=10).status_code == 404


def test_searches_by_subject_follow_creates_updates_deletes_and_rollbacks(fhir: httpx.Client) -> None:
    """A search by subject reads the sandbox's subject index: it must see every write as a scan would, in the
    order a scan gives (unsorted), and not apply to a type whose ``patient`` is another element."""
    a, b = (fhir.post("/Patient", json={"resourceType": "Patient"}).json()["id"] for _ in range(2))

    def ids(subject: str, **params: str) -> list[str]:
        bundle = fhir.get("/Observation", params={"subject": subject, **params}).json()
        return [e["resource"]["id"] for e in bundle.get("entry", [])]

    assert ids(f"Patient/{a}") == []  # builds the index
    first = fhir.post("/Observation", json=observation(f"Patient/{a}", 1)).json()
    second = fhir.post("/Observation", json=observation(f"Patient/{a}", 2)).json()
    other = fhir.post("/Observation", json=observation(f"Patient/{b}", 3)).json()
    assert ids(f"Patient/{a}") == [first["id"], second["id"]]
    assert ids(f"Patient/{b}") == [other["id"]]
    # an update with the same subject keeps its place; one that moves the subject moves it
    assert fhir.put(f"/Observation/{first['id']}", json={**first, "status": "amended"}).status_code == 200
    assert ids(f"Patient/{a}") == [first["id"], second["id"]]
    moved = {**second, "subject": {"reference": f"Patient/{b}"}}
    assert fhir.put(f"/Observation/{second['id']}", json=moved).status_code == 200
    assert ids(f"Patient/{a}") == [first["id"]] and sorted(ids(f"Patient/{b}")) == sorted([other["id"], second["id"]])
    assert ids(f"Patient/{a}", status="amended") == [first["id"]]  # the matcher still decides
    assert fhir.delete(f"/Observation/{first['id']}").status_code in (200, 204)
    assert ids(f"Patient/{a}") == []
    # a failed transaction's writes are gone from searches too
    bad = transaction(post_entry(observation(f"Patient/{a}", 4)), post_entry({"resourceType": "Observation"}))
    assert_outcome(fhir.post("/", json=bad), 400)
    assert ids(f"Patient/{a}") == []
    assert len(ids(f"Patient/{b}")) == 2
    fhir.post("/Observation", json=observation(f"Patient/{a}", 5))
    assert len(ids(f"Patient/{a}")) == 1
    # AllergyIntolerance's patient is AllergyIntolerance.patient, not a subject: found by a scan
    allergy = {"resourceType": "AllergyIntolerance", "patient": {"reference": f"Patient/{a}"},
               "code": {"text": "penicillin"}, "clinicalStatus": {"coding": [
                   {"system": "http://terminology.hl7.org/CodeSystem/allergyintolerance-clinical", "code": "active"}]}}
    response = fhir.post("/AllergyIntolerance", json=allergy)
    assert response.status_code == 201, response.text
    created = response.json()
    found = fhir.get("/AllergyIntolerance", params={"patient": f"Patient/{a}"}).json()
    assert [e["resource"]["id"] for e in found.get("entry", [])] == [created["id"]]
