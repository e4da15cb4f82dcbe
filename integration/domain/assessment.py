"""Build the FHIR R4 RiskAssessment (and the model's Device) as plain JSON. No I/O.

Contract (shared/ARCHITECTURE.md): deterministic ``identifier``; probability 0..1 in
``prediction.probabilityDecimal``; band in ``qualitativeRisk``; horizon in ``whenRange``;
the model in ``method`` and ``performer`` (a Device carrying the model version); inputs in ``basis``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from inference import contract as C
from integration.domain.policy import RISK_PROBABILITY_SYSTEM, RiskPolicy

MODEL_SYSTEM = "urn:strokewatch:model"
DEVICE_IDENTIFIER_SYSTEM = "urn:strokewatch:device"
DICOM_UID_SYSTEM = "urn:dicom:uid"
UCUM = "http://unitsofmeasure.org"


@dataclass(frozen=True)
class AssessmentFacts:
    """Everything that goes into one RiskAssessment."""

    identifier_system: str
    identifier: str
    patient_fhir_id: str
    window_end: datetime
    probability: float
    model_version: str
    trained: bool
    runtime: str
    study_uid: str | None
    modality: str | None
    observation_ids: Sequence[str]
    device_id: str | None = None
    drivers: Sequence[str] = field(default_factory=tuple)
    image_used: bool = True
    supersedes_identifier: str | None = None  # the assessment this one replaces (new data arrived)
    supersedes_fhir_id: str | None = None  # its id in the EHR, when it has been written there
    #: The site recalibration the probability went through (``Prediction.calibration``); None: the model's own.
    calibration: str | None = None


def device_identifier(model_version: str) -> str:
    return f"{C.MODEL_NAME}-{model_version}"


def build_device(model_version: str, trained: bool) -> dict[str, Any]:
    """The Device that performs the assessment: one per model version."""
    return {
        "resourceType": "Device",
        "identifier": [{"system": DEVICE_IDENTIFIER_SYSTEM, "value": device_identifier(model_version)}],
        "status": "active",
        "manufacturer": "StrokeWatch",
        "deviceName": [{"name": f"StrokeWatch {C.MODEL_NAME}", "type": "model-name"}],
        "version": [{"value": model_version}],
        "note": [] if trained else [{"text": "Untrained network: scores carry no clinical meaning."}],
    }


def _iso(dt: datetime) -> str:
    return dt.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def note_text(facts: AssessmentFacts) -> str:
    parts = [f"StrokeWatch {C.MODEL_NAME} {facts.model_version} via {facts.runtime}."]
    if not facts.trained:
        parts.append("WARNING: the model is UNTRAINED (placeholder weights); this score has no clinical meaning.")
    if "fallback" in facts.runtime:
        parts.append("Scored by the embedded fallback runtime because the configured Triton server was unavailable.")
    if facts.calibration:
        parts.append(f"Probability recalibrated for {facts.calibration}.")
    if not facts.image_used:
        parts.append("No eligible brain image: scored on vital signs and demographics only.")
    if not facts.observation_ids:
        parts.append("No vital signs in the window: scored on the image and demographics only.")
    if facts.drivers:
        parts.append("Main drivers: " + "; ".join(facts.drivers) + ".")
    parts.append(f"Probability of stroke within {C.HORIZON_DAYS} days. Not for clinical use without local validation.")
    return " ".join(parts)


def build_risk_assessment(facts: AssessmentFacts, policy: RiskPolicy) -> dict[str, Any]:
    band = policy.band(facts.probability)
    label = f"StrokeWatch CNN-LSTM fusion {facts.model_version}" + ("" if facts.trained else " (UNTRAINED)")
    basis: list[dict[str, Any]] = []
    if facts.study_uid:
        basis.append(
            {
                "type": "ImagingStudy",
                "identifier": {"system": DICOM_UID_SYSTEM, "value": f"urn:oid:{facts.study_uid}"},
                "display": f"{facts.modality or 'imaging'} study used" if facts.image_used else "study not usable",
            }
        )
    basis.extend({"reference": f"Observation/{oid}"} for oid in facts.observation_ids)
    if facts.supersedes_identifier or facts.supersedes_fhir_id:
        link: dict[str, Any] = {"display": "superseded assessment"}
        if facts.supersedes_fhir_id:
            link["reference"] = f"RiskAssessment/{facts.supersedes_fhir_id}"
        if facts.supersedes_identifier:  # a logical reference, valid before the old one is in the EHR
            link["type"] = "RiskAssessment"
            link["identifier"] = {"system": facts.identifier_system, "value": facts.supersedes_identifier}
        basis.append(link)
    resource: dict[str, Any] = {
        "resourceType": "RiskAssessment",
        "identifier": [{"system": facts.identifier_system, "value": facts.identifier}],
        "status": "final" if facts.trained else "preliminary",
        "subject": {"reference": f"Patient/{facts.patient_fhir_id}"},
        "occurrenceDateTime": _iso(facts.window_end),
        "method": {
            "coding": [{"system": MODEL_SYSTEM, "code": f"{C.MODEL_NAME}-{facts.model_version}", "display": label}],
            "text": label,
        },
        "basis": basis,
        "prediction": [
            {
                "outcome": {
                    "coding": [{"system": C.OUTCOME_SYSTEM, "code": C.OUTCOME_CODE, "display": C.OUTCOME_DISPLAY}]
                },
                "probabilityDecimal": round(float(facts.probability), 6),
                "qualitativeRisk": {
                    "coding": [
                        {"system": RISK_PROBABILITY_SYSTEM, "code": band, "display": RiskPolicy.band_display(band)}
                    ]
                },
                "whenRange": {
                    "low": {"value": 0, "unit": "days", "system": UCUM, "code": "d"},
                    "high": {"value": C.HORIZON_DAYS, "unit": "days", "system": UCUM, "code": "d"},
                },
            }
        ],
        "note": [{"text": note_text(facts)}],
    }
    if facts.device_id:
        resource["performer"] = {"reference": f"Device/{facts.device_id}", "display": label}
    return resource
