"""Four weeks of vital signs for one patient, as an EHR would hold them, and their canonical reduction.

Processes (times are hours before the window end, 0..672):

* schedule: "inpatient" (core vitals every 4-8 h all window), "mixed" (home BP/HR once or twice a day,
  then an admission for the last 3-14 days), or "sparse" (a few clinic readings a week); 1-3 gaps of
  12-72 h; glucose 3-4 times a day in admitted diabetics, otherwise daily or rarer; BMI once or twice.
* SBP = baseline + trend x weeks + night dip (-6 mmHg) + lability x (0.5 AR(1) + 0.5 white) + 3 mmHg
  measurement noise; DBP follows SBP with slope 0.45 around its own baseline.
* HR: sinus (AR(1) SD 5) or, during atrial fibrillation (persistent: always; paroxysmal: 6-72 h episodes
  covering 10-40% of the window), +15 /min and beat-to-beat irregular (iid SD 15).
* glucose lognormal around the patient's level (log-SD 0.15, 0.25 if diabetic); RR, SpO2, temperature
  around individual baselines with a 0.3 Cel evening rise; BMI with 0.3 kg/m2 scale noise.
* record artefacts: ~1.5% implausible values (cuff/probe errors, dropped by plausibility limits) and ~1%
  plausible outliers; statuses amended/corrected/entered-in-error (with a wrong value)/cancelled;
  dataAbsentReason without a value; ~2% exact duplicates; effectivePeriod on ~10%.
* unit variants per patient: temperature in [degF], glucose as mmol/L (LOINC 15074-8), SpO2 as 2708-6,
  BP as panel 85354-9 or 55284-4 with components or as separate 8480-6/8462-4 observations.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from inference import contract as C
from inference.preprocess import VitalSample
from synth.outcome import VitalTraits, lability_z

GLUCOSE_MG_PER_MMOL = 18.016  # mg/dL per mmol/L (molar mass 180.16 g/mol)
VALID_STATUSES = ("final", "amended", "corrected")


@dataclass(frozen=True, slots=True)
class Component:
    loinc: str
    value: float
    unit: str  # UCUM


@dataclass(frozen=True, slots=True)
class RawVital:
    """One Observation as it would sit in the EHR: a code, a time, a value (or components) and metadata."""

    loinc: str
    hours_before_end: float
    values: tuple[Component, ...]  # one for a simple observation, two for a BP panel, none if absent
    status: str = "final"
    absent_reason: str | None = None
    period_minutes: float | None = None  # effectivePeriod ending at the time, instead of effectiveDateTime


@dataclass(frozen=True)
class Charting:
    """A centre's charting habits (the defaults are the default cohort's mix of centres).

    ``schedule_p``: probabilities of the inpatient / mixed / sparse schedules; ``temp_degf``, ``glucose_mmol``:
    probability that a patient's temperatures are charted in [degF] / glucose in mmol/L; ``extra_gaps``: more
    charting gaps (0 = the default 1-3); ``utc_offset_minutes``: the centre's offset (None: drawn per patient).
    """

    schedule_p: tuple[float, float, float] = (0.5, 0.35, 0.15)
    temp_degf: float = 0.3
    glucose_mmol: float = 0.3
    extra_gaps: int = 0
    utc_offset_minutes: int | None = None


DEFAULT_CHARTING = Charting()


@dataclass(frozen=True)
class VitalsRecord:
    observations: tuple[RawVital, ...]
    utc_offset_minutes: int  # the recording site's offset, used in the FHIR timestamps
    signal_mask: np.ndarray  # (N_STEPS, N_FEATURES) bool: where the planted risk signal lives


def _times(rng: np.random.Generator, start: float, end: float, every: tuple[float, float]) -> np.ndarray:
    """Jittered regular times (hours before end) from ``start`` down to ``end`` (start > end)."""
    out, t = [], start - rng.uniform(0, every[1])
    while t > end:
        out.append(t)
        t -= rng.uniform(*every)
    return np.asarray(out)


def _schedule(rng: np.random.Generator, charting: Charting = DEFAULT_CHARTING) -> tuple[np.ndarray, np.ndarray, float]:
    """(core times with full vitals, home times with BP/HR only, admission start) in hours before end."""
    w = float(C.WINDOW_HOURS)
    kind = rng.choice(["inpatient", "mixed", "sparse"], p=list(charting.schedule_p))
    if kind == "inpatient":
        admit = w
        home = np.empty(0)
    elif kind == "mixed":
        admit = rng.uniform(3, 14) * 24
        home = _times(rng, w, admit, (10, 30))
    else:
        admit = rng.uniform(0.5, 2) * 24
        home = _times(rng, w, admit, (30, 90))
    core = _times(rng, admit, 0.2, (4, 8))
    for _ in range(rng.integers(1, 4) + charting.extra_gaps):  # gaps: device off, transfers, missing charting
        g0 = rng.uniform(0, w)
        g1 = g0 + rng.uniform(12, 72)
        core, home = core[(core < g0) | (core > g1)], home[(home < g0) | (home > g1)]
    return core, home, admit


def _af_on(rng: np.random.Generator, af: int) -> tuple[np.ndarray, np.ndarray]:
    """AF episodes as (start, end) arrays in hours before end."""
    w = float(C.WINDOW_HOURS)
    if af == 2:
        return np.array([w]), np.array([0.0])
    if af == 0:
        return np.empty(0), np.empty(0)
    burden = rng.uniform(0.1, 0.4) * w
    starts, ends, total = [], [], 0.0
    while total < burden:
        length = rng.uniform(6, 72)
        s = rng.uniform(length, w)
        starts.append(s)
        ends.append(s - length)
        total += length
    return np.asarray(starts), np.asarray(ends)


def _in_episodes(t: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    if starts.size == 0:
        return np.zeros(t.shape, dtype=bool)
    return np.asarray(((t[:, None] <= starts) & (t[:, None] >= ends)).any(axis=1))


def _night(t: np.ndarray, offset_h: float) -> np.ndarray:
    local_hour = (-t + offset_h + 9.0) % 24  # window ends 09:00 UTC (see patient.window_end)
    return (local_hour >= 22) | (local_hour < 6)


def generate_vitals(rng: np.random.Generator, tr: VitalTraits, charting: Charting = DEFAULT_CHARTING) -> VitalsRecord:
    """Draw the raw Observations of one patient (scalar traits) with all their real-world quirks.

    ``charting``: the recording centre's habits (schedules, units, gaps, its UTC offset).
    """
    offset = int(rng.choice([60, 120, -300, 0, 330]))
    if charting.utc_offset_minutes is not None:
        offset = charting.utc_offset_minutes
    core, home, admit = _schedule(rng, charting)
    w = float(C.WINDOW_HOURS)
    bp_t = np.sort(np.concatenate([core, home]))[::-1]
    weeks = (w - bp_t) / (24 * 7)
    n = bp_t.size
    ar = np.zeros(n)
    for i in range(1, n):
        ar[i] = 0.7 * ar[i - 1] + np.sqrt(1 - 0.49) * rng.standard_normal()
    if n:
        ar[0] = rng.standard_normal()
    wobble = tr.lability * (np.sqrt(0.5) * ar + np.sqrt(0.5) * rng.standard_normal(n))
    sbp = tr.sbp + tr.trend * weeks - 6.0 * _night(bp_t, offset / 60) + wobble + 3 * rng.standard_normal(n)
    dbp = tr.dbp + 0.45 * (sbp - tr.sbp) + 3 * rng.standard_normal(n)
    starts, ends = _af_on(rng, int(tr.af))
    in_af = _in_episodes(bp_t, starts, ends)
    hr_ar = np.zeros(n)
    for i in range(1, n):
        hr_ar[i] = 0.6 * hr_ar[i - 1] + 0.8 * rng.standard_normal()
    hr = np.where(in_af, tr.hr + 15 + 15 * rng.standard_normal(n), tr.hr + 5 * hr_ar + 2 * rng.standard_normal(n))

    obs: list[RawVital] = []
    bp_style = rng.choice(["85354-9", "55284-4", "separate"], p=[0.6, 0.15, 0.25])
    for t, s, d, h in zip(bp_t, sbp, dbp, hr, strict=True):
        sv, dv = float(round(s)), float(round(d))
        if rng.random() < 0.008:  # cuff error: implausible reading
            sv, dv = float(rng.choice([0.0, 310.0, 12.0])), 0.0
        if bp_style == "separate":
            obs.append(RawVital("8480-6", t, (Component("8480-6", sv, "mm[Hg]"),)))
            obs.append(RawVital("8462-4", t, (Component("8462-4", dv, "mm[Hg]"),)))
        else:
            obs.append(
                RawVital(str(bp_style), t, (Component("8480-6", sv, "mm[Hg]"), Component("8462-4", dv, "mm[Hg]")))
            )
        hv = float(round(h))
        if rng.random() < 0.005:
            hv = float(rng.choice([0.0, 300.0]))
        obs.append(RawVital("8867-4", t, (Component("8867-4", max(hv, 0.0), "/min"),)))

    spo2_code = "2708-6" if rng.random() < 0.3 else "59408-5"
    temp_f = rng.random() < charting.temp_degf
    for t in core:
        rr = float(np.rint(tr.rr + 1.5 * rng.standard_normal()))
        spo2 = min(100.0, float(np.rint(tr.spo2 + rng.standard_normal())))
        if rng.random() < 0.01:  # probe off the finger: plausible but wrong
            spo2 = float(round(rng.uniform(70, 88)))
        evening = 0.3 * np.cos(((-t + offset / 60 + 9.0) % 24 - 18) / 24 * 2 * np.pi)
        temp = tr.temp + evening + 0.15 * rng.standard_normal()
        temp_value = round(temp * 9 / 5 + 32, 1) if temp_f else round(temp, 1)
        if rng.random() < 0.005:
            temp_value = 25.0 if not temp_f else 77.0  # ambient reading: implausible
        obs.append(RawVital("9279-1", t, (Component("9279-1", max(rr, 1.0), "/min"),)))
        obs.append(RawVital(spo2_code, t, (Component(spo2_code, spo2, "%"),)))
        obs.append(RawVital("8310-5", t, (Component("8310-5", float(temp_value), "[degF]" if temp_f else "Cel"),)))

    diabetic_like = tr.glucose > 130
    glu_log_sd = 0.25 if diabetic_like else 0.15
    glu_t = np.concatenate(
        [_times(rng, admit, 0.5, (5, 8) if diabetic_like else (20, 30)), _times(rng, w, admit, (48, 160))]
    )
    glu_mmol = rng.random() < charting.glucose_mmol
    for t in glu_t:
        g = tr.glucose * np.exp(glu_log_sd * rng.standard_normal())
        if glu_mmol:
            obs.append(RawVital("15074-8", t, (Component("15074-8", round(g / GLUCOSE_MG_PER_MMOL, 1), "mmol/L"),)))
        else:
            obs.append(RawVital("2339-0", t, (Component("2339-0", float(round(g)), "mg/dL"),)))
    for t in rng.uniform(0.5, w, rng.integers(1, 3)):
        obs.append(
            RawVital(
                "39156-5", t, (Component("39156-5", round(float(tr.bmi + 0.3 * rng.standard_normal()), 1), "kg/m2"),)
            )
        )

    obs = _quirks(rng, obs)
    return VitalsRecord(tuple(obs), offset, _signal_mask(tr, starts, ends))


def _quirks(rng: np.random.Generator, obs: list[RawVital]) -> list[RawVital]:
    out: list[RawVital] = []
    for o in obs:
        u = rng.random()
        if u < 0.02:
            o = RawVital(
                o.loinc, o.hours_before_end, (), "final", str(rng.choice(["not-performed", "unknown", "error"]))
            )
        elif u < 0.035:  # charted on the wrong patient or mistyped, then retracted
            wrong = tuple(Component(c.loinc, round(c.value * rng.uniform(1.3, 1.8), 1), c.unit) for c in o.values)
            o = RawVital(o.loinc, o.hours_before_end, wrong, "entered-in-error")
        elif u < 0.04:
            o = RawVital(o.loinc, o.hours_before_end, o.values, "cancelled")
        elif u < 0.07:
            o = RawVital(o.loinc, o.hours_before_end, o.values, str(rng.choice(["amended", "corrected"])))
        if rng.random() < 0.1:
            o = RawVital(
                o.loinc, o.hours_before_end, o.values, o.status, o.absent_reason, float(rng.choice([5, 15, 60]))
            )
        out.append(o)
        if rng.random() < 0.02:
            out.append(o)  # the interface engine sent it twice
    return out


def _signal_mask(tr: VitalTraits, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """(N_STEPS, N_FEATURES) bool: features/steps whose values carry the planted risk signal."""
    T = C.N_STEPS
    mask = np.zeros((T, C.N_FEATURES), dtype=bool)
    step_end = (T - 1 - np.arange(T)) * C.STEP_HOURS  # hours before end at each step's end
    bp = [C.FEATURE_INDEX["sbp"], C.FEATURE_INDEX["dbp"]]
    if lability_z(np.asarray(tr.lability)) > 1.0 or tr.sbp > 155:
        mask[:, bp] = True
    if tr.trend > 1.5:
        mask[step_end < C.WINDOW_HOURS / 2, C.FEATURE_INDEX["sbp"]] = True  # the raised second half
    if starts.size:
        step_start = step_end + C.STEP_HOURS
        on = ((step_end[:, None] <= starts) & (step_start[:, None] >= ends)).any(axis=1)
        mask[on, C.FEATURE_INDEX["hr"]] = True
    if tr.glucose > 140:
        mask[:, C.FEATURE_INDEX["glucose"]] = True
    return mask


_LOINC_FEATURE = {code: i for i, f in enumerate(C.VITAL_FEATURES) for code in f.loinc}


def canonical_value(loinc: str, value: float, unit: str) -> tuple[int, float] | None:
    """(feature index, value in the contract's canonical unit), or None for an unknown code/unit."""
    feature = _LOINC_FEATURE.get(loinc)
    if feature is None:
        return None
    if unit == C.VITAL_FEATURES[feature].unit:
        return feature, value
    if unit == "[degF]":
        return feature, (value - 32.0) * 5.0 / 9.0
    if unit == "mmol/L" and C.VITAL_FEATURES[feature].key == "glucose":
        return feature, value * GLUCOSE_MG_PER_MMOL
    return None


def canonical_samples(record: VitalsRecord) -> list[VitalSample]:
    """What the engine keeps: valid statuses, values present, canonical units, plausible, de-duplicated."""
    seen: set[tuple[int, float, float]] = set()
    out: list[VitalSample] = []
    for o in record.observations:
        if o.status not in VALID_STATUSES or o.absent_reason is not None:
            continue
        for comp in o.values:
            got = canonical_value(comp.loinc, comp.value, comp.unit)
            if got is None:
                continue
            feature, value = got
            lo, hi = C.VITAL_FEATURES[feature].plausible
            key = (feature, round(o.hours_before_end, 6), round(value, 6))
            if not (lo <= value <= hi) or key in seen:
                continue
            seen.add(key)
            out.append(VitalSample(feature, float(o.hours_before_end), float(value)))
    return out
