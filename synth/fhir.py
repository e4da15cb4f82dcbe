"""A synthetic patient as FHIR R4 resources: one Patient and its vital-sign Observations, as JSON dicts.

Observations follow the R4 vital-signs profile (category vital-signs, LOINC code, UCUM valueQuantity)
and carry every quirk of the raw record (``vitals.RawVital``): BP panels with components or separate
systolic/diastolic observations, [degF], mmol/L glucose, SpO2 as 2708-6, effectivePeriod, statuses
amended/corrected/entered-in-error/cancelled, dataAbsentReason, duplicates and site timezone offsets.

Resources reference the Patient as ``urn:uuid:`` of its bundle fullUrl, a UUID derived from its
identifier, so ``transaction_bundle`` loads a patient and its observations as one transaction.
"""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta, timezone
from typing import Any

from synth.patient import SynthPatient
from synth.vitals import RawVital

LOINC = "http://loinc.org"
UCUM = "http://unitsofmeasure.org"
OBSERVATION_IDENTIFIER_SYSTEM = "urn:strokewatch:synth:observation"
_NAMESPACE = uuid.UUID("6f1c1f0e-5d0a-4c1e-9a55-3a7d2f1b9c42")  # fixed: fullUrls are reproducible

LOINC_DISPLAY = {
    "85354-9": "Blood pressure panel with all children optional",
    "55284-4": "Blood pressure systolic and diastolic",
    "8480-6": "Systolic blood pressure",
    "8462-4": "Diastolic blood pressure",
    "8867-4": "Heart rate",
    "9279-1": "Respiratory rate",
    "59408-5": "Oxygen saturation in Arterial blood by Pulse oximetry",
    "2708-6": "Oxygen saturation in Arterial blood",
    "8310-5": "Body temperature",
    "2339-0": "Glucose [Mass/volume] in Blood",
    "15074-8": "Glucose [Moles/volume] in Blood",
    "39156-5": "Body mass index (BMI) [Ratio]",
}
_VITAL_SIGNS = {
    "coding": [
        {
            "system": "http://terminology.hl7.org/CodeSystem/observation-category",
            "code": "vital-signs",
            "display": "Vital Signs",
        }
    ]
}


def full_url(resource: dict[str, Any]) -> str:
    """``urn:uuid:`` derived from the resource type and its first identifier (stable across runs)."""
    ident = resource["identifier"][0]
    return "urn:uuid:" + str(uuid.uuid5(_NAMESPACE, f"{resource['resourceType']}|{ident['system']}|{ident['value']}"))


def _code(loinc: str) -> dict[str, Any]:
    return {"coding": [{"system": LOINC, "code": loinc, "display": LOINC_DISPLAY[loinc]}], "text": LOINC_DISPLAY[loinc]}


def _quantity(value: float, unit: str) -> dict[str, Any]:
    number: float | int = int(value) if float(value).is_integer() else float(value)
    return {"value": number, "unit": unit, "system": UCUM, "code": unit}


def _absent(code: str) -> dict[str, Any]:
    return {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/data-absent-reason", "code": code}]}


def _timestamp(window_end: datetime, hours_before_end: float, tz: timezone) -> str:
    return (window_end - timedelta(hours=hours_before_end)).astimezone(tz).isoformat(timespec="seconds")


def _observation(
    raw: RawVital, k: int, patient: SynthPatient, subject: str, window_end: datetime, tz: timezone
) -> dict[str, Any]:
    obs: dict[str, Any] = {
        "resourceType": "Observation",
        "identifier": [{"system": OBSERVATION_IDENTIFIER_SYSTEM, "value": f"{patient.mrn}-{k:05d}"}],
        "status": raw.status,
        "category": [_VITAL_SIGNS],
        "code": _code(raw.loinc),
        "subject": {"reference": subject},
    }
    end = _timestamp(window_end, raw.hours_before_end, tz)
    if raw.period_minutes:
        start = _timestamp(window_end, raw.hours_before_end + raw.period_minutes / 60, tz)
        obs["effectivePeriod"] = {"start": start, "end": end}
    else:
        obs["effectiveDateTime"] = end
    panel = raw.loinc in ("85354-9", "55284-4")
    if panel:
        if raw.absent_reason:
            obs["dataAbsentReason"] = _absent(raw.absent_reason)
            parts = ("8480-6", "8462-4")
            obs["component"] = [{"code": _code(c), "dataAbsentReason": _absent(raw.absent_reason)} for c in parts]
        else:
            obs["component"] = [
                {"code": _code(c.loinc), "valueQuantity": _quantity(c.value, c.unit)} for c in raw.values
            ]
    elif raw.absent_reason or not raw.values:
        obs["dataAbsentReason"] = _absent(raw.absent_reason or "unknown")
    else:
        comp = raw.values[0]
        obs["valueQuantity"] = _quantity(comp.value, comp.unit)
    return obs


def fhir_resources(patient: SynthPatient, *, identifier_system: str, window_end: datetime) -> list[dict[str, Any]]:
    """[Patient, Observation...] as FHIR R4 JSON dicts; vitals times are relative to ``window_end``."""
    if window_end.tzinfo is None:
        raise ValueError("window_end must be timezone-aware")
    resource: dict[str, Any] = {
        "resourceType": "Patient",
        "identifier": [
            {
                "use": "usual",
                "type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "MR"}]},
                "system": identifier_system,
                "value": patient.mrn,
            }
        ],
        "active": True,
        "name": [{"use": "official", "family": patient.family_name, "given": [patient.given_name]}],
        "gender": patient.sex,
        "birthDate": patient.birth_date(window_end).isoformat(),
    }
    subject = full_url(resource)
    tz = timezone(timedelta(minutes=patient.vitals.utc_offset_minutes))
    observations = [
        _observation(raw, k, patient, subject, window_end, tz) for k, raw in enumerate(patient.vitals.observations)
    ]
    return [resource, *observations]


def transaction_bundle(resources: list[dict[str, Any]], *, conditional: bool = True) -> dict[str, Any]:
    """A transaction Bundle that POSTs the resources (from one or more ``fhir_resources`` calls).

    With ``conditional`` each entry is a conditional create on its identifier (``ifNoneExist``), so loading
    the same patients twice duplicates nothing; the record's deliberate duplicates have their own identifiers.
    """
    entries = []
    for r in resources:
        ident = r["identifier"][0]
        request: dict[str, Any] = {"method": "POST", "url": r["resourceType"]}
        if conditional:
            request["ifNoneExist"] = f"identifier={ident['system']}|{ident['value']}"
        entries.append({"fullUrl": full_url(r), "resource": r, "request": request})
    return {"resourceType": "Bundle", "type": "transaction", "entry": entries}
