"""CDS Hooks 2.0 cards for the latest assessment (pure: the service passes the facts in)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from inference import contract as C

SERVICE_ID = "strokewatch-stroke-risk"
_INDICATOR = {"low": "info", "moderate": "warning", "high": "critical"}


@dataclass(frozen=True)
class CardFacts:
    probability: float
    band: str
    model_version: str
    trained: bool
    note: str
    assessed_at: str  # ISO date-time of the window end
    risk_assessment_url: str | None
    #: The patient's page on the StrokeWatch dashboard (risk over time, drivers, image with heat-map, vitals).
    dashboard_url: str | None = None
    #: The dashboard as a SMART app the EHR launches (``/dashboard/launch``), offered when the EHR calls with its
    #: FHIR server and a SMART client id is configured; ``patient_fhir_id`` goes in its ``appContext``.
    smart_launch_url: str | None = None
    patient_fhir_id: str | None = None


def discovery() -> dict[str, Any]:
    """GET {base}/cds-services: the one service, on patient-view, needing only the patient id."""
    return {
        "services": [
            {
                "hook": "patient-view",
                "id": SERVICE_ID,
                "title": "StrokeWatch stroke risk",
                "description": f"Probability of stroke within {C.HORIZON_DAYS} days from the latest brain "
                "imaging and vital signs (StrokeWatch CNN-LSTM fusion model).",
                "usageRequirements": "The patient must be followed by StrokeWatch (a brain CT/MR in the PACS).",
            }
        ]
    }


def risk_card(facts: CardFacts) -> dict[str, Any]:
    summary = f"Stroke risk {facts.band} ({facts.probability:.0%} within {C.HORIZON_DAYS} days)"
    if not facts.trained:
        summary = "UNTRAINED MODEL - " + summary
    card: dict[str, Any] = {
        "summary": summary[:140],  # CDS Hooks: summary SHOULD be under 140 characters
        "indicator": _INDICATOR.get(facts.band, "info"),
        "detail": f"{facts.note}\n\nAssessed at {facts.assessed_at} by model {facts.model_version}.",
        "source": {"label": "StrokeWatch", "topic": {"code": C.OUTCOME_CODE, "system": C.OUTCOME_SYSTEM,
                                                    "display": C.OUTCOME_DISPLAY}},
    }
    links: list[dict[str, Any]] = []
    if facts.risk_assessment_url:
        links.append({"label": "RiskAssessment in the EHR", "url": facts.risk_assessment_url, "type": "absolute"})
    if facts.dashboard_url:
        links.append({"label": "StrokeWatch dashboard: risk over time, drivers, image", "url": facts.dashboard_url,
                      "type": "absolute"})
    if facts.smart_launch_url:
        link = {"label": "Open in StrokeWatch (SMART app)", "url": facts.smart_launch_url, "type": "smart"}
        if facts.patient_fhir_id:
            link["appContext"] = json.dumps({"patient": facts.patient_fhir_id})
        links.append(link)
    if links:
        card["links"] = links
    return card
