"""FhirEhr: the ``Ehr`` port over FHIR R4 REST (httpx), for any conformant server.

Errors (issue 2): a 4xx other than 408/429 is ``DomainError(EHR_REJECTED)`` with the server's
OperationOutcome diagnostics and is not retried. 408, 429, 5xx, timeouts and connection errors are
retried here a few times with exponential backoff, honouring ``Retry-After`` (seconds or HTTP-date, clamped to
``retry_after_cap_s``, garbage ignored: ``domain.retry.parse_retry_after``);
when retries run out, or the waits of one request would add up to more than ``max_retry_after`` seconds (a
task must not sleep into its time limit), the result is
``DomainError(EHR_UNAVAILABLE, retry_after=...)`` so the task layer can retry later. Every write is
conditional (If-None-Exist, If-Match) or a PUT, so repeating one after a lost response is safe.

Log lines and error messages carry the resource type and status, never query strings (they hold MRNs).
"""

from __future__ import annotations

import logging
import random
import ssl
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, Literal
from urllib.parse import urlencode, urljoin, urlsplit, urlunsplit

import httpx
from fhir.resources.R4B import get_fhir_model_class
from pydantic import ValidationError

from integration.adapters.fhir_auth import ClientCredentialsAuth, auth_note, auth_rejected
from integration.adapters.fhir_capability import capability_checks
from integration.adapters.tls import default_context, presents_client_cert, tls_failure
from integration.domain.checks import CheckResult, env_name, unreachable
from integration.domain.redact import describe_exception
from integration.domain.retry import DEFAULT_RETRY_AFTER_CAP_S, parse_retry_after
from integration.domain.types import DomainError, Outcome, PatientInfo

log = logging.getLogger(__name__)

FHIR_JSON = "application/fhir+json"
LOINC_SYSTEM = "http://loinc.org"
RETRYABLE_STATUS = frozenset({408, 429})

CreateMode = Literal["if-none-exist", "search-first"]


class _RedactQueries(logging.Filter):
    """httpx logs every request URL at INFO; FHIR query strings hold identifiers (MRNs): drop them."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple) and any(isinstance(a, httpx.URL) and a.query for a in record.args):
            record.args = tuple(
                a.copy_with(query=b"redacted") if isinstance(a, httpx.URL) and a.query else a for a in record.args
            )
        return True


def redact_httpx_queries() -> None:
    """Install the filter on the ``httpx`` logger once per process (idempotent)."""
    httpx_log = logging.getLogger("httpx")
    if not any(isinstance(f, _RedactQueries) for f in httpx_log.filters):
        httpx_log.addFilter(_RedactQueries())


class FhirRejected(DomainError):
    """EHR_REJECTED from an HTTP 4xx answer; ``status`` says which."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(Outcome.EHR_REJECTED, message)
        self.status = status


class FhirEhr:
    """A FHIR R4 server.

    ``create_mode="search-first"`` is for servers that ignore If-None-Exist: it searches for the identifier
    before creating (still sending the header). ``incremental=False`` is for servers that do not support
    ``_lastUpdated`` on Observation: every sync re-reads the whole window (parsing de-duplicates).
    ``tls`` is the context from ``adapters.tls.ssl_context`` (default: TLS 1.2+, this machine's trust store);
    a failed handshake is EHR_UNAVAILABLE naming the certificate problem, without in-process retries.
    """

    def __init__(
        self,
        base_url: str,
        *,
        auth: httpx.Auth | None = None,
        timeout: float = 30.0,
        max_retries: int = 3,
        backoff: float = 0.5,
        page_size: int = 200,
        client: httpx.Client | None = None,
        max_retry_after: float = 30.0,
        max_pages: int = 10_000,
        create_mode: CreateMode = "if-none-exist",
        incremental: bool = True,
        tls: ssl.SSLContext | None = None,
        sleep: Callable[[float], None] = time.sleep,
        max_resources: int = 50_000,
        retry_after_cap_s: float = DEFAULT_RETRY_AFTER_CAP_S,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.max_retries = max_retries
        self.backoff = backoff
        self.page_size = page_size
        self.max_retry_after = max_retry_after
        #: A Retry-After beyond this is clamped to it (the task layer waits at most this long for the server).
        self.retry_after_cap_s = retry_after_cap_s
        self.max_pages = max_pages
        #: Resources one vitals sync may read, all pages together (refused beyond, never truncated).
        self.max_resources = max_resources
        self.create_mode = create_mode
        self.incremental = incremental
        self._sleep = sleep
        self._owns_client = client is None
        self._tls = tls or default_context()
        self._client = client or httpx.Client(timeout=timeout, verify=self._tls)
        self._auth = auth
        self._headers = {"Accept": FHIR_JSON, "User-Agent": "strokewatch"}
        redact_httpx_queries()

    def close(self) -> None:
        if self._owns_client:
            self._client.close()
        close_auth = getattr(self._auth, "close", None)
        if callable(close_auth):
            close_auth()

    def __enter__(self) -> FhirEhr:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------------------------------
    # The Ehr port
    # ------------------------------------------------------------------------------------------

    def find_patient(self, system: str | None, value: str) -> PatientInfo | None:
        token = f"{_escape(system)}|{_escape(value)}" if system else _escape(value)
        bundle = self._get_json("Patient", {"identifier": token, "_count": "10"})
        # Servers may ignore a search parameter they do not support and return everyone: check the match.
        patients = [
            p for p in _matches(bundle) if p.get("resourceType") == "Patient" and _has_identifier(p, system, value)
        ]
        if len(patients) > 1:
            # A merged record points at its survivor (link type replaced-by); inactive ones are not candidates.
            live = [p for p in patients if p.get("active", True) and not _replaced(p)]
            patients = live if live else patients
        if len(patients) > 1:
            raise DomainError(
                Outcome.AMBIGUOUS_PATIENT,
                f"{len(patients)} Patients carry the identifier"
                + (f" in system {system}" if system else " (any system)")
                + "; merge them in the EHR or configure the identifier system",
            )
        if not patients:
            return None
        return _patient_info(patients[0])

    def patients_updated_since(self, since: datetime) -> list[PatientInfo]:
        """Patients created or changed after ``since`` (``_lastUpdated``), every page followed."""
        found = self.search("Patient", {"_lastUpdated": f"gt{_instant(since)}"})
        return [_patient_info(p) for p in found if p.get("resourceType") == "Patient" and p.get("id")]

    def search_observations(
        self, patient_id: str, codes: Sequence[str], since: datetime | None, updated_since: datetime | None
    ) -> list[dict[str, Any]]:
        params: dict[str, str] = {"subject": f"Patient/{patient_id}"}
        if codes:
            params["code"] = ",".join(f"{LOINC_SYSTEM}|{_escape(c)}" for c in codes)
        if since is not None:
            params["date"] = f"ge{_instant(since)}"
        if updated_since is not None and self.incremental:
            params["_lastUpdated"] = f"gt{_instant(updated_since)}"
        return self.search("Observation", params, limit=self.max_resources)

    def search(self, resource_type: str, params: dict[str, str], *, limit: int | None = None) -> list[dict[str, Any]]:
        """All matching resources, every page followed (works whether or not Bundle.total is sent); more than
        ``limit`` is TOO_LARGE, found while paging (a truncated answer would lose data behind a cursor)."""
        query = {"_count": str(self.page_size), **params}
        found: list[dict[str, Any]] = []
        for page in self._pages(resource_type, query):
            found.extend(_matches(page))
            if limit is not None and len(found) > limit:
                raise DomainError(
                    Outcome.TOO_LARGE,
                    f"{resource_type} search: more than {limit} resources for one sync; the limit is {limit} "
                    "(STROKEWATCH_LIMITS__MAX_FHIR_RESOURCES_PER_SYNC)",
                )
        return found

    def conditional_create(
        self, resource: dict[str, Any], identifier_system: str, identifier_value: str
    ) -> tuple[str, bool]:
        rtype = _resource_type(resource)
        _validate(resource)
        token = f"{_escape(identifier_system)}|{_escape(identifier_value)}"
        if self.create_mode == "search-first":
            found = self._get_json(rtype, {"identifier": token, "_count": "2"})
            existing = list(_matches(found))
            if len(existing) == 1:
                return str(existing[0]["id"]), False
            if len(existing) > 1:
                raise DomainError(Outcome.EHR_REJECTED, f"several {rtype} resources carry the same identifier")
        response = self._send(
            "POST",
            f"{self.base_url}/{rtype}",
            json=resource,
            headers={"Content-Type": FHIR_JSON, "If-None-Exist": urlencode({"identifier": token})},
        )
        body = _json(response)
        rid = body.get("id") if body.get("resourceType") == rtype else None
        rid = rid or _id_from_location(response.headers.get("Location") or response.headers.get("Content-Location"))
        if not rid:
            raise DomainError(
                Outcome.EHR_REJECTED, f"create {rtype}: server answered {response.status_code} without id"
            )
        return str(rid), response.status_code == 201

    def update(self, resource: dict[str, Any]) -> None:
        rtype = _resource_type(resource)
        rid = resource.get("id")
        if not rid:
            raise DomainError(Outcome.INTERNAL_ERROR, f"update {rtype}: resource has no id")
        _validate(resource)
        headers = {"Content-Type": FHIR_JSON}
        version = (resource.get("meta") or {}).get("versionId")
        if version:
            headers["If-Match"] = f'W/"{version}"'
        self._send("PUT", f"{self.base_url}/{rtype}/{rid}", json=resource, headers=headers)

    # ------------------------------------------------------------------------------------------
    # Beyond the port
    # ------------------------------------------------------------------------------------------

    def read(self, resource_type: str, resource_id: str) -> dict[str, Any] | None:
        try:
            return _json(self._send("GET", f"{self.base_url}/{resource_type}/{resource_id}"))
        except DomainError as err:
            if isinstance(err, FhirRejected) and err.status in (404, 410):
                return None
            raise

    def create(self, resource: dict[str, Any]) -> str:
        """A plain create (POST), for records that are written once and never matched again (AuditEvent).
        Returns the server-assigned id ("" when the server sends none)."""
        rtype = _resource_type(resource)
        _validate(resource)
        response = self._send("POST", f"{self.base_url}/{rtype}", json=resource, headers={"Content-Type": FHIR_JSON})
        body = _json(response)
        rid = body.get("id") if body.get("resourceType") == rtype else None
        return str(rid or _id_from_location(response.headers.get("Location")) or "")

    def capability(self) -> dict[str, Any]:
        """The CapabilityStatement (GET /metadata), for `strokewatch doctor`."""
        body = _json(self._send("GET", f"{self.base_url}/metadata"))
        if body.get("resourceType") != "CapabilityStatement":
            raise DomainError(
                Outcome.EHR_REJECTED,
                f"{self.base_url}/metadata is not a CapabilityStatement (got {body.get('resourceType')!r}): "
                "is the base URL right?",
            )
        return body

    # ------------------------------------------------------------------------------------------
    # Preflight (`strokewatch doctor`, readiness)
    # ------------------------------------------------------------------------------------------

    name = "ehr"

    def probe(self, *, quick: bool) -> list[CheckResult]:
        """``ehr``: /metadata is a CapabilityStatement, asked once (no retries) with this adapter's client and auth.

        Doctor (not ``quick``) adds what the statement says about the interactions the engine uses and
        ``ehr auth``: a fresh OAuth2 token when configured, and a Patient search the credentials must pass.
        """
        url_var = env_name("ehr", "base_url")
        token = self._auth.probe_token("ehr", quick=quick) if isinstance(self._auth, ClientCredentialsAuth) else None
        if token is not None and not token.ok and quick:
            return [CheckResult("ehr", False, token.detail, token.hint)]
        auth = None if token is not None and not token.ok else self._auth  # no token: is the server there at all?
        metadata = f"{self.base_url}/metadata"
        try:
            response = self._client.get(metadata, headers=self._headers, auth=auth)
        except httpx.HTTPError as exc:
            failed = unreachable("ehr", metadata, exc, url_var, env_name("ehr", "tls"), presents_client_cert(self._tls))
            return [failed] if quick or token is None or token.ok else [failed, token]  # with why no token
        except DomainError as err:  # a token fetched again after a 401
            return [CheckResult("ehr", False, err.message, f"check {env_name('ehr', 'auth', 'token_url')}")]
        statement = _json_object(response)
        if response.status_code != 200 or statement.get("resourceType") != "CapabilityStatement":
            detail = f"{metadata} answered HTTP {response.status_code}, not a CapabilityStatement"
            hint = f"{url_var} must be the FHIR R4 base (the URL that /metadata and /Patient hang off)"
            return [CheckResult("ehr", False, detail, hint)]
        software = statement.get("software") or {}
        served = " ".join(str(software.get(k)) for k in ("name", "version") if software.get(k)) or "FHIR server"
        results = [CheckResult("ehr", True, f"{served} at {self.base_url}: CapabilityStatement served")]
        if quick:
            return results
        results += capability_checks(statement, url_var)
        results.append(token if token is not None and not token.ok else self._probe_auth(auth, token))
        return results

    def _probe_auth(self, auth: httpx.Auth | None, token: CheckResult | None) -> CheckResult:
        # /metadata is often anonymous; a search shows whether the credentials are accepted. Body never shown (PHI).
        search = f"{self.base_url}/Patient?_count=1"
        try:
            response = self._client.get(search, headers=self._headers, auth=auth)
        except httpx.HTTPError as exc:
            url_var, tls = env_name("ehr", "base_url"), env_name("ehr", "tls")
            return unreachable("ehr auth", search, exc, url_var, tls, presents_client_cert(self._tls))
        except DomainError as err:
            return CheckResult("ehr auth", False, err.message, f"check {env_name('ehr', 'auth', 'token_url')}")
        if response.status_code in (401, 403):
            return auth_rejected("ehr", auth, response)
        if response.status_code != 200:
            detail = f"GET Patient?_count=1 answered HTTP {response.status_code}"
            return CheckResult("ehr auth", False, detail, f"check {env_name('ehr', 'base_url')}")
        return CheckResult("ehr auth", True, f"{auth_note(auth, token)}: the server accepted a Patient search")

    # ------------------------------------------------------------------------------------------
    # HTTP
    # ------------------------------------------------------------------------------------------

    def _get_json(self, resource_type: str, params: Mapping[str, str]) -> dict[str, Any]:
        return _json(self._send("GET", f"{self.base_url}/{resource_type}", params=params))

    def _pages(self, resource_type: str, params: Mapping[str, str]) -> Iterator[dict[str, Any]]:
        page = self._get_json(resource_type, params)
        seen: set[str] = set()
        for _ in range(self.max_pages):
            yield page
            link = _next_link(page)
            if link is None:
                return
            url = self._same_origin(urljoin(self.base_url + "/", link))
            if url in seen:
                raise DomainError(Outcome.EHR_REJECTED, f"{resource_type} search: the server's next links loop")
            seen.add(url)
            page = _json(self._send("GET", url))
        raise DomainError(Outcome.EHR_REJECTED, f"{resource_type} search: more than {self.max_pages} pages")

    def _same_origin(self, url: str) -> str:
        """Servers behind proxies often put their internal host in links; never send credentials elsewhere."""
        base, link = urlsplit(self.base_url), urlsplit(url)
        if (link.scheme, link.netloc) == (base.scheme, base.netloc):
            return url
        log.warning("FHIR next link names another origin (%s); following it on %s", link.netloc, base.netloc)
        return urlunsplit((base.scheme, base.netloc, link.path, link.query, ""))

    def _send(
        self,
        method: str,
        url: str,
        *,
        params: Mapping[str, str] | None = None,
        json: Any = None,
        headers: Mapping[str, str] | None = None,
    ) -> httpx.Response:
        what = f"{method} {_describe(url, self.base_url)}"
        waited = 0.0
        for attempt in range(self.max_retries + 1):
            retry_after: float | None = None
            try:
                response = self._client.request(
                    method, url, params=params, json=json, headers={**self._headers, **(headers or {})}, auth=self._auth
                )
            except httpx.TimeoutException as exc:
                problem = f"{what}: timed out ({type(exc).__name__})"
            except httpx.TransportError as exc:
                tls = tls_failure(exc, "ehr", env_name("ehr", "base_url"), self._tls)
                if tls is not None:  # no point retrying at once; the task layer retries once it is fixed
                    message = f"{what}: TLS failed: {tls.explanation}; {tls.hint}"
                    raise DomainError(Outcome.EHR_UNAVAILABLE, message) from exc
                problem = f"{what}: cannot reach {urlsplit(self.base_url).netloc} ({type(exc).__name__})"
            else:
                status = response.status_code
                if status < 400:
                    log.debug("%s -> %d", what, status)
                    return response
                if status < 500 and status not in RETRYABLE_STATUS:
                    raise _rejected(what, response)
                retry_after = _retry_after(response.headers.get("Retry-After"), self.retry_after_cap_s)
                problem = f"{what}: {status} {_diagnostics(response) or response.reason_phrase}"
            wait = retry_after if retry_after is not None else self.backoff * 2**attempt * random.uniform(0.75, 1.0)
            if attempt >= self.max_retries or waited + wait > self.max_retry_after:
                raise DomainError(
                    Outcome.EHR_UNAVAILABLE,
                    f"{problem} (after {attempt + 1} attempt{'s' if attempt else ''})",
                    retry_after=retry_after,
                )
            log.info("%s; retry %d/%d in %.2f s", problem, attempt + 1, self.max_retries, wait)
            self._sleep(wait)
            waited += wait
        raise AssertionError("unreachable")


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------


def _escape(value: str | None) -> str:
    """FHIR search escaping: \\ , | and $ inside a token value are escaped with a backslash."""
    text = value or ""
    for ch in ("\\", ",", "|", "$"):
        text = text.replace(ch, "\\" + ch)
    return text


def _instant(moment: datetime) -> str:
    aware = moment if moment.tzinfo else moment.replace(tzinfo=UTC)
    return aware.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _matches(bundle: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
    for entry in bundle.get("entry") or []:
        mode = (entry.get("search") or {}).get("mode", "match")
        resource = entry.get("resource")
        if mode == "match" and isinstance(resource, dict):
            yield resource


def _next_link(bundle: Mapping[str, Any]) -> str | None:
    for link in bundle.get("link") or []:
        if link.get("relation") == "next" and link.get("url"):
            return str(link["url"])
    return None


def _has_identifier(patient: Mapping[str, Any], system: str | None, value: str) -> bool:
    """Identifier values are compared ignoring case (servers differ); the system must match exactly."""
    return any(
        isinstance(i, Mapping)
        and str(i.get("value", "")).casefold() == value.casefold()
        and (system is None or i.get("system") == system)
        for i in patient.get("identifier") or []
    )


def _patient_info(patient: Mapping[str, Any]) -> PatientInfo:
    identifiers = tuple(
        (str(i.get("system") or ""), str(i["value"]))
        for i in patient.get("identifier") or []
        if isinstance(i, Mapping) and i.get("value")
    )
    return PatientInfo(str(patient["id"]), patient.get("birthDate"), patient.get("gender"), identifiers)


def _replaced(patient: Mapping[str, Any]) -> bool:
    return any(link.get("type") == "replaced-by" for link in patient.get("link") or [])


def _resource_type(resource: Mapping[str, Any]) -> str:
    rtype = resource.get("resourceType")
    if not isinstance(rtype, str) or not rtype.isalpha():
        raise DomainError(Outcome.INTERNAL_ERROR, "resource without a valid resourceType")
    return rtype


def _validate(resource: dict[str, Any]) -> None:
    """Catch a malformed resource before the server does, with a message that names the field."""
    try:
        get_fhir_model_class(_resource_type(resource)).model_validate(resource)
    except KeyError:
        raise DomainError(
            Outcome.INTERNAL_ERROR, f"unknown FHIR R4 resource type {resource['resourceType']!r}"
        ) from None
    except ValidationError as exc:
        fields = "; ".join(".".join(str(p) for p in e["loc"]) + f": {e['msg']}" for e in exc.errors()[:5])
        raise DomainError(Outcome.INTERNAL_ERROR, f"invalid {resource['resourceType']}: {fields}") from None


def _json(response: httpx.Response) -> dict[str, Any]:
    if not response.content:
        return {}
    try:
        body = response.json()
    except ValueError:
        raise DomainError(
            Outcome.EHR_REJECTED, f"{response.request.method} answered {response.status_code} with non-JSON content"
        ) from None
    return body if isinstance(body, dict) else {}


def _json_object(response: httpx.Response) -> dict[str, Any]:
    """The answer's JSON object, or {} (anything else, or no JSON): for messages, never raises."""
    try:
        body = response.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


def _diagnostics(response: httpx.Response) -> str:
    """The OperationOutcome's diagnostics / details text, shortened."""
    try:
        body = response.json()
    except ValueError:
        return ""
    if not isinstance(body, dict) or body.get("resourceType") != "OperationOutcome":
        return ""
    texts = []
    for issue in body.get("issue") or []:
        text = issue.get("diagnostics") or (issue.get("details") or {}).get("text") or issue.get("code")
        where = ", ".join(issue.get("expression") or [])
        if text:
            texts.append(f"{text} ({where})" if where else str(text))
    return _scrub("; ".join(texts), response)[:500]


def _scrub(text: str, response: httpx.Response) -> str:
    """A server's diagnostics often echo the search that failed (``identifier=urn:...|MRN``): every value the
    request searched by is replaced by its pseudonym, so no MRN reaches a failure record or a log line."""
    try:
        params = response.request.url.params
    except RuntimeError:  # a response built without a request (tests)
        return text
    values = {part for key, value in params.multi_items() if "identifier" in key
              for part in (value, *value.split("|")[1:])}
    if not text or not values:
        return text
    return describe_exception(Exception(text), values, limit=10 * len(text)).removeprefix("Exception: ")


def _rejected(what: str, response: httpx.Response) -> FhirRejected:
    status = response.status_code
    hint = {401: " (check the EHR credentials)", 403: " (the client lacks permission)"}.get(status, "")
    return FhirRejected(status, f"{what}: {status} {_diagnostics(response) or response.reason_phrase}{hint}")


def _retry_after(raw: str | None, cap_s: float = DEFAULT_RETRY_AFTER_CAP_S) -> float | None:
    """Seconds from a Retry-After value, clamped to [0, cap_s]; None for none or garbage."""
    return parse_retry_after(raw, datetime.now(UTC), cap_s)


def _id_from_location(location: str | None) -> str | None:
    """``.../Type/id/_history/v`` or ``Type/id`` -> id."""
    if not location:
        return None
    parts = [p for p in urlsplit(location).path.split("/") if p]
    if "_history" in parts:
        parts = parts[: parts.index("_history")]
    return parts[-1] if len(parts) >= 2 else None


def _describe(url: str, base_url: str) -> str:
    """The resource type (and operation) of a URL, without ids' query strings."""
    path = urlsplit(url).path
    base_path = urlsplit(base_url).path
    rel = path[len(base_path) :] if path.startswith(base_path) else path
    return "/" + rel.strip("/").split("/")[0] if rel.strip("/") else "/"
