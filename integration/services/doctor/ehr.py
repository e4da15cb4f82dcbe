"""EHR checks: the CapabilityStatement (R4, the interactions the engine uses), auth, the identifier system."""

from __future__ import annotations

from typing import Any

import httpx

from integration.config import AuthSettings, Settings
from integration.services.doctor.http import answers_without_token, auth_rejected, json_body, prepare_auth, unreachable
from integration.services.doctor.result import CheckResult, env_name


def check_ehr(settings: Settings, *, timeout_s: float, quick: bool = False) -> list[CheckResult]:
    """/metadata is a CapabilityStatement; (doctor) R4, the interactions we use, auth accepted, identifier system."""
    ehr, url_var = settings.ehr, env_name("ehr", "base_url")
    if not ehr.base_url:
        return [CheckResult("ehr", False, "no FHIR base URL configured", f"set {url_var}")]
    base = ehr.base_url.rstrip("/")
    with httpx.Client(timeout=timeout_s, verify=ehr.verify_tls, headers={"Accept": "application/fhir+json"}) as client:
        http_auth, note, failure = prepare_auth("ehr", ehr.auth, client, fetch_token=not quick)
        try:
            resp = client.get(f"{base}/metadata", auth=http_auth)
        except httpx.HTTPError as exc:
            return [unreachable("ehr", f"{base}/metadata", exc, url_var)]
        if answers_without_token(ehr.auth, resp, quick):
            return [CheckResult("ehr", True, f"{base}/metadata answers (asks for the OAuth2 token)")]
        statement = json_body(resp)
        if resp.status_code != 200 or statement.get("resourceType") != "CapabilityStatement":
            hint = f"{url_var} must be the FHIR R4 base (the URL that /metadata and /Patient hang off)"
            return [
                CheckResult(
                    "ehr", False, f"{base}/metadata answered HTTP {resp.status_code}, not a CapabilityStatement", hint
                )
            ]
        software = statement.get("software") or {}
        name = " ".join(str(software.get(k)) for k in ("name", "version") if software.get(k)) or "FHIR server"
        results = [CheckResult("ehr", True, f"{name} at {base}: CapabilityStatement served")]
        if quick:
            return results
        results += capability_checks(statement, url_var)
        results.append(failure or _ehr_auth(base, ehr.auth, client, http_auth, note))
    results.append(_identifier_system(settings))
    return results


def capability_checks(statement: dict[str, Any], url_var: str) -> list[CheckResult]:
    version = str(statement.get("fhirVersion") or "")
    if version.startswith("4.0."):
        out = [CheckResult("ehr FHIR version", True, f"FHIR {version} (R4)")]
    else:
        out = [
            CheckResult(
                "ehr FHIR version",
                False,
                f"the server speaks FHIR {version or '(unstated)'}, not R4 (4.0.x)",
                f"point {url_var} at the server's R4 endpoint",
            )
        ]
    servers = [r for r in statement.get("rest") or [] if isinstance(r, dict) and r.get("mode") == "server"]
    listed = {str(r.get("type")): r for s in servers for r in s.get("resource") or [] if isinstance(r, dict)}
    hint = "use a FHIR server (or an account) that allows it"

    def interaction(rtype: str, code: str, label: str) -> CheckResult:
        name = f"ehr {label}"
        if not listed:
            return CheckResult(
                name,
                True,
                f"warning: the CapabilityStatement does not list resources; {rtype} {code} assumed",
                warning=True,
            )
        codes = {str(i.get("code")) for i in listed.get(rtype, {}).get("interaction") or []}
        if code in codes:
            return CheckResult(name, True, f"{rtype} {code} supported")
        return CheckResult(name, False, f"the CapabilityStatement does not allow {rtype} {code}", hint)

    out.append(interaction("Observation", "search-type", "Observation search"))
    out.append(interaction("RiskAssessment", "create", "RiskAssessment create"))
    conditional = listed.get("RiskAssessment", {}).get("conditionalCreate")
    if conditional is True:
        out.append(CheckResult("ehr conditional create", True, "RiskAssessment conditionalCreate supported"))
    elif conditional is False:
        out.append(
            CheckResult(
                "ehr conditional create",
                False,
                "the server says RiskAssessment conditionalCreate is not supported: re-runs could write duplicates",
                hint,
            )
        )
    else:
        out.append(
            CheckResult(
                "ehr conditional create",
                True,
                "warning: conditionalCreate unstated for RiskAssessment; relying on If-None-Exist being honoured",
                warning=True,
            )
        )
    return out


def _ehr_auth(
    base: str, auth: AuthSettings, client: httpx.Client, http_auth: httpx.Auth | None, note: str | None
) -> CheckResult:
    # /metadata is often anonymous; a search shows whether the credentials are accepted. Body never shown (PHI).
    probe = f"{base}/Patient?_count=1"
    try:
        resp = client.get(probe, auth=http_auth)
    except httpx.HTTPError as exc:
        return unreachable("ehr auth", probe, exc, env_name("ehr", "base_url"))
    if resp.status_code in (401, 403):
        return auth_rejected("ehr", auth, resp)
    if resp.status_code != 200:
        return CheckResult(
            "ehr auth",
            False,
            f"GET Patient?_count=1 answered HTTP {resp.status_code}",
            f"check {env_name('ehr', 'base_url')}",
        )
    return CheckResult("ehr auth", True, f"{note or 'no authentication'}: the server accepted a Patient search")


def _identifier_system(settings: Settings) -> CheckResult:
    ehr, var = settings.ehr, env_name("ehr", "patient_identifier_system")
    issuers = f"; {len(ehr.issuer_systems)} issuer-specific system(s)" if ehr.issuer_systems else ""
    if ehr.patient_identifier_system:
        return CheckResult(
            "patient identifier system",
            True,
            f"DICOM PatientID matched to Patient.identifier system {ehr.patient_identifier_system}{issuers}",
        )
    return CheckResult(
        "patient identifier system",
        True,
        f"warning: no identifier system: PatientID is matched against identifiers of any system{issuers}",
        f"set {var} to the MRN system (e.g. urn:oid:...)",
        warning=True,
    )
