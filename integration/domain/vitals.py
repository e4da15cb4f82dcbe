"""Vital-sign Observations -> values in the contract's canonical units. Pure: no I/O.

The catalogue (which LOINC codes feed which feature, canonical unit, plausible range) is
``inference.contract.VITAL_FEATURES``; this module only knows how real EHRs *send* those values.

Decisions (documented here because they change what the model sees):

* **status** — ``final``, ``amended`` and ``corrected`` are used. ``preliminary`` is used only when
  ``include_preliminary=True`` (bedside monitors often post unvalidated values as preliminary; the
  default keeps only validated ones). ``registered``, ``cancelled``, ``entered-in-error`` and
  ``unknown`` are never used. Excluded resources count in ``ParsedObservations.ignored``.
* **versions** — when the same logical id appears more than once, the latest version wins
  (``meta.lastUpdated``, then a numeric ``meta.versionId``), so an ``amended``/``corrected`` version
  replaces the original and an ``entered-in-error`` version retracts it.
* **dataAbsentReason** (on the resource or on a BP component) — skipped and counted in ``ignored``.
* **time** — ``effectiveDateTime`` / ``effectiveInstant``; ``effectivePeriod`` uses ``end``, else
  ``start``; without any, ``issued``. Offsets are honoured and everything is returned UTC-aware.
  Times without an offset (not valid FHIR, but sent) are read in ``assume_tz`` (UTC by default).
  A date-only value is taken as 00:00 of that day in ``assume_tz``; year or year-month precision is
  rejected as too coarse for the model's 8-hour grid.
* **duplicates** — the same feature, instant and value from different resources is kept once (the
  lowest logical id, so the choice is deterministic); the extra copies count in ``ignored``.
* **units** — ``valueQuantity.code`` (UCUM) is preferred, ``valueQuantity.unit`` (display text) is
  the fallback. UCUM annotations in braces are ignored (``{beats}/min`` is ``/min``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, tzinfo
from typing import Any

from inference.contract import BP_PANEL_LOINC, FEATURE_INDEX, VITAL_FEATURES, VitalFeature
from inference.preprocess import VitalSample
from integration.domain.types import Outcome, ParsedObservations, RejectedValue, VitalValue

LOINC_SYSTEM = "http://loinc.org"
UCUM_SYSTEM = "http://unitsofmeasure.org"

USED_STATUSES: frozenset[str] = frozenset({"final", "amended", "corrected"})
PRELIMINARY = "preliminary"

#: mmol/L -> mg/dL for glucose (molar mass 180.16 g/mol).
GLUCOSE_MG_DL_PER_MMOL_L = 18.016
MM_HG_PER_KPA = 7.50062

_FEATURE_BY_CODE: dict[str, VitalFeature] = {code: f for f in VITAL_FEATURES for code in f.loinc}

Converter = Callable[[float], float]


def _identity(v: float) -> float:
    return v


# Unit spellings (after stripping UCUM annotations and blanks, lower-cased) -> canonical UCUM unit,
# per canonical unit, with the conversion into it. Display text variants are included on purpose:
# ``valueQuantity.unit`` is free text in many EHRs.
_UNITS: dict[str, dict[str, Converter]] = {
    "mm[Hg]": {
        "mm[hg]": _identity,
        "mmhg": _identity,
        "kpa": lambda v: v * MM_HG_PER_KPA,
    },
    "/min": {
        "/min": _identity,
        "1/min": _identity,
        "min-1": _identity,
        "bpm": _identity,
        "beats/min": _identity,
        "breaths/min": _identity,
        "beats/minute": _identity,
        "breaths/minute": _identity,
        "beat/min": _identity,
        "breath/min": _identity,
        "/minute": _identity,
        "permin": _identity,
    },
    "%": {"%": _identity},
    "Cel": {
        "cel": _identity,
        "°c": _identity,
        "degc": _identity,
        "c": _identity,
        "[degf]": lambda v: (v - 32.0) * 5.0 / 9.0,
        "°f": lambda v: (v - 32.0) * 5.0 / 9.0,
        "degf": lambda v: (v - 32.0) * 5.0 / 9.0,
        "f": lambda v: (v - 32.0) * 5.0 / 9.0,
        "k": lambda v: v - 273.15,
    },
    "mg/dL": {
        "mg/dl": _identity,
        "mmol/l": lambda v: v * GLUCOSE_MG_DL_PER_MMOL_L,
    },
    "kg/m2": {"kg/m2": _identity, "kg/m^2": _identity, "kg/m²": _identity},
}

_ANNOTATION = re.compile(r"\{[^}]*\}")


def vital_codes() -> list[str]:
    """Every LOINC code to search for: each feature's codes and the BP panels."""
    codes = [code for f in VITAL_FEATURES for code in f.loinc]
    return [*codes, *(c for c in BP_PANEL_LOINC if c not in codes)]


def to_samples(values: Iterable[VitalValue], window_end: datetime) -> list[VitalSample]:
    """Accepted values -> preprocessing samples (hours before ``window_end``); future values dropped."""
    samples = []
    for v in values:
        hours = (window_end - v.effective).total_seconds() / 3600.0
        if hours >= 0.0:
            samples.append(VitalSample(FEATURE_INDEX[v.feature], hours, v.value))
    return samples


@dataclass(frozen=True)
class _Candidate:
    feature: str
    value: float
    effective: datetime
    observation_id: str


def parse_observations(
    resources: Iterable[Mapping[str, Any]],
    *,
    window_start: datetime | None = None,
    window_end: datetime | None = None,
    include_preliminary: bool = False,
    assume_tz: tzinfo = UTC,
) -> ParsedObservations:
    """Raw FHIR Observation JSON -> accepted values (canonical units, UTC), rejections and an ignored count.

    Values whose time falls outside ``[window_start, window_end]`` (when given) are ignored.
    Accepted values are sorted by time, then feature.
    """
    result = ParsedObservations()
    statuses = USED_STATUSES | {PRELIMINARY} if include_preliminary else USED_STATUSES
    candidates: list[_Candidate] = []
    for resource in _latest_versions(resources):
        if resource.get("resourceType", "Observation") != "Observation":
            result.ignored += 1
            continue
        if resource.get("status") not in statuses:
            result.ignored += 1
            continue
        obs_id = str(resource.get("id", ""))
        parts = _value_parts(resource)
        if not parts:
            result.ignored += 1
            continue
        when = _effective(resource, assume_tz)
        for feature, holder in parts:
            if "dataAbsentReason" in holder:
                result.ignored += 1
                continue
            if isinstance(when, str):
                result.rejected.append(RejectedValue(obs_id, Outcome.INSUFFICIENT_DATA, when))
                continue
            if (window_start is not None and when < window_start) or (window_end is not None and when > window_end):
                result.ignored += 1
                continue
            value = _canonical_value(feature, holder)
            if isinstance(value, RejectedValue):
                result.rejected.append(RejectedValue(obs_id, value.outcome, value.reason))
                continue
            candidates.append(_Candidate(feature.key, value, when, obs_id))

    seen: set[tuple[str, datetime, float]] = set()
    for c in sorted(candidates, key=lambda c: (c.effective, c.feature, c.observation_id)):
        key = (c.feature, c.effective, round(c.value, 6))
        if key in seen:
            result.ignored += 1
            continue
        seen.add(key)
        result.accepted.append(VitalValue(c.feature, c.value, c.effective, c.observation_id))
    return result


# ----------------------------------------------------------------------------------------------
# Versions
# ----------------------------------------------------------------------------------------------


def _latest_versions(resources: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """One resource per logical id: the latest version. Resources without an id are all kept."""
    by_id: dict[str, Mapping[str, Any]] = {}
    anonymous: list[Mapping[str, Any]] = []
    for r in resources:
        rid = r.get("id")
        if not isinstance(rid, str) or not rid:
            anonymous.append(r)
            continue
        kept = by_id.get(rid)
        if kept is None or _version_key(r) >= _version_key(kept):
            by_id[rid] = r
    return [*by_id.values(), *anonymous]


def _version_key(resource: Mapping[str, Any]) -> tuple[datetime, int]:
    meta = resource.get("meta") or {}
    updated = _parse_instant(meta.get("lastUpdated"), UTC)
    version = meta.get("versionId")
    numeric = int(version) if isinstance(version, str) and version.isdigit() else -1
    return (updated if isinstance(updated, datetime) else datetime.min.replace(tzinfo=UTC), numeric)


# ----------------------------------------------------------------------------------------------
# Codes and values
# ----------------------------------------------------------------------------------------------


def _loinc_codes(concept: Any) -> list[str]:
    if not isinstance(concept, Mapping):
        return []
    return [
        str(c.get("code"))
        for c in concept.get("coding") or []
        if isinstance(c, Mapping) and c.get("system") == LOINC_SYSTEM and c.get("code")
    ]


def _value_parts(resource: Mapping[str, Any]) -> list[tuple[VitalFeature, Mapping[str, Any]]]:
    """(feature, element holding value[x] / dataAbsentReason) for each value of interest."""
    codes = _loinc_codes(resource.get("code"))
    if any(c in BP_PANEL_LOINC for c in codes):
        parts: list[tuple[VitalFeature, Mapping[str, Any]]] = []
        for component in resource.get("component") or []:
            feature = _first_feature(_loinc_codes(component.get("code")))
            if feature is not None:
                parts.append((feature, component))
        return parts
    feature = _first_feature(codes)
    return [(feature, resource)] if feature is not None else []


def _first_feature(codes: Sequence[str]) -> VitalFeature | None:
    for code in codes:
        if code in _FEATURE_BY_CODE:
            return _FEATURE_BY_CODE[code]
    return None


def _canonical_value(feature: VitalFeature, holder: Mapping[str, Any]) -> float | RejectedValue:
    quantity = holder.get("valueQuantity")
    if quantity is None:
        other = next((k for k in holder if k.startswith("value")), None)
        if other is not None:
            return RejectedValue("", Outcome.MISSING_UNIT, f"{feature.display}: {other} carries no unit")
        return RejectedValue("", Outcome.IMPLAUSIBLE_VALUE, f"{feature.display}: no value and no dataAbsentReason")
    raw = quantity.get("value")
    if isinstance(raw, bool) or not isinstance(raw, int | float) or not math.isfinite(raw):
        return RejectedValue("", Outcome.IMPLAUSIBLE_VALUE, f"{feature.display}: value {raw!r} is not a number")
    if quantity.get("comparator"):
        return RejectedValue(
            "", Outcome.IMPLAUSIBLE_VALUE, f"{feature.display}: censored value {quantity['comparator']}{raw}"
        )
    unit = _unit_as_sent(quantity)
    if unit is None:
        return RejectedValue("", Outcome.MISSING_UNIT, f"{feature.display}: value {raw} has no unit")
    convert = _UNITS[feature.unit].get(_unit_key(unit))
    if convert is None:
        return RejectedValue(
            "", Outcome.UNKNOWN_UNIT, f"{feature.display}: unit {unit!r} cannot be converted to {feature.unit}"
        )
    value = convert(float(raw))
    low, high = feature.plausible
    if not low <= value <= high:
        return RejectedValue(
            "",
            Outcome.IMPLAUSIBLE_VALUE,
            f"{feature.display}: {value:g} {feature.unit} outside the plausible range {low:g}-{high:g}",
        )
    return value


def _unit_as_sent(quantity: Mapping[str, Any]) -> str | None:
    """The UCUM code when the quantity has one (system UCUM or none), else the display text."""
    code = quantity.get("code")
    system = quantity.get("system")
    if isinstance(code, str) and code.strip() and system in (None, UCUM_SYSTEM):
        return code.strip()
    text = quantity.get("unit")
    if isinstance(text, str) and text.strip():
        return text.strip()
    if isinstance(code, str) and code.strip():  # a non-UCUM system: its code is the best we have
        return code.strip()
    return None


def _unit_key(unit: str) -> str:
    # "{beats}/min" -> "/min", "%{HemoglobinSaturation}" -> "%"; case and blanks do not matter in display text.
    return _ANNOTATION.sub("", unit).replace(" ", "").lower()


# ----------------------------------------------------------------------------------------------
# Time
# ----------------------------------------------------------------------------------------------


def _effective(resource: Mapping[str, Any], assume_tz: tzinfo) -> datetime | str:
    """The clinically relevant time, UTC-aware, or a reason string when there is none usable."""
    period = resource.get("effectivePeriod")
    if "effectiveDateTime" in resource:
        raw = resource["effectiveDateTime"]
    elif "effectiveInstant" in resource:
        raw = resource["effectiveInstant"]
    elif isinstance(period, Mapping) and (period.get("end") or period.get("start")):
        raw = period.get("end") or period.get("start")
    elif "issued" in resource:
        raw = resource["issued"]
    else:
        return "no effective time (effectiveDateTime/effectivePeriod/effectiveInstant/issued)"
    return _parse_instant(raw, assume_tz)


_DATE_ONLY = re.compile(r"^\d{4}-\d{2}-\d{2}$")
_COARSE = re.compile(r"^\d{4}(-\d{2})?$")


def _parse_instant(raw: Any, assume_tz: tzinfo) -> datetime | str:
    if not isinstance(raw, str) or not raw:
        return f"time {raw!r} is not a FHIR dateTime"
    text = raw.strip()
    if _COARSE.match(text):
        return f"time {text!r} has only year/month precision"
    try:
        if _DATE_ONLY.match(text):
            parsed = datetime.combine(date.fromisoformat(text), time(0, 0))
        else:
            parsed = datetime.fromisoformat(text)
    except ValueError:
        return f"time {text!r} is not a FHIR dateTime"
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=assume_tz)
    return parsed.astimezone(UTC)
