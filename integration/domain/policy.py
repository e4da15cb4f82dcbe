"""Risk policy: probability -> band (terminology.hl7.org risk-probability codes) and alerting."""

from __future__ import annotations

from dataclasses import dataclass

RISK_PROBABILITY_SYSTEM = "http://terminology.hl7.org/CodeSystem/risk-probability"
_DISPLAY = {"low": "Low likelihood", "moderate": "Moderate likelihood", "high": "High likelihood"}


@dataclass(frozen=True)
class RiskPolicy:
    low_below: float = 0.10
    high_at_or_above: float = 0.30
    alert_at_or_above: float = 0.30
    image_only_when_no_vitals: bool = True
    min_vital_samples: int = 1

    def band(self, probability: float) -> str:
        if not 0.0 <= probability <= 1.0:
            raise ValueError(f"probability {probability} outside 0..1")
        if probability < self.low_below:
            return "low"
        if probability >= self.high_at_or_above:
            return "high"
        return "moderate"

    def alert(self, probability: float) -> bool:
        return probability >= self.alert_at_or_above

    @staticmethod
    def band_display(band: str) -> str:
        return _DISPLAY[band]
