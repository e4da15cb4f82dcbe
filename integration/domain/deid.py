"""De-identification for research export: keyed pseudonyms, per-patient date shifts, and FHIR resources rebuilt
from an allow-list. No I/O; the DICOM side (PS3.15 Annex E on pydicom data sets) is ``adapters.dicom_deid``.

Everything derives from one site key (HMAC-SHA256), so an export is reproducible: the same key gives the same
pseudonyms, UIDs and date shifts in every run, another key gives unrelated ones, and without the key neither
the identifiers nor the shift can be recovered. Each derivation has its own label, so a pseudonym never equals a
UID's digits or a shift.

- A patient's pseudonym ``SWP-`` + 20 hex stands for the FHIR Patient: it is the exported Patient's id and
  identifier and the DICOM PatientID/PatientName, so the two halves of an export link.
- A patient's date shift: whole days back in time, between ``MIN_SHIFT_DAYS`` and ``MAX_SHIFT_DAYS``, the same
  for every date of that patient (DICOM and FHIR), so intervals, times of day and ages are kept.
- A UID: ``2.25.`` + the decimal of 128 bits of HMAC (PS3.5 B.2), the same original UID always giving the same one.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import date, timedelta
from typing import Any

#: Shifts are drawn from this range of days before the real date (about 1 to 11 years).
MIN_SHIFT_DAYS, MAX_SHIFT_DAYS = 365, 4014
MIN_KEY_BYTES = 32
PATIENT_SYSTEM = "urn:strokewatch:deid:patient"
ASSESSMENT_SYSTEM = "urn:strokewatch:deid:risk-assessment"
DICOM_UID_SYSTEM = "urn:dicom:uid"
#: Values a careless configuration leaves in place of a key.
PLACEHOLDER_KEYS = frozenset({"changeme", "change-me", "secret", "password", "placeholder", "xxx", "todo", "sandbox"})


class DeidKeyError(ValueError):
    """The site key is missing, too short or a placeholder: nothing can be exported."""


class DeidKey:
    """The site key and what is derived from it. The key never appears in a repr or a message."""

    def __init__(self, key: bytes) -> None:
        text = key.decode(errors="replace").strip().lower()
        if text in PLACEHOLDER_KEYS or len(set(text)) < 8:
            raise DeidKeyError("the de-identification key is a placeholder; set a random one (e.g. `openssl rand "
                               "-hex 32`)")
        if len(key) < MIN_KEY_BYTES:
            raise DeidKeyError(f"the de-identification key needs at least {MIN_KEY_BYTES} bytes")
        self._key = key

    def __repr__(self) -> str:
        return "DeidKey(***)"

    def _mac(self, label: str, value: str) -> bytes:
        return hmac.new(self._key, f"{label}\x00{value}".encode(), hashlib.sha256).digest()

    @property
    def key_id(self) -> str:
        """A fingerprint that tells whether two exports used the same key, revealing nothing of it."""
        return self._mac("key-id", "").hex()[:16]

    def patient(self, fhir_id: str) -> str:
        """The pseudonym of a FHIR Patient (also the DICOM PatientID of its studies)."""
        return "SWP-" + self._mac("patient", fhir_id).hex()[:20].upper()

    def shift_days(self, fhir_id: str) -> int:
        """Days the patient's dates move back (the same for every date of that patient)."""
        span = MAX_SHIFT_DAYS - MIN_SHIFT_DAYS + 1
        return MIN_SHIFT_DAYS + int.from_bytes(self._mac("date-shift", fhir_id)[:8], "big") % span

    def uid(self, original: str) -> str:
        """The replacement of a DICOM UID: ``2.25.<int>`` from 128 bits of HMAC (at most 44 characters)."""
        return "2.25." + str(int.from_bytes(self._mac("uid", original.strip())[:16], "big"))

    def resource_id(self, resource_type: str, original_id: str) -> str:
        """The exported id of a FHIR resource other than a Patient."""
        return self._mac("resource", f"{resource_type}/{original_id}").hex()[:32]

    def token(self, label: str, value: str) -> str:
        """A pseudonym for any other identifier (e.g. a RiskAssessment's identifier)."""
        return self._mac(label, value).hex()[:32]


# -- dates ----------------------------------------------------------------------------------------------------

_FHIR_DATE = re.compile(r"^(\d{4})-(\d{2})-(\d{2})(.*)$", re.S)


def shift_fhir_date(value: str, days: int) -> str | None:
    """A FHIR date/dateTime/instant ``days`` earlier, the time and zone untouched; None for a partial date
    (``YYYY``, ``YYYY-MM``) or anything unreadable: the caller drops it rather than keep a real date."""
    m = _FHIR_DATE.match(value)
    if not m:
        return None
    try:
        day = date(int(m[1]), int(m[2]), int(m[3]))
    except ValueError:
        return None
    return (day - timedelta(days=days)).isoformat() + m[4]


def shift_dicom_date(value: str, days: int) -> str | None:
    """A DICOM DA (``YYYYMMDD``) or the date part of a DT, ``days`` earlier; None when it cannot be shifted."""
    text = value.strip()
    if len(text) < 8 or not text[:8].isdigit():
        return None
    try:
        day = date(int(text[:4]), int(text[4:6]), int(text[6:8]))
    except ValueError:
        return None
    return (day - timedelta(days=days)).strftime("%Y%m%d") + text[8:]


# -- FHIR ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PatientContext:
    """One patient's keys for an export."""

    fhir_id: str
    pseudonym: str
    shift_days: int

    @classmethod
    def of(cls, key: DeidKey, fhir_id: str) -> PatientContext:
        return cls(fhir_id, key.patient(fhir_id), key.shift_days(fhir_id))


def _copy(resource: Mapping[str, Any], keep: tuple[str, ...]) -> dict[str, Any]:
    return {k: resource[k] for k in keep if k in resource}


def _shift_fields(out: dict[str, Any], source: Mapping[str, Any], ctx: PatientContext, names: tuple[str, ...]) -> None:
    """Copy each date field (a string, or a Period with start/end) shifted; unreadable ones are left out."""
    for name in names:
        value = source.get(name)
        if isinstance(value, str):
            shifted = shift_fhir_date(value, ctx.shift_days)
            if shifted is not None:
                out[name] = shifted
        elif isinstance(value, Mapping):
            period = {k: s for k in ("start", "end") if isinstance(value.get(k), str)
                      and (s := shift_fhir_date(value[k], ctx.shift_days)) is not None}
            if period:
                out[name] = period


def deid_patient(patient: Mapping[str, Any], ctx: PatientContext) -> dict[str, Any]:
    """The Patient as exported: pseudonymous id and identifier, gender, shifted birth date (a partial birth date is
    left out), deceased flag or shifted date. Names, telecom, address, contacts, photo, links, extensions: gone."""
    out: dict[str, Any] = {
        "resourceType": "Patient",
        "id": ctx.pseudonym,
        "identifier": [{"system": PATIENT_SYSTEM, "value": ctx.pseudonym}],
    }
    out.update(_copy(patient, ("active", "gender")))
    _shift_fields(out, patient, ctx, ("birthDate", "deceasedDateTime"))
    if isinstance(patient.get("deceasedBoolean"), bool):
        out["deceasedBoolean"] = patient["deceasedBoolean"]
    return out


_VALUE_KEEP = ("valueQuantity", "valueCodeableConcept", "valueBoolean", "valueInteger", "valueRange", "valueRatio",
               "valueSampledData", "valueTime", "dataAbsentReason", "interpretation")
_VALUE_DATES = ("valueDateTime", "valuePeriod")


def _coded(part: Mapping[str, Any], ctx: PatientContext) -> dict[str, Any]:
    out = _copy(part, ("code", *_VALUE_KEEP))
    _shift_fields(out, part, ctx, _VALUE_DATES)
    ranges = [_copy(r, ("low", "high", "type", "appliesTo", "age")) for r in part.get("referenceRange", [])
              if isinstance(r, Mapping)]
    if ranges:
        out["referenceRange"] = ranges
    return out


def deid_observation(obs: Mapping[str, Any], ctx: PatientContext, key: DeidKey) -> dict[str, Any]:
    """An Observation as exported: coded content and values kept, times shifted, subject the pseudonym, id keyed.
    Identifiers, narrative, notes, performer, encounter, device, extensions and free-text values are left out."""
    out: dict[str, Any] = {"resourceType": "Observation", "id": key.resource_id("Observation", str(obs.get("id")))}
    out.update(_copy(obs, ("status", "category", "bodySite", "method")))
    out.update(_coded(obs, ctx))
    out["subject"] = {"reference": f"Patient/{ctx.pseudonym}"}
    _shift_fields(out, obs, ctx, ("effectiveDateTime", "effectivePeriod", "effectiveInstant", "issued"))
    components = [_coded(c, ctx) for c in obs.get("component", []) if isinstance(c, Mapping)]
    if components:
        out["component"] = components
    for link in ("hasMember", "derivedFrom"):
        refs = [{"reference": f"Observation/{key.resource_id('Observation', r['reference'].split('/', 1)[1])}"}
                for r in obs.get(link, []) if isinstance(r, Mapping)
                and str(r.get("reference", "")).startswith("Observation/")]
        if refs:
            out[link] = refs
    return out


def deid_risk_assessment(
    ra: Mapping[str, Any], ctx: PatientContext, key: DeidKey, exported_observations: set[str],
    study_uid: Callable[[str], str | None],
) -> dict[str, Any]:
    """A RiskAssessment as exported: prediction, method, status and note kept; id and identifier keyed; time
    shifted; ``basis`` rewritten (ImagingStudy by its de-identified UID, Observations by their exported ids, those
    not exported dropped; superseded assessments by keyed id and identifier). ``study_uid`` maps an original study
    UID to its replacement, or None when the study is not in the export."""
    out: dict[str, Any] = {"resourceType": "RiskAssessment",
                           "id": key.resource_id("RiskAssessment", str(ra.get("id")))}
    identifiers = [{"system": ASSESSMENT_SYSTEM, "value": _assessment_token(key, i)}
                   for i in ra.get("identifier", []) if isinstance(i, Mapping)]
    if identifiers:
        out["identifier"] = identifiers
    out.update(_copy(ra, ("status", "method", "code")))
    out["subject"] = {"reference": f"Patient/{ctx.pseudonym}"}
    _shift_fields(out, ra, ctx, ("occurrenceDateTime", "occurrencePeriod"))
    basis = [b for b in (_basis(item, key, exported_observations, study_uid) for item in ra.get("basis", [])
                         if isinstance(item, Mapping)) if b is not None]
    if basis:
        out["basis"] = basis
    predictions = [_copy(p, ("outcome", "probabilityDecimal", "probabilityRange", "qualitativeRisk", "relativeRisk",
                             "whenRange")) for p in ra.get("prediction", []) if isinstance(p, Mapping)]
    if predictions:
        out["prediction"] = predictions
    notes = [{"text": n["text"]} for n in ra.get("note", [])
             if isinstance(n, Mapping) and isinstance(n.get("text"), str)]
    if notes:  # the engine's own statement (model, runtime, drivers); it names no patient and no date
        out["note"] = notes
    return out


def _basis(item: Mapping[str, Any], key: DeidKey, observations: set[str],
           study_uid: Callable[[str], str | None]) -> dict[str, Any] | None:
    reference = str(item.get("reference", ""))
    identifier = item.get("identifier")
    if item.get("type") == "ImagingStudy" and isinstance(identifier, Mapping):
        value = str(identifier.get("value", ""))
        new_uid = study_uid(value.removeprefix("urn:oid:"))
        if new_uid is None:
            return None
        return {"type": "ImagingStudy", "identifier": {"system": DICOM_UID_SYSTEM, "value": f"urn:oid:{new_uid}"},
                **_copy(item, ("display",))}
    if reference.startswith("Observation/"):
        original = reference.split("/", 1)[1]
        return {"reference": f"Observation/{key.resource_id('Observation', original)}"} if original in observations \
            else None
    if reference.startswith("RiskAssessment/") or item.get("type") == "RiskAssessment":
        out: dict[str, Any] = {"display": "superseded assessment"}
        if reference.startswith("RiskAssessment/"):
            out["reference"] = f"RiskAssessment/{key.resource_id('RiskAssessment', reference.split('/', 1)[1])}"
        if isinstance(identifier, Mapping):
            out["type"] = "RiskAssessment"
            out["identifier"] = {"system": ASSESSMENT_SYSTEM, "value": _assessment_token(key, identifier)}
        return out
    return None


def _assessment_token(key: DeidKey, identifier: Mapping[str, Any]) -> str:
    return key.token("assessment", f"{identifier.get('system')}|{identifier.get('value')}")
