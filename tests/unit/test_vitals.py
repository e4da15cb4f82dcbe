"""Vital-sign Observations as real EHRs send them -> canonical values (integration.domain.vitals)."""

from __future__ import annotations

import copy
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest

from inference import contract as C
from inference.preprocess import vitals_tensors
from integration.domain.types import Outcome
from integration.domain.vitals import parse_observations, to_samples, vital_codes

LOINC = "http://loinc.org"
UCUM = "http://unitsofmeasure.org"


def quantity(value: Any, code: str | None = None, unit: str | None = None, system: str | None = UCUM) -> dict:
    q: dict[str, Any] = {"value": value}
    if unit is not None:
        q["unit"] = unit
    if code is not None:
        q["code"] = code
        if system is not None:
            q["system"] = system
    return q


def obs(
    oid: str,
    loinc: str,
    value: Any = None,
    ucum: str | None = None,
    *,
    when: str = "2024-05-01T10:00:00Z",
    status: str = "final",
    unit_text: str | None = None,
    extra_codings: list[dict] | None = None,
) -> dict:
    """A vital-signs-profile Observation (single code, valueQuantity)."""
    resource: dict[str, Any] = {
        "resourceType": "Observation",
        "id": oid,
        "meta": {"versionId": "1", "lastUpdated": "2024-05-01T10:05:00Z"},
        "status": status,
        "category": [
            {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/observation-category",
                        "code": "vital-signs",
                    }
                ]
            }
        ],
        "code": {"coding": [*(extra_codings or []), {"system": LOINC, "code": loinc}]},
        "subject": {"reference": "Patient/p1"},
        "effectiveDateTime": when,
    }
    if value is not None:
        resource["valueQuantity"] = quantity(value, ucum, unit_text)
    return resource


def bp_panel(
    oid: str,
    sys_v: Any,
    dia_v: Any,
    *,
    panel: str = "85354-9",
    when: str = "2024-05-01T10:00:00Z",
    unit: str = "mm[Hg]",
) -> dict:
    def component(code: str, v: Any) -> dict:
        return {"code": {"coding": [{"system": LOINC, "code": code}]}, "valueQuantity": quantity(v, unit, "mmHg")}

    return {
        "resourceType": "Observation",
        "id": oid,
        "status": "final",
        "code": {"coding": [{"system": LOINC, "code": panel, "display": "Blood pressure panel"}]},
        "subject": {"reference": "Patient/p1"},
        "effectiveDateTime": when,
        "component": [component("8480-6", sys_v), component("8462-4", dia_v)],
    }


T0 = datetime(2024, 5, 1, 10, 0, tzinfo=UTC)


def single(resource: dict, **kwargs: Any) -> tuple[str, float] | None:
    parsed = parse_observations([resource], **kwargs)
    assert len(parsed.accepted) <= 1
    return (parsed.accepted[0].feature, parsed.accepted[0].value) if parsed.accepted else None


# ------------------------------------------------------------------------------------------
# Codes
# ------------------------------------------------------------------------------------------


def test_vital_codes_cover_every_feature_code_and_both_panels() -> None:
    codes = vital_codes()
    for feature in C.VITAL_FEATURES:
        for code in feature.loinc:
            assert code in codes
    assert "85354-9" in codes and "55284-4" in codes
    assert len(codes) == len(set(codes))


@pytest.mark.parametrize(
    ("loinc", "value", "unit", "feature"),
    [
        ("8480-6", 128, "mm[Hg]", "sbp"),
        ("8462-4", 79, "mm[Hg]", "dbp"),
        ("8867-4", 72, "/min", "hr"),
        ("9279-1", 16, "/min", "rr"),
        ("59408-5", 97, "%", "spo2"),
        ("2708-6", 95, "%", "spo2"),
        ("8310-5", 37.1, "Cel", "temp"),
        ("2339-0", 110, "mg/dL", "glucose"),
        ("39156-5", 26.4, "kg/m2", "bmi"),
    ],
)
def test_each_feature_in_its_canonical_unit(loinc: str, value: float, unit: str, feature: str) -> None:
    assert single(obs("o1", loinc, value, unit)) == (feature, pytest.approx(value))


def test_observation_with_several_codings_matches_its_loinc_coding() -> None:
    resource = obs(
        "o1",
        "8867-4",
        64,
        "/min",
        extra_codings=[
            {"system": "urn:oid:1.2.840.114350.1.13.0.1.7.2.707679", "code": "8"},  # a local flowsheet row
            {"system": "http://snomed.info/sct", "code": "364075005"},
        ],
    )
    assert single(resource) == ("hr", 64)


def test_a_loinc_code_from_another_system_is_not_matched() -> None:
    resource = obs("o1", "8867-4", 64, "/min")
    resource["code"]["coding"][0]["system"] = "http://example.org/local-codes"
    parsed = parse_observations([resource])
    assert parsed.accepted == [] and parsed.ignored == 1


def test_other_codes_and_the_vital_signs_panel_without_values_are_ignored() -> None:
    height = obs("o1", "8302-2", 180, "cm")
    vs_panel = {
        "resourceType": "Observation",
        "id": "o2",
        "status": "final",
        "code": {"coding": [{"system": LOINC, "code": "85353-1"}]},
        "effectiveDateTime": "2024-05-01T10:00:00Z",
        "hasMember": [{"reference": "Observation/o3"}],
    }
    parsed = parse_observations([height, vs_panel])
    assert parsed.accepted == [] and parsed.rejected == [] and parsed.ignored == 2


# ------------------------------------------------------------------------------------------
# BP panels
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("panel", ["85354-9", "55284-4"])
def test_bp_panel_components_give_systolic_and_diastolic(panel: str) -> None:
    parsed = parse_observations([bp_panel("bp1", 142, 91, panel=panel)])
    assert {(v.feature, v.value, v.observation_id) for v in parsed.accepted} == {
        ("sbp", 142, "bp1"),
        ("dbp", 91, "bp1"),
    }


def test_bp_panel_ignores_other_components_and_absent_ones() -> None:
    panel = bp_panel("bp1", 142, 91)
    panel["component"][1] = {
        "code": {"coding": [{"system": LOINC, "code": "8462-4"}]},
        "dataAbsentReason": {
            "coding": [{"system": "http://terminology.hl7.org/CodeSystem/data-absent-reason", "code": "error"}]
        },
    }
    panel["component"].append(
        {"code": {"coding": [{"system": LOINC, "code": "8478-0"}]}, "valueQuantity": quantity(108, "mm[Hg]")}
    )
    parsed = parse_observations([panel])
    assert [(v.feature, v.value) for v in parsed.accepted] == [("sbp", 142)]
    assert parsed.ignored == 1


def test_bp_panel_in_kpa_is_converted() -> None:
    parsed = parse_observations([bp_panel("bp1", 16.0, 10.7, unit="kPa")])
    values = {v.feature: v.value for v in parsed.accepted}
    assert values["sbp"] == pytest.approx(120.0, abs=0.1)
    assert values["dbp"] == pytest.approx(80.3, abs=0.1)


def test_implausible_component_is_rejected_and_the_other_kept() -> None:
    parsed = parse_observations([bp_panel("bp1", 420, 80)])
    assert [v.feature for v in parsed.accepted] == ["dbp"]
    assert [(r.observation_id, r.outcome) for r in parsed.rejected] == [("bp1", Outcome.IMPLAUSIBLE_VALUE)]
    assert "420" in parsed.rejected[0].reason


# ------------------------------------------------------------------------------------------
# Units
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("loinc", "value", "code", "text", "expected"),
    [
        ("8310-5", 98.6, "[degF]", "°F", 37.0),
        ("8310-5", 101.3, None, "°F", 38.5),
        ("8310-5", 310.15, "K", None, 37.0),
        ("8310-5", 36.6, None, "°C", 36.6),
        ("15074-8", 5.5, "mmol/L", "mmol/l", 99.088),
        ("2339-0", 7.0, "mmol/L", None, 126.112),  # the unit decides, not the code
        ("2339-0", 95, None, "mg/dl", 95.0),
        ("8867-4", 80, "{beats}/min", "beats/minute", 80.0),
        ("8867-4", 81, "1/min", None, 81.0),
        ("8867-4", 82, None, "bpm", 82.0),
        ("8867-4", 83, None, "beats/minute", 83.0),
        ("9279-1", 18, "{breaths}/min", None, 18.0),
        ("59408-5", 96, "%{HemoglobinSaturation}", None, 96.0),
        ("8480-6", 130, None, "mm Hg", 130.0),
        ("39156-5", 31.2, "kg/m2", "kg/m²", 31.2),
    ],
)
def test_units_are_normalised_to_the_contract_unit(
    loinc: str, value: float, code: str | None, text: str | None, expected: float
) -> None:
    result = single(obs("o1", loinc, value, code, unit_text=text))
    assert result is not None
    assert result[1] == pytest.approx(expected, abs=0.01)


def test_ucum_code_is_preferred_over_display_text() -> None:
    # display text says Fahrenheit, the UCUM code says Celsius: trust the code
    assert single(obs("o1", "8310-5", 37.2, "Cel", unit_text="degF")) == ("temp", 37.2)


def test_missing_unit_is_rejected() -> None:
    parsed = parse_observations([obs("o1", "8867-4", 72, None)])
    assert [(r.observation_id, r.outcome) for r in parsed.rejected] == [("o1", Outcome.MISSING_UNIT)]


def test_integer_value_without_quantity_is_rejected_as_missing_unit() -> None:
    resource = obs("o1", "8867-4")
    resource["valueInteger"] = 72
    parsed = parse_observations([resource])
    assert parsed.rejected[0].outcome is Outcome.MISSING_UNIT


def test_unknown_unit_is_rejected_with_the_unit_in_the_reason() -> None:
    parsed = parse_observations([obs("o1", "2339-0", 1.1, "g/L")])
    assert parsed.rejected[0].outcome is Outcome.UNKNOWN_UNIT
    assert "g/L" in parsed.rejected[0].reason


def test_a_unit_of_another_feature_is_unknown_here() -> None:
    parsed = parse_observations([obs("o1", "8310-5", 37, "mm[Hg]")])
    assert parsed.rejected[0].outcome is Outcome.UNKNOWN_UNIT


@pytest.mark.parametrize(
    ("loinc", "value", "unit"),
    [
        ("8867-4", 400, "/min"),
        ("8867-4", 0, "/min"),
        ("59408-5", 0.97, "%"),  # a fraction sent as percent
        ("8310-5", 98.6, "Cel"),  # Fahrenheit number with a Celsius code
        ("2339-0", 5.5, "mg/dL"),  # mmol/L number with a mg/dL code
        ("39156-5", 2.0, "kg/m2"),
    ],
)
def test_values_outside_the_plausible_range_are_rejected(loinc: str, value: float, unit: str) -> None:
    parsed = parse_observations([obs("o1", loinc, value, unit)])
    assert parsed.accepted == []
    assert parsed.rejected[0].outcome is Outcome.IMPLAUSIBLE_VALUE


def test_plausible_limits_are_inclusive() -> None:
    low, high = C.VITAL_FEATURES[C.FEATURE_INDEX["spo2"]].plausible
    parsed = parse_observations(
        [obs("a", "59408-5", low, "%"), obs("b", "59408-5", high, "%", when="2024-05-01T11:00:00Z")]
    )
    assert len(parsed.accepted) == 2


@pytest.mark.parametrize("bad", ["72", None, True, float("nan"), float("inf")])
def test_non_numeric_values_are_rejected(bad: Any) -> None:
    resource = obs("o1", "8867-4", 1, "/min")
    resource["valueQuantity"]["value"] = bad
    parsed = parse_observations([resource])
    assert parsed.accepted == [] and parsed.rejected[0].outcome is Outcome.IMPLAUSIBLE_VALUE


def test_censored_values_are_rejected() -> None:
    resource = obs("o1", "2339-0", 20, "mg/dL")
    resource["valueQuantity"]["comparator"] = "<"
    parsed = parse_observations([resource])
    assert parsed.rejected[0].outcome is Outcome.IMPLAUSIBLE_VALUE and "<20" in parsed.rejected[0].reason


# ------------------------------------------------------------------------------------------
# Status, versions, dataAbsentReason
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("status", ["final", "amended", "corrected"])
def test_validated_statuses_are_used(status: str) -> None:
    assert single(obs("o1", "8867-4", 70, "/min", status=status)) == ("hr", 70)


@pytest.mark.parametrize("status", ["entered-in-error", "cancelled", "registered", "unknown", "preliminary"])
def test_other_statuses_are_excluded_and_counted(status: str) -> None:
    parsed = parse_observations([obs("o1", "8867-4", 70, "/min", status=status)])
    assert parsed.accepted == [] and parsed.rejected == [] and parsed.ignored == 1


def test_preliminary_is_used_when_asked() -> None:
    assert single(obs("o1", "8867-4", 70, "/min", status="preliminary"), include_preliminary=True) == ("hr", 70)
    assert single(obs("o1", "8867-4", 70, "/min", status="entered-in-error"), include_preliminary=True) is None


def _version(resource: dict, version: str, updated: str, **changes: Any) -> dict:
    r = copy.deepcopy(resource)
    r["meta"] = {"versionId": version, "lastUpdated": updated}
    r.update(changes)
    return r


def test_amended_version_replaces_the_original_whatever_the_order() -> None:
    original = obs("o1", "8310-5", 39.5, "Cel")
    amended = _version(original, "2", "2024-05-01T12:00:00Z", status="amended")
    amended["valueQuantity"] = quantity(37.5, "Cel")
    for resources in ([original, amended], [amended, original]):
        parsed = parse_observations(resources)
        assert [(v.observation_id, v.value) for v in parsed.accepted] == [("o1", 37.5)]


def test_versions_compare_numerically_when_timestamps_tie() -> None:
    v9 = _version(obs("o1", "8867-4", 60, "/min"), "9", "2024-05-01T12:00:00Z")
    v10 = _version(obs("o1", "8867-4", 66, "/min"), "10", "2024-05-01T12:00:00Z", status="corrected")
    assert [v.value for v in parse_observations([v10, v9]).accepted] == [66]


def test_entered_in_error_version_retracts_the_value() -> None:
    original = obs("o1", "8867-4", 180, "/min")
    retracted = _version(original, "2", "2024-05-02T08:00:00+02:00", status="entered-in-error")
    parsed = parse_observations([original, retracted])
    assert parsed.accepted == [] and parsed.ignored == 1


def test_data_absent_reason_is_skipped_and_counted() -> None:
    resource = obs("o1", "8310-5")
    resource["dataAbsentReason"] = {
        "coding": [{"system": "http://terminology.hl7.org/CodeSystem/data-absent-reason", "code": "asked-declined"}]
    }
    parsed = parse_observations([resource])
    assert parsed.accepted == [] and parsed.rejected == [] and parsed.ignored == 1


def test_no_value_and_no_data_absent_reason_is_rejected() -> None:
    parsed = parse_observations([obs("o1", "8310-5")])
    assert parsed.rejected[0].outcome is Outcome.IMPLAUSIBLE_VALUE


def test_other_resource_types_are_ignored() -> None:
    parsed = parse_observations([{"resourceType": "OperationOutcome", "issue": []}, obs("o1", "8867-4", 70, "/min")])
    assert len(parsed.accepted) == 1 and parsed.ignored == 1


# ------------------------------------------------------------------------------------------
# Time
# ------------------------------------------------------------------------------------------


def _effective_of(resource: dict, **kwargs: Any) -> datetime:
    parsed = parse_observations([resource], **kwargs)
    assert parsed.accepted, parsed.rejected
    return parsed.accepted[0].effective


def test_offsets_are_normalised_to_utc() -> None:
    when = _effective_of(obs("o1", "8867-4", 70, "/min", when="2024-05-01T12:00:00+02:00"))
    assert when == T0 and when.utcoffset() == timedelta(0)
    when = _effective_of(obs("o1", "8867-4", 70, "/min", when="2024-05-01T05:00:00.123456-05:00"))
    assert when == T0 + timedelta(microseconds=123456)


def test_effective_period_uses_end_else_start() -> None:
    both = obs("o1", "8867-4", 70, "/min")
    del both["effectiveDateTime"]
    both["effectivePeriod"] = {"start": "2024-05-01T09:00:00Z", "end": "2024-05-01T10:00:00Z"}
    assert _effective_of(both) == T0
    start_only = copy.deepcopy(both)
    start_only["effectivePeriod"] = {"start": "2024-05-01T09:00:00Z"}
    assert _effective_of(start_only) == T0 - timedelta(hours=1)


def test_effective_instant_and_issued_fallback() -> None:
    instant = obs("o1", "8867-4", 70, "/min")
    del instant["effectiveDateTime"]
    instant["effectiveInstant"] = "2024-05-01T10:00:00.000Z"
    assert _effective_of(instant) == T0
    issued = copy.deepcopy(instant)
    del issued["effectiveInstant"]
    issued["issued"] = "2024-05-01T10:00:00Z"
    assert _effective_of(issued) == T0


def test_naive_and_date_only_times_use_the_assumed_zone() -> None:
    naive = obs("o1", "8867-4", 70, "/min", when="2024-05-01T10:00:00")
    assert _effective_of(naive) == T0
    cest = timezone(timedelta(hours=2))
    assert _effective_of(naive, assume_tz=cest) == T0 - timedelta(hours=2)
    date_only = obs("o1", "8867-4", 70, "/min", when="2024-05-01")
    assert _effective_of(date_only) == datetime(2024, 5, 1, tzinfo=UTC)


@pytest.mark.parametrize("when", ["2024-05", "2024", "yesterday", ""])
def test_coarse_or_bad_times_are_rejected(when: str) -> None:
    parsed = parse_observations([obs("o1", "8867-4", 70, "/min", when=when)])
    assert parsed.accepted == [] and parsed.rejected[0].outcome is Outcome.INSUFFICIENT_DATA


def test_no_time_at_all_is_rejected() -> None:
    resource = obs("o1", "8867-4", 70, "/min")
    del resource["effectiveDateTime"]
    parsed = parse_observations([resource])
    assert parsed.rejected[0].outcome is Outcome.INSUFFICIENT_DATA and "effective" in parsed.rejected[0].reason


def test_window_bounds_are_inclusive_and_outside_values_ignored() -> None:
    resources = [
        obs("early", "8867-4", 60, "/min", when="2024-04-30T09:59:59Z"),
        obs("start", "8867-4", 61, "/min", when="2024-04-30T10:00:00Z"),
        obs("end", "8867-4", 62, "/min", when="2024-05-01T10:00:00Z"),
        obs("future", "8867-4", 63, "/min", when="2024-05-01T10:00:01Z"),
    ]
    parsed = parse_observations(resources, window_start=T0 - timedelta(days=1), window_end=T0)
    assert [v.observation_id for v in parsed.accepted] == ["start", "end"]
    assert parsed.ignored == 2


# ------------------------------------------------------------------------------------------
# Duplicates, ordering, samples
# ------------------------------------------------------------------------------------------


def test_exact_duplicates_from_different_resources_are_kept_once() -> None:
    a = obs("obs-b", "8867-4", 70, "/min", when="2024-05-01T12:00:00+02:00")
    b = obs("obs-a", "8867-4", 70, "{beats}/min", when="2024-05-01T10:00:00Z")
    parsed = parse_observations([a, b])
    assert [v.observation_id for v in parsed.accepted] == ["obs-a"]
    assert parsed.ignored == 1


def test_converted_duplicates_are_recognised() -> None:
    celsius = obs("c", "8310-5", 37.0, "Cel")
    fahrenheit = obs("f", "8310-5", 98.6, "[degF]")
    assert len(parse_observations([celsius, fahrenheit]).accepted) == 1


def test_same_time_different_value_or_feature_is_kept() -> None:
    resources = [obs("a", "8867-4", 70, "/min"), obs("b", "8867-4", 71, "/min"), obs("c", "9279-1", 70, "/min")]
    assert len(parse_observations(resources).accepted) == 3


def test_single_code_systolic_and_panel_at_the_same_time_deduplicate() -> None:
    parsed = parse_observations([bp_panel("panel", 140, 90), obs("sys", "8480-6", 140, "mm[Hg]")])
    assert sorted(v.feature for v in parsed.accepted) == ["dbp", "sbp"]


def test_accepted_values_are_sorted_by_time_then_feature() -> None:
    resources = [
        obs("late", "8867-4", 70, "/min", when="2024-05-01T11:00:00Z"),
        bp_panel("bp", 120, 80, when="2024-05-01T09:00:00Z"),
        obs("early", "59408-5", 97, "%", when="2024-05-01T09:00:00Z"),
    ]
    parsed = parse_observations(resources)
    assert [(v.feature, v.observation_id) for v in parsed.accepted] == [
        ("dbp", "bp"),
        ("sbp", "bp"),
        ("spo2", "early"),
        ("hr", "late"),
    ]
    assert all(v.effective.tzinfo is not None for v in parsed.accepted)


def test_to_samples_places_values_before_the_window_end() -> None:
    parsed = parse_observations(
        [
            obs("a", "8867-4", 70, "/min", when="2024-05-01T02:00:00Z"),
            obs("b", "8310-5", 98.6, "[degF]", when="2024-05-01T10:00:00Z"),
            obs("future", "9279-1", 15, "/min", when="2024-05-01T11:00:00Z"),
        ]
    )
    samples = to_samples(parsed.accepted, T0)
    assert [(s.feature, s.hours_before_end) for s in samples] == [
        (C.FEATURE_INDEX["hr"], 8.0),
        (C.FEATURE_INDEX["temp"], 0.0),
    ]
    assert samples[1].value == pytest.approx(37.0)
    vitals, mask, _ = vitals_tensors(samples)
    assert mask[-1, C.FEATURE_INDEX["temp"]] == 1.0
    assert mask[-2, C.FEATURE_INDEX["hr"]] == 1.0
    assert vitals.shape == (C.N_STEPS, C.N_FEATURES)
