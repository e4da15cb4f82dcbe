"""The EHR alert for a high score: a FHIR R4 ``Flag`` on the patient, as plain JSON. No I/O.

A Flag is FHIR's "prospective warning ... presented as a label in a prominent location in the record"; it has a
status (active/inactive) and a ``period``, so "the risk is high now" opens one and a later score below the threshold
closes it (status ``inactive``, ``period.end``). It points at the RiskAssessment that raised it (and every later one
that kept it open) with the core extension ``flag-detail``, R4's standard way for a Flag to reference its evidence.
One Flag per episode above the threshold: its ``identifier`` comes from the assessment that opened it, written with
a conditional create, so a retry or a re-run of the same assessment finds it instead of adding another.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any, Literal

from integration.domain.policy import RiskPolicy

FLAG_IDENTIFIER_SYSTEM = "urn:strokewatch:flag"
FLAG_DETAIL_URL = "http://hl7.org/fhir/StructureDefinition/flag-detail"
FLAG_CATEGORY_SYSTEM = "http://terminology.hl7.org/CodeSystem/flag-category"
FLAG_CODE_SYSTEM = "urn:strokewatch:flag-code"
FLAG_CODE = "stroke-risk-high"

Action = Literal["open", "keep", "close", "none"]


def flag_identifier(opening_assessment: str) -> str:
    return f"stroke-risk-alert-{opening_assessment}"


def decide(alert: bool, active: Iterable[Mapping[str, Any]]) -> Action:
    """Above the threshold: open a Flag unless one is active (keep it); below: close the active ones, if any."""
    any_active = any(True for _ in active)
    if alert:
        return "keep" if any_active else "open"
    return "close" if any_active else "none"


def is_ours(flag: Mapping[str, Any]) -> bool:
    return any(i.get("system") == FLAG_IDENTIFIER_SYSTEM for i in flag.get("identifier") or [])


def build_flag(
    *,
    patient_fhir_id: str,
    opening_assessment: str,
    risk_assessment_id: str,
    probability: float,
    band: str,
    start: datetime,
    device_id: str | None = None,
) -> dict[str, Any]:
    text = (
        f"StrokeWatch: {RiskPolicy.band_display(band).lower()} of stroke within 90 days "
        f"(probability {probability:.0%}); see the RiskAssessment"
    )
    flag: dict[str, Any] = {
        "resourceType": "Flag",
        "identifier": [{"system": FLAG_IDENTIFIER_SYSTEM, "value": flag_identifier(opening_assessment)}],
        "extension": [detail(risk_assessment_id)],
        "status": "active",
        "category": [{"coding": [{"system": FLAG_CATEGORY_SYSTEM, "code": "clinical", "display": "Clinical"}]}],
        "code": {"coding": [{"system": FLAG_CODE_SYSTEM, "code": FLAG_CODE, "display": "High stroke risk"}],
                 "text": text},
        "subject": {"reference": f"Patient/{patient_fhir_id}"},
        "period": {"start": _iso(start)},
    }
    if device_id:
        flag["author"] = {"reference": f"Device/{device_id}"}
    return flag


def detail(risk_assessment_id: str) -> dict[str, Any]:
    return {"url": FLAG_DETAIL_URL, "valueReference": {"reference": f"RiskAssessment/{risk_assessment_id}"}}


def with_detail(flag: Mapping[str, Any], risk_assessment_id: str) -> dict[str, Any] | None:
    """The Flag also pointing at this RiskAssessment; None when it already does."""
    ext = detail(risk_assessment_id)
    if ext in (flag.get("extension") or []):
        return None
    return {**flag, "extension": [*(flag.get("extension") or []), ext]}


def closed(flag: Mapping[str, Any], end: datetime, risk_assessment_id: str) -> dict[str, Any]:
    """The Flag made inactive at ``end``, pointing also at the assessment that closed it."""
    period = dict(flag.get("period") or {})
    period["end"] = _iso(end)
    if "start" in period and period["start"] > period["end"]:
        period["end"] = period["start"]
    extension = [*(flag.get("extension") or [])]
    if detail(risk_assessment_id) not in extension:
        extension.append(detail(risk_assessment_id))
    return {**flag, "status": "inactive", "period": period, "extension": extension}


def _iso(dt: datetime) -> str:
    return dt.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
