"""What a FHIR server's CapabilityStatement says about the interactions the engine needs (`strokewatch doctor`).

The engine reads Observations (search-type), writes RiskAssessments (create) and relies on conditional
create (If-None-Exist) so that a retry never duplicates one. A server that does not list its resources
gets the benefit of the doubt, with a warning.
"""

from __future__ import annotations

from typing import Any

from integration.domain.checks import CheckResult

_ALLOW_HINT = "use a FHIR server (or an account) that allows it"


def capability_checks(statement: dict[str, Any], url_var: str) -> list[CheckResult]:
    """``ehr FHIR version``, ``ehr Observation search``, ``ehr RiskAssessment create``, ``ehr conditional create``."""
    servers = [r for r in statement.get("rest") or [] if isinstance(r, dict) and r.get("mode") == "server"]
    listed = {str(r.get("type")): r for s in servers for r in s.get("resource") or [] if isinstance(r, dict)}
    return [
        _fhir_version(statement, url_var),
        _interaction(listed, "Observation", "search-type", "Observation search"),
        _interaction(listed, "RiskAssessment", "create", "RiskAssessment create"),
        _conditional_create(listed.get("RiskAssessment", {}).get("conditionalCreate")),
    ]


def _fhir_version(statement: dict[str, Any], url_var: str) -> CheckResult:
    version = str(statement.get("fhirVersion") or "")
    if version.startswith("4.0."):
        return CheckResult("ehr FHIR version", True, f"FHIR {version} (R4)")
    return CheckResult(
        "ehr FHIR version",
        False,
        f"the server speaks FHIR {version or '(unstated)'}, not R4 (4.0.x)",
        f"point {url_var} at the server's R4 endpoint",
    )


def _interaction(listed: dict[str, dict[str, Any]], rtype: str, code: str, label: str) -> CheckResult:
    name = f"ehr {label}"
    if not listed:
        detail = f"warning: the CapabilityStatement does not list resources; {rtype} {code} assumed"
        return CheckResult(name, True, detail, warning=True)
    codes = {str(i.get("code")) for i in listed.get(rtype, {}).get("interaction") or []}
    if code in codes:
        return CheckResult(name, True, f"{rtype} {code} supported")
    return CheckResult(name, False, f"the CapabilityStatement does not allow {rtype} {code}", _ALLOW_HINT)


def _conditional_create(stated: object) -> CheckResult:
    name = "ehr conditional create"
    if stated is True:
        return CheckResult(name, True, "RiskAssessment conditionalCreate supported")
    if stated is False:
        return CheckResult(
            name,
            False,
            "the server says RiskAssessment conditionalCreate is not supported: re-runs could write duplicates",
            _ALLOW_HINT,
        )
    return CheckResult(
        name,
        True,
        "warning: conditionalCreate unstated for RiskAssessment; relying on If-None-Exist being honoured",
        warning=True,
    )
