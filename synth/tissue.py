"""Tissue fractions at template points and the tissue values that turn them into CT or MR signal.

Each point gets fractions of air, scalp, bone, CSF, grey and white matter that sum to one (partial volume),
with findings planted: infarct cores replace brain with fluid (a gliotic rim around them), white-matter
disease replaces white matter, M1 vessels (one thrombosed for the hyperdense sign) displace what is there.
Skull and scalp are shells at ``skull_mm``/``scalp_mm`` outside the template's intracranial boundary.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from synth import anatomy
from synth.findings import FindingGeometry, Points, ball_fraction, ramp, vessel_fractions


@dataclass(frozen=True)
class TissueFractions:
    """Per-point fractions (P,) that sum to one."""

    air: np.ndarray
    scalp: np.ndarray
    bone: np.ndarray
    bone_depth: np.ndarray  # mm into the skull from its inner surface
    csf: np.ndarray
    gm: np.ndarray
    wm: np.ndarray
    wmd: np.ndarray  # white matter with small-vessel disease
    lesion: np.ndarray  # cavitated infarct (lacune or territorial)
    rim: np.ndarray  # gliotic rim around infarcts (bright on FLAIR)
    vessel: np.ndarray  # normal M1 segment (blood)
    clot: np.ndarray  # hyperdense (thrombosed) M1 segment


def tissue_fractions(q: np.ndarray, findings: FindingGeometry, skull_mm: float, scalp_mm: float) -> TissueFractions:
    """Template points q (P, 3) -> tissue fractions with the patient's findings planted."""
    need_pv = findings.wmd_radius > 0
    maps = anatomy.sample_maps(anatomy.load_template(), q, slice(0, 4) if need_pv else slice(0, 3))
    gm, wm, sdist = np.clip(maps[:, 0], 0, 1), np.clip(maps[:, 1], 0, 1), maps[:, 2]
    outside = ramp(sdist)
    icv = 1.0 - outside
    scale = np.minimum(1.0, icv / np.maximum(gm + wm, 1e-6))  # brain never exceeds the intracranial space
    gm, wm = gm * scale, wm * scale
    csf = icv - gm - wm
    beyond_bone = ramp(sdist - skull_mm)
    air = ramp(sdist - skull_mm - scalp_mm)
    bone, scalp = outside - beyond_bone, beyond_bone - air

    pts = Points(q)
    lesion, rim = np.zeros_like(gm), np.zeros_like(gm)
    for ball in findings.balls():
        idx = pts.near(ball.centre - ball.radius - 3.5, ball.centre + ball.radius + 3.5)
        qs = q[idx]
        core = ball_fraction(qs, ball)
        shell = ball_fraction(qs, ball, grow=2.0) - core
        if ball.territory:
            inside = anatomy.territory(qs, ball.territory, ball.side or "R")
            core, shell = core * inside, shell * inside
        lesion[idx] = np.maximum(lesion[idx], core)
        rim[idx] = np.maximum(rim[idx], shell)
    rim = np.minimum(rim, 1 - lesion)
    brain = gm + wm
    lesion_frac, rim_frac = brain * lesion, brain * rim
    keep = 1 - lesion - rim
    gm, wm = gm * keep, wm * keep

    wmd = np.zeros_like(wm)
    if need_pv:
        patchy = 0.75 + 0.25 * np.sin(q[:, 0] * 0.35) * np.sin(q[:, 1] * 0.3 + 1.0)
        wmd = wm * ramp(findings.wmd_radius - maps[:, 3], 3.0) * patchy
        wm = wm - wmd

    vessel, clot = np.zeros_like(gm), np.zeros_like(gm)
    for side, (idx, frac) in vessel_fractions(pts, findings.hyperdense_side).items():
        (clot if findings.hyperdense_side == side else vessel)[idx] = frac * icv[idx]
    rest = 1 - vessel - clot  # vessels displace whatever else is inside the skull there
    csf, gm, wm, wmd, lesion_frac, rim_frac = (x * rest for x in (csf, gm, wm, wmd, lesion_frac, rim_frac))
    return TissueFractions(
        air, scalp, bone, np.clip(sdist, 0, None), csf, gm, wm, wmd, lesion_frac, rim_frac, vessel, clot
    )


@dataclass(frozen=True)
class Appearance:
    """Tissue values: HU for CT, arbitrary FLAIR-like signal for MR."""

    modality: str
    csf: float
    gm: float
    wm: float
    wmd: float
    lesion: float
    rim: float
    vessel: float
    clot: float
    bone_outer: float
    bone_diploe: float
    scalp: float
    air: float
    noise: float  # CT: HU SD at the reference voxel; MR: Rician SD
    bias: np.ndarray  # MR: (3,) linear bias-field gradient per mm; zeros for CT


def draw_appearance(rng: np.random.Generator, modality: str) -> Appearance:
    if modality == "CT":
        wm = rng.uniform(25, 31)
        return Appearance(
            "CT",
            csf=rng.uniform(2, 12),
            gm=rng.uniform(36, 44),
            wm=wm,
            wmd=wm - rng.uniform(7, 11),
            lesion=rng.uniform(6, 14),
            rim=wm - 4,
            vessel=rng.uniform(38, 45),
            clot=rng.uniform(65, 85),
            bone_outer=rng.uniform(1300, 1500),
            bone_diploe=rng.uniform(650, 850),
            scalp=rng.uniform(10, 40),
            air=-1000.0,
            noise=rng.uniform(4.0, 6.0),
            bias=np.zeros(3),
        )
    wm = rng.uniform(380, 430)
    return Appearance(
        "MR",
        csf=rng.uniform(40, 80),
        gm=wm * rng.uniform(1.25, 1.4),
        wm=wm,
        wmd=wm * rng.uniform(1.8, 2.1),
        lesion=rng.uniform(60, 110),
        rim=wm * 1.9,
        vessel=rng.uniform(20, 60),
        clot=wm * rng.uniform(2.0, 2.3),
        bone_outer=20.0,
        bone_diploe=rng.uniform(150, 300),
        scalp=rng.uniform(550, 750),
        air=0.0,
        noise=rng.uniform(10, 18),
        bias=rng.normal(0, 0.0015, 3),
    )


def compose(fr: TissueFractions, look: Appearance, skull_mm: float) -> np.ndarray:
    """Fractions -> noiseless signal per point (P,)."""
    depth = (fr.bone_depth - skull_mm / 2) / (skull_mm / 4)
    bone = look.bone_outer - (look.bone_outer - look.bone_diploe) * np.exp(-(depth**2))
    return (
        fr.air * look.air
        + fr.scalp * look.scalp
        + fr.bone * bone
        + fr.csf * look.csf
        + fr.gm * look.gm
        + fr.wm * look.wm
        + fr.wmd * look.wmd
        + fr.lesion * look.lesion
        + fr.rim * look.rim
        + fr.vessel * look.vessel
        + fr.clot * look.clot
    ).astype(np.float32)
