"""Named synthetic centres (sites): who they see, how they scan, how they chart, how long they follow up.

A site changes the generating process only through documented parameters (``SYNTH.md``, "Sites"):

* imaging: the CT/MR mix and the scanners' noise (a factor on each patient's drawn noise SD);
* population (``outcome.Population``): age and sex structure, region-specific risk-factor prevalence (AF,
  baseline SBP, white-matter disease, diabetes) and the base rate, an intercept shift of the outcome logit
  made of the site's own hazard (``hazard_shift``) and its follow-up length (``ln(days / 90)``: a
  proportional-hazards approximation; the default cohort follows every patient for the contract's 90-day
  horizon, a site that follows for longer also counts later strokes, one that stops earlier misses some);
* charting (``vitals.Charting``): schedules (how often vitals are charted), gaps, units ([degF] vs Cel
  temperatures, mmol/L vs mg/dL glucose) and the centre's UTC offset.

The outcome model's coefficients are the same at every site, so pooled data is from one conditional model
with different intercepts and different covariate distributions (non-IID by covariate and label shift).
Each site's patients draw from their own random streams (``site.key`` is appended to every stream's seed)
and carry MRNs with the site's code, so the same (seed, index) at two sites are two different patients.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from synth.outcome import Population
from synth.vitals import Charting


@dataclass(frozen=True)
class Site:
    name: str
    code: str  # two letters in the MRN and accession number
    key: int  # appended to every random stream's seed
    description: str
    mr_fraction: float
    ct_noise_factor: float  # x the patient's drawn CT noise SD (HU)
    mr_noise_factor: float  # x the patient's drawn MR (Rician) noise SD
    priors: Population  # demographics and risk-factor priors (its logit_shift is ignored: see ``population``)
    charting: Charting
    follow_up_days: float
    hazard_shift: float  # the site's own intercept shift (case mix not in the model, care pathway)
    #: Patients a year relative to the largest site: real centres differ in size too (quantity skew); a simulation
    #: that gives each site ``round(n * relative_size)`` patients has small sites that gain most from pooling.
    relative_size: float = 1.0

    @property
    def logit_shift(self) -> float:
        """The outcome logit's intercept shift: hazard plus follow-up (``ln(days / 90)``)."""
        return self.hazard_shift + math.log(self.follow_up_days / 90.0)

    @property
    def population(self) -> Population:
        """The priors with the site's intercept shift: what ``synth.outcome`` draws from."""
        return replace(self.priors, logit_shift=self.logit_shift)


SITES: dict[str, Site] = {
    s.name: s
    for s in (
        Site(
            "nordhaven",
            "NH",
            101,
            "northern university hospital: MR-first stroke pathway on modern scanners, an older population, "
            "AF screening, SI units, inpatient charting",
            priors=Population(age_mean=72.0, age_sd=12.0, male_fraction=0.46, af_logit_shift=0.6, sbp_shift=-4.0),
            mr_fraction=0.55,
            ct_noise_factor=0.8,
            mr_noise_factor=0.8,
            charting=Charting(
                schedule_p=(0.7, 0.25, 0.05), temp_degf=0.0, glucose_mmol=0.95, extra_gaps=0, utc_offset_minutes=60
            ),
            follow_up_days=90.0,
            hazard_shift=-0.3,
        ),
        Site(
            "coastal",
            "CO",
            102,
            "coastal community hospital: CT almost only on older scanners, a younger and more often male "
            "population with more hypertension and diabetes, US units, home BP between visits, short follow-up",
            priors=Population(age_mean=60.0, age_sd=15.0, male_fraction=0.56, sbp_shift=10.0, diabetes_fraction=0.3),
            mr_fraction=0.05,
            ct_noise_factor=1.35,
            mr_noise_factor=1.0,
            charting=Charting(
                schedule_p=(0.3, 0.5, 0.2), temp_degf=0.95, glucose_mmol=0.02, extra_gaps=1, utc_offset_minutes=-300
            ),
            follow_up_days=60.0,
            hazard_shift=-0.1,
            relative_size=0.6,
        ),
        Site(
            "highland",
            "HL",
            103,
            "rural highland hospital: CT plus a low-field MR, more white-matter disease and AF, "
            "sparse charting with long gaps, mixed units, long follow-up",
            priors=Population(age_mean=68.0, age_sd=13.0, male_fraction=0.52, wmd_shift=0.5, af_logit_shift=0.3),
            mr_fraction=0.25,
            ct_noise_factor=1.2,
            mr_noise_factor=1.7,
            charting=Charting(
                schedule_p=(0.2, 0.35, 0.45), temp_degf=0.1, glucose_mmol=0.6, extra_gaps=2, utc_offset_minutes=0
            ),
            follow_up_days=180.0,
            hazard_shift=-0.5,
            relative_size=0.35,
        ),
    )
}

SITE_NAMES: tuple[str, ...] = tuple(SITES)


def get_site(name: str | Site | None) -> Site | None:
    """The site called ``name`` (None: no site, the default cohort); an unknown name raises listing the known ones."""
    if name is None or isinstance(name, Site):
        return name
    try:
        return SITES[name]
    except KeyError:
        raise ValueError(f"unknown synthetic site {name!r}; known sites: {', '.join(SITE_NAMES)}") from None
