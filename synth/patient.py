"""One synthetic patient: identity, latent risk factors, outcome, anatomy and vitals, all from (seed, index).

Every aspect draws from its own random stream ``default_rng([seed, index, STREAM])``, so a patient is the
same whatever cohort size it is generated in, and changing one aspect's draws leaves the others intact.
Rendering is lazy: ``render_image`` samples the patient's head on any acquisition grid.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace
from datetime import UTC, date, datetime, timedelta

import numpy as np

from inference import contract as C
from inference.preprocess import Volume
from synth import outcome, render, vitals
from synth.findings import FindingGeometry, finding_fractions, finding_labels, place_findings
from synth.outcome import ImageFindings, VitalTraits
from synth.sites import Site, get_site
from synth.tissue import Appearance, draw_appearance

STREAM_DEMOGRAPHICS, STREAM_IMAGE, STREAM_VITALS, STREAM_OUTCOME = 1, 2, 3, 4
STREAM_GEOMETRY, STREAM_APPEARANCE, STREAM_RECORD, STREAM_NOISE, STREAM_ORACLE = 5, 6, 7, 8, 9
STREAM_DROPOUT, STREAM_IDENTITY = 10, 11

MR_FRACTION = 0.2
#: Window end used when a caller gives none (the FHIR and DICOM writers accept another).
DEFAULT_WINDOW_END = datetime(2025, 6, 2, 9, 0, tzinfo=UTC)
SLICE_MM = 5.0
DICOM_SIZE, DICOM_PIXEL_MM = 256, 0.9
#: The training-array path renders a coarser grid over the same field of view (contract grid is 3.5 mm).
ARRAY_SIZE, ARRAY_PIXEL_MM = 80, 2.88

_GIVEN = ("Alex", "Sam", "Robin", "Kim", "Jo", "Lee", "Noor", "Mika", "Rene", "Toni", "Ari", "Eli", "Sasha", "Dana")
_FAMILY = ("Testpatient", "Synthdata", "Example", "Phantom", "Sample", "Dummy", "Fictive", "Modelcase", "Mock")


@dataclass(frozen=True)
class SynthPatient:
    seed: int
    index: int
    mrn: str
    given_name: str
    family_name: str
    sex: str  # "male" | "female"
    age_years: float  # at the window end
    modality: str  # "CT" | "MR"
    findings: ImageFindings  # scalar fields
    geometry: FindingGeometry
    traits: VitalTraits  # scalar fields
    vitals: vitals.VitalsRecord
    true_probability: float
    image_only_probability: float
    vitals_only_probability: float
    outcome: int
    pose: render.HeadPose
    look: Appearance
    skull_mm: float
    scalp_mm: float
    scan_centre: np.ndarray  # LPS mm, centre of the acquired volume
    n_slices: int
    instance_order: str  # "ascending" | "descending" | "shuffled": InstanceNumber vs position
    has_scout: bool = True  # CT: the study also holds a localizer series
    window_end: datetime = DEFAULT_WINDOW_END
    site: str | None = None  # the synthetic centre (``synth.sites``), None for the default cohort
    follow_up_days: float = C.HORIZON_DAYS  # how long this patient's centre followed them for the outcome

    @property
    def stream_suffix(self) -> tuple[int, ...]:
        """Appended to every random stream's seed: () for the default cohort, (site.key,) at a site."""
        site = get_site(self.site)
        return () if site is None else (site.key,)

    @property
    def patient_id(self) -> str:
        return self.mrn

    def birth_date(self, window_end: datetime | None = None) -> date:
        end = window_end or self.window_end
        return (end - timedelta(days=self.age_years * 365.25)).date()

    def acquisition(self, *, for_arrays: bool) -> render.Acquisition:
        size, pixel = (ARRAY_SIZE, ARRAY_PIXEL_MM) if for_arrays else (DICOM_SIZE, DICOM_PIXEL_MM)
        return render.Acquisition(self.scan_centre, self.n_slices, SLICE_MM, size, pixel)

    def render_image(self, acquisition: render.Acquisition) -> Volume:
        """The image volume (HU for CT, FLAIR-like signal for MR) sampled on ``acquisition``."""
        noise = np.random.default_rng([self.seed, self.index, STREAM_NOISE, acquisition.size, *self.stream_suffix])
        return render.render(acquisition, self.pose, self.geometry, self.look, self.skull_mm, self.scalp_mm, noise)

    def finding_mask(self, threshold: float = 0.3) -> np.ndarray:
        """(D, H, W) bool on the contract grid (centred like the image tensor): voxels holding a planted finding."""
        return self.finding_label(threshold) > 0

    def finding_label(self, threshold: float = 0.3) -> np.ndarray:
        """(D, H, W) uint8 on the contract grid: 0 none, else 1 + index in ``findings.FINDING_KINDS``.

        A voxel is labelled where a finding fills >= ``threshold`` of it, with the kind that fills most.
        """
        d, h, w = C.VOLUME_SHAPE
        sz, sy, sx = C.VOLUME_SPACING_MM
        assert sy == sx, "contract grid is square in-plane"
        grid = render.Acquisition(self.scan_centre, d, sz, h, sy)  # == preprocess.contract_grid_points(centre)
        frac = finding_fractions(render.template_grid(grid, self.pose), self.geometry, edge_mm=sy)
        return finding_labels(frac, threshold).reshape(d, h, w)

    def findings_summary(self) -> str:
        parts = []
        f, g = self.findings, self.geometry
        if f.lacunes:
            parts.append(f"lacunes={int(f.lacunes)}")
        if f.wmd_grade:
            parts.append(f"wmd_grade={int(f.wmd_grade)}")
        if g.infarct is not None:
            parts.append(f"old_infarct={g.infarct.territory}-{g.infarct.side}")
        if g.hyperdense_side:
            parts.append(f"hyperdense_mca={g.hyperdense_side}")
        t = self.traits
        if t.af:
            parts.append("af=" + ("paroxysmal" if t.af == 1 else "persistent"))
        if outcome.lability_z(np.asarray(t.lability)) > 1.0:
            parts.append(f"labile_bp_sd={float(t.lability):.0f}")
        if t.trend > 1.5:
            parts.append(f"rising_bp={float(t.trend):.1f}/wk")
        if t.glucose > 140:
            parts.append(f"hyperglycaemia={float(t.glucose):.0f}")
        return ";".join(parts) or "none"


def stream_rng(seed: int, index: int, stream: int, site: Site | None = None) -> np.random.Generator:
    """The random stream ``stream`` of patient ``index`` of cohort ``seed`` (at ``site``: its own streams)."""
    return np.random.default_rng([seed, index, stream] if site is None else [seed, index, stream, site.key])


def generate_patient(seed: int, index: int, site: str | Site | None = None) -> SynthPatient:
    """The patient ``index`` of the cohort ``seed``: deterministic, independent of cohort size.

    ``site``: a synthetic centre's name (``synth.sites.SITES``); None is the default cohort, unchanged by sites.
    """
    st = get_site(site)
    pop = outcome.DEFAULT_POPULATION if st is None else st.population

    def _rng(seed: int, index: int, stream: int) -> np.random.Generator:
        return stream_rng(seed, index, stream, st)

    age, male = outcome.draw_demographics(_rng(seed, index, STREAM_DEMOGRAPHICS), (), pop)
    age_a, male_a = np.asarray(age), np.asarray(male)
    img_rng = _rng(seed, index, STREAM_IMAGE)
    findings = outcome.draw_image_findings(img_rng, age_a, pop)
    modality = "MR" if img_rng.random() < (MR_FRACTION if st is None else st.mr_fraction) else "CT"
    traits = outcome.draw_vital_traits(_rng(seed, index, STREAM_VITALS), age_a, male_a, pop)
    p_true = outcome.true_probability(age_a, male_a, findings, traits, pop.logit_shift)
    p_img, p_vit = outcome.single_modality_oracles(
        age_a, male_a, findings, traits, _rng(seed, index, STREAM_ORACLE), pop=pop
    )
    y = int(_rng(seed, index, STREAM_OUTCOME).random() < p_true)

    geo_rng = _rng(seed, index, STREAM_GEOMETRY)
    geometry = place_findings(geo_rng, findings)
    pose = render.draw_pose(geo_rng)
    scan_centre = pose.centre + np.array([geo_rng.normal(0, 3), geo_rng.normal(0, 3), geo_rng.normal(0, 6)])
    look_rng = _rng(seed, index, STREAM_APPEARANCE)
    look = draw_appearance(look_rng, modality)
    if st is not None:  # the site's scanners: a factor on the drawn noise (drawn first, so look_rng is unchanged)
        look = replace(look, noise=look.noise * (st.mr_noise_factor if modality == "MR" else st.ct_noise_factor))
    id_rng = _rng(seed, index, STREAM_IDENTITY)
    charting = vitals.DEFAULT_CHARTING if st is None else st.charting
    return SynthPatient(
        seed=seed,
        index=index,
        mrn=f"SW{seed}-{index:06d}" if st is None else f"SW{st.code}{seed}-{index:06d}",
        given_name=str(id_rng.choice(_GIVEN)),
        family_name=str(id_rng.choice(_FAMILY)),
        sex="male" if male else "female",
        age_years=float(age),
        modality=modality,
        findings=findings,
        geometry=geometry,
        traits=traits,
        vitals=vitals.generate_vitals(_rng(seed, index, STREAM_RECORD), traits, charting),
        true_probability=p_true,
        image_only_probability=float(p_img[0]),
        vitals_only_probability=float(p_vit[0]),
        outcome=y,
        pose=pose,
        look=look,
        skull_mm=float(look_rng.uniform(5, 8)),
        scalp_mm=float(look_rng.uniform(4, 7)),
        scan_centre=scan_centre,
        n_slices=int(id_rng.integers(32, 37)),
        instance_order=str(id_rng.choice(["ascending", "descending", "shuffled"], p=[0.6, 0.25, 0.15])),
        has_scout=bool(id_rng.random() < 0.7),
        site=None if st is None else st.name,
        follow_up_days=float(C.HORIZON_DAYS) if st is None else st.follow_up_days,
    )


def iter_cohort(n: int, seed: int, site: str | Site | None = None) -> Iterator[SynthPatient]:
    st = get_site(site)
    for i in range(n):
        yield generate_patient(seed, i, st)
