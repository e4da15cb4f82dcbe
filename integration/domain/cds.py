"""CDS Hooks 2.0 cards for the latest assessment (pure: the service passes the facts in)."""

from __future__ import annotations

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
    if facts.risk_assessment_url:
        card["links"] = [{"label": "RiskAssessment in the EHR", "url": facts.risk_assessment_url, "type": "absolute"}]
    return card
