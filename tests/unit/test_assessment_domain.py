"""Risk policy, assessment identity and the RiskAssessment/Device resources (pure domain)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from fhir.resources.R4B.device import Device
from fhir.resources.R4B.riskassessment import RiskAssessment

from inference import contract as C
from integration.domain.assessment import AssessmentFacts, build_device, build_risk_assessment
from integration.domain.identity import assessment_identifier, pseudonym
from integration.domain.policy import RISK_PROBABILITY_SYSTEM, RiskPolicy
from integration.domain.retry import backoff_at

END = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)


def facts(**kw: object) -> AssessmentFacts:
    base = dict(
        identifier_system="urn:strokewatch:risk-assessment", identifier="abc", patient_fhir_id="p1",
        window_end=END, probability=0.42, model_version="0.1.0", trained=True, runtime="onnxruntime",
        study_uid="1.2.3", modality="CT", observation_ids=["o1", "o2"],
    )
    base.update(kw)
    return AssessmentFacts(**base)  # type: ignore[arg-type]


@pytest.mark.parametrize(("p", "band"), [(0.0, "low"), (0.099, "low"), (0.1, "moderate"), (0.29, "moderate"),
                                         (0.3, "high"), (1.0, "high")])
def test_bands_follow_thresholds(p: float, band: str) -> None:
    assert RiskPolicy(low_below=0.1, high_at_or_above=0.3).band(p) == band


def test_band_rejects_out_of_range_probability() -> None:
    with pytest.raises(ValueError, match="outside 0..1"):
        RiskPolicy().band(1.2)


def test_identifier_is_deterministic_and_sensitive_to_each_input() -> None:
    a = assessment_identifier("p1", "1.2.3", END, "0.1.0")
    assert a == assessment_identifier("p1", "1.2.3", END.astimezone(timezone(timedelta(hours=2))), "0.1.0")
    others = {
        assessment_identifier("p2", "1.2.3", END, "0.1.0"),
        assessment_identifier("p1", "1.2.4", END, "0.1.0"),
        assessment_identifier("p1", "1.2.3", END + timedelta(seconds=1), "0.1.0"),
        assessment_identifier("p1", "1.2.3", END, "0.2.0"),
    }
    assert a not in others and len(others) == 4


def test_identifier_refuses_naive_time() -> None:
    with pytest.raises(ValueError):
        assessment_identifier("p1", None, datetime(2026, 1, 1), "0.1.0")


def test_pseudonym_hides_value() -> None:
    assert "MRN123" not in pseudonym("MRN123") and pseudonym("MRN123") == pseudonym("MRN123")


def test_risk_assessment_is_valid_r4_and_carries_the_contract() -> None:
    res = build_risk_assessment(facts(device_id="d1"), RiskPolicy())
    RiskAssessment.model_validate(res)  # structurally valid FHIR
    pred = res["prediction"][0]
    assert pred["probabilityDecimal"] == pytest.approx(0.42)
    assert pred["outcome"]["coding"][0]["code"] == C.OUTCOME_CODE
    assert pred["qualitativeRisk"]["coding"][0] == {
        "system": RISK_PROBABILITY_SYSTEM, "code": "high", "display": "High likelihood"}
    assert pred["whenRange"]["high"]["value"] == C.HORIZON_DAYS
    assert res["identifier"] == [{"system": "urn:strokewatch:risk-assessment", "value": "abc"}]
    assert res["status"] == "final"
    assert res["performer"]["reference"] == "Device/d1"
    refs = [b.get("reference") for b in res["basis"]]
    assert refs[1:] == ["Observation/o1", "Observation/o2"]
    assert res["basis"][0]["identifier"]["value"] == "urn:oid:1.2.3"


def test_untrained_model_is_said_in_method_note_and_status() -> None:
    res = build_risk_assessment(facts(trained=False), RiskPolicy())
    assert "UNTRAINED" in res["method"]["text"]
    assert "UNTRAINED" in res["note"][0]["text"]
    assert res["status"] == "preliminary"


def test_fallback_runtime_and_missing_modalities_are_noted() -> None:
    res = build_risk_assessment(facts(runtime="onnxruntime (fallback: triton unavailable)", observation_ids=[],
                                      image_used=False), RiskPolicy())
    note = res["note"][0]["text"]
    assert "fallback" in note and "No eligible brain image" in note and "No vital signs" in note


def test_device_is_valid() -> None:
    Device.model_validate(build_device("0.1.0", trained=False))


def test_backoff_grows_caps_and_honours_retry_after() -> None:
    now = END
    assert backoff_at(now, 1, 5) == now + timedelta(seconds=5)
    assert backoff_at(now, 3, 5) == now + timedelta(seconds=20)
    assert backoff_at(now, 30, 5, cap_s=60) == now + timedelta(seconds=60)
    assert backoff_at(now, 1, 5, retry_after=120) == now + timedelta(seconds=120)
