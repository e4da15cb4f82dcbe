"""The pure parts of the PACS results and the EHR alert: UIDs, drivers, which bands, and the Flag's life."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from integration.domain import alerts
from integration.domain.assessment import AssessmentFacts, build_risk_assessment
from integration.domain.ids import is_dicom_uid
from integration.domain.policy import RiskPolicy
from integration.domain.results import ResultsPolicy, derived_uid, drivers_of, heatmap_uids, report_uids

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def test_result_uids_are_dicom_uids_fixed_by_what_they_depend_on() -> None:
    a, b = report_uids("assessment-1"), report_uids("assessment-2")
    assert a == report_uids("assessment-1")  # a retry writes the same SR
    heat = heatmap_uids("1.2.3", "1.2.3.4", "0.6.0")
    assert heat == heatmap_uids("1.2.3", "1.2.3.4", "0.6.0")  # any assessment of the study by this model: one series
    assert heat != heatmap_uids("1.2.3", "1.2.3.4", "0.7.0") != heatmap_uids("1.2.3", "1.2.3.5", "0.6.0")
    uids = [a.sr_series, a.sr_instance, heat.series, heat.instance(0), heat.instance(499)]
    assert all(is_dicom_uid(u) and len(u) <= 64 and u.startswith("2.25.") for u in uids)
    assert len(set(uids)) == len(uids) and a.sr_instance != b.sr_instance
    assert derived_uid("x", "y") != derived_uid("xy")  # the parts are separated


def test_drivers_are_read_back_from_the_note_with_their_input() -> None:
    facts = AssessmentFacts(
        identifier_system="urn:x", identifier="i", patient_fhir_id="p", window_end=NOW, probability=0.4,
        model_version="0.6.0", trained=True, runtime="onnxruntime", study_uid="1.2.3", modality="CT",
        observation_ids=("o1",),
        drivers=("brain imaging findings (+12 points)", "systolic blood pressure history (+4 points)",
                 "heart rate history lowered it (-2 points)"),
    )
    found = drivers_of(build_risk_assessment(facts, RiskPolicy()))
    assert [(d.code, d.phrase) for d in found] == [
        ("image", "brain imaging findings (+12 points)"),
        ("sbp", "systolic blood pressure history (+4 points)"),
        ("hr", "heart rate history lowered it (-2 points)"),
    ]
    assert drivers_of({"note": [{"text": "no drivers here"}]}) == []


def test_results_only_for_the_configured_bands_of_assessments_with_a_study() -> None:
    policy = ResultsPolicy(bands=frozenset({"high"}))
    assert policy.wanted("high", "1.2.3")
    assert not policy.wanted("moderate", "1.2.3")
    assert not policy.wanted("high", None)
    assert not ResultsPolicy(enabled=False).wanted("high", "1.2.3")


def test_the_flag_life_cycle() -> None:
    flag = alerts.build_flag(patient_fhir_id="p1", opening_assessment="a1", risk_assessment_id="ra1",
                             probability=0.62, band="high", start=NOW, device_id="dev1")
    assert alerts.decide(True, []) == "open"
    assert alerts.decide(True, [flag]) == "keep"
    assert alerts.decide(False, [flag]) == "close"
    assert alerts.decide(False, []) == "none"
    assert alerts.is_ours(flag) and flag["identifier"][0]["value"] == alerts.flag_identifier("a1")
    assert flag["extension"] == [alerts.detail("ra1")] and flag["author"] == {"reference": "Device/dev1"}
    extended = alerts.with_detail(flag, "ra2")
    assert extended is not None and alerts.with_detail(extended, "ra2") is None  # pointed at once
    ended = alerts.closed(extended, NOW + timedelta(hours=3), "ra3")
    assert ended["status"] == "inactive" and ended["period"] == {"start": "2026-03-01T12:00:00Z",
                                                                  "end": "2026-03-01T15:00:00Z"}
    assert [e["valueReference"]["reference"] for e in ended["extension"]] == [
        "RiskAssessment/ra1", "RiskAssessment/ra2", "RiskAssessment/ra3"]
    # a clock behind the Flag's start never gives a period that ends before it starts
    assert alerts.closed(flag, NOW - timedelta(hours=1), "ra4")["period"]["end"] == "2026-03-01T12:00:00Z"


def test_the_flag_is_valid_fhir_r4() -> None:
    from fhir.resources import get_fhir_model_class

    flag = alerts.build_flag(patient_fhir_id="p1", opening_assessment="a1", risk_assessment_id="ra1",
                             probability=0.62, band="high", start=NOW)
    get_fhir_model_class("Flag").model_validate(alerts.closed(flag, NOW, "ra2"))
