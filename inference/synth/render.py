"""Render one patient's head on any acquisition grid: deformed template, tissue values, findings, noise.

The patient's anatomy is a continuous function of position: each world point (DICOM LPS, mm) is pulled back
into template space by the patient's affine (rotation, anisotropic scale, position in the scanner) plus a
smooth elastic warp (three random sinusoidal modes per axis, amplitude ~1.5 mm, wavelength 60-140 mm).
Findings live in template space, so they deform with the head. Any grid (the small one used for training
arrays, the 256x256 one written as DICOM) samples the same function, so both paths agree up to noise and
resolution. Partial volume comes from mixing tissue fractions, never from picking one label per voxel.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from inference.preprocess import Volume
from inference.synth import anatomy

LPS_TO_RAS = np.array([-1.0, -1.0, 1.0])
#: Template point placed at the patient's head centre (roughly the centre of the brain, MNI mm).
TEMPLATE_HEAD_CENTRE = np.array([0.0, -18.0, 5.0])
#: CT noise SD (HU) for a 0.9 mm x 0.9 mm x 5 mm voxel; scaled by 0.9 / pixel size for other grids.
CT_NOISE_REF_PIXEL_MM = 0.9


@dataclass(frozen=True)
class Acquisition:
    """An axial acquisition grid: ``n_slices`` at ``slice_mm``, ``size``x``size`` pixels of ``pixel_mm``."""

    centre: np.ndarray  # (3,) LPS mm, centre of the acquired volume
    n_slices: int
    slice_mm: float
    size: int
    pixel_mm: float

    def origin(self) -> np.ndarray:
        half = np.array(
            [(self.size - 1) * self.pixel_mm, (self.size - 1) * self.pixel_mm, (self.n_slices - 1) * self.slice_mm]
        )
        return self.centre - half / 2

    def axes(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """World coordinates along each axis: slices (z), rows (y, posterior), columns (x, patient left)."""
        o = self.origin()
        k = o[2] + np.arange(self.n_slices) * self.slice_mm
        i = o[1] + np.arange(self.size) * self.pixel_mm
        j = o[0] + np.arange(self.size) * self.pixel_mm
        return k, i, j

    def points(self) -> np.ndarray:
        """World (LPS) coordinates of every voxel, (n_slices, size, size, 3) with axes (k, row i, col j)."""
        k, i, j = self.axes()
        zz, yy, xx = np.meshgrid(k, i, j, indexing="ij")
        return np.stack([xx, yy, zz], axis=-1)


def _interp_matrix(n_fine: int, n_coarse: int) -> np.ndarray:
    """(n_fine, n_coarse) linear interpolation weights, coarse nodes spanning the fine axis end to end."""
    pos = np.linspace(0, n_coarse - 1, n_fine)
    lo = np.minimum(pos.astype(int), n_coarse - 2)
    w = np.zeros((n_fine, n_coarse))
    w[np.arange(n_fine), lo] = 1 - (pos - lo)
    w[np.arange(n_fine), lo + 1] = pos - lo
    return w


#: In-plane spacing (mm) of the lattice on which the (smooth) world->template map is evaluated exactly.
MAP_LATTICE_MM = 16.0


@dataclass(frozen=True)
class HeadPose:
    rotation: np.ndarray  # (3, 3) RAS rotation of the head in the scanner
    scale: np.ndarray  # (3,) per-axis head size factor
    centre: np.ndarray  # (3,) LPS position of the head centre in the scanner
    warp_k: np.ndarray  # (3 axes, 3 modes, 3) spatial frequencies, rad/mm
    warp_amp: np.ndarray  # (3, 3) mm
    warp_phase: np.ndarray  # (3, 3) rad

    def to_template(self, lps: np.ndarray) -> np.ndarray:
        """World LPS points (P, 3) -> template RAS points (P, 3)."""
        q = ((lps - self.centre) * LPS_TO_RAS) @ self.rotation / self.scale  # inverse of p = R (S q)
        warp = np.empty_like(q)
        for axis in range(3):
            warp[:, axis] = (self.warp_amp[axis] * np.sin(q @ self.warp_k[axis].T + self.warp_phase[axis])).sum(-1)
        return q + warp + TEMPLATE_HEAD_CENTRE


def template_grid(acq: Acquisition, pose: HeadPose) -> np.ndarray:
    """Template coordinates of every voxel of ``acq``, (n_slices * size * size, 3).

    The map is smooth (affine + warps of wavelength >= 60 mm), so it is evaluated exactly on a coarse
    in-plane lattice and interpolated linearly in between: error < 0.05 mm, ~50x fewer sines.
    """
    k, i, j = acq.axes()
    n = max(2, int(np.ceil((acq.size - 1) * acq.pixel_mm / MAP_LATTICE_MM)) + 1)
    ic, jc = np.linspace(i[0], i[-1], n), np.linspace(j[0], j[-1], n)
    zz, yy, xx = np.meshgrid(k, ic, jc, indexing="ij")
    coarse = pose.to_template(np.stack([xx, yy, zz], -1).reshape(-1, 3)).reshape(len(k), n, n, 3)
    w = _interp_matrix(acq.size, n).astype(np.float32)  # (size, n)
    kk = len(k)
    rows = w @ coarse.astype(np.float32).reshape(kk, n, n * 3)  # (K, size, n*3)
    cols = rows.reshape(kk, acq.size, n, 3).transpose(0, 1, 3, 2) @ w.T  # (K, size, 3, size)
    return np.ascontiguousarray(cols.transpose(0, 1, 3, 2)).reshape(-1, 3)


def draw_pose(rng: np.random.Generator) -> HeadPose:
    yaw, pitch, roll = np.radians(rng.normal(0, [4.0, 7.0, 3.0]))
    cz, sz, cx, sx, cy, sy = np.cos(yaw), np.sin(yaw), np.cos(pitch), np.sin(pitch), np.cos(roll), np.sin(roll)
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    scale = np.exp(rng.normal(0, 0.04, 3) + rng.normal(0, 0.03))  # common size + anisotropy
    centre = np.array([rng.normal(0, 4), rng.normal(10, 6), rng.uniform(-140, -60)])
    wavelength = rng.uniform(60, 140, (3, 3))
    direction = rng.standard_normal((3, 3, 3))
    direction /= np.linalg.norm(direction, axis=-1, keepdims=True)
    k = direction * (2 * np.pi / wavelength)[..., None]
    return HeadPose(rz @ rx @ ry, scale, centre, k, rng.normal(0, 1.0, (3, 3)), rng.uniform(0, 2 * np.pi, (3, 3)))


@dataclass(frozen=True)
class Lesion:
    """A ball in template space, optionally clipped to a vascular territory."""

    centre: np.ndarray  # RAS mm
    radius: float
    territory: str | None = None
    side: str | None = None


@dataclass(frozen=True)
class FindingGeometry:
    lacunes: tuple[Lesion, ...]
    wmd_radius: float  # mm from the ventricles that white-matter disease reaches (0: none)
    infarct: Lesion | None  # old territorial infarct
    hyperdense_side: str | None  # side of the hyperdense MCA (M1) sign


def _ramp(x: np.ndarray, width: float = 1.0) -> np.ndarray:
    return np.clip(x / width + 0.5, 0.0, 1.0)


def _ball(q: np.ndarray, lesion: Lesion, edge: float = 1.5) -> np.ndarray:
    return _ramp(lesion.radius - np.linalg.norm(q - lesion.centre, axis=-1), edge)


def _near(q: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Indices of points inside the axis-aligned box [lo, hi] (findings are local: skip the rest)."""
    return np.flatnonzero(np.all((q >= lo) & (q <= hi), axis=1))


def _segment_distance(q: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    ab = b - a
    t = np.clip(((q - a) @ ab) / (ab @ ab), 0, 1)
    return np.linalg.norm(q - (a + t[:, None] * ab), axis=-1)


#: M1 segment of the middle cerebral artery (ICA terminus -> bifurcation), right side, MNI mm.
M1_RIGHT = (np.array([12.0, 2.0, -16.0]), np.array([42.0, 6.0, -8.0]))
VESSEL_RADIUS_MM = 2.2


def m1_segment(side: str) -> tuple[np.ndarray, np.ndarray]:
    flip = np.array([-1.0, 1.0, 1.0]) if side == "L" else np.ones(3)
    return M1_RIGHT[0] * flip, M1_RIGHT[1] * flip


@dataclass(frozen=True)
class TissueFractions:
    """Per-voxel fractions (P,) that sum to one, plus the finding fraction used for masks."""

    air: np.ndarray
    scalp: np.ndarray
    bone: np.ndarray
    bone_depth: np.ndarray  # mm into the skull from its inner surface
    csf: np.ndarray
    gm: np.ndarray
    wm: np.ndarray
    wmd: np.ndarray  # white matter with small-vessel disease
    lesion: np.ndarray  # cavitated infarct (lacune or territorial)
    rim: np.ndarray  # gliotic rim around infarcts (part of gm/wm, bright on FLAIR)
    vessel: np.ndarray  # normal M1 segments (blood)
    clot: np.ndarray  # hyperdense (thrombosed) M1 segment


def tissue_fractions(q: np.ndarray, findings: FindingGeometry, skull_mm: float, scalp_mm: float) -> TissueFractions:
    """Template points q (P, 3) -> tissue fractions with the patient's findings planted."""
    tpl = anatomy.load_template()
    need_pv = findings.wmd_radius > 0
    maps = anatomy.sample_maps(tpl, q, slice(0, 4) if need_pv else slice(0, 3))
    gm, wm, sdist = np.clip(maps[:, 0], 0, 1), np.clip(maps[:, 1], 0, 1), maps[:, 2]
    outside = _ramp(sdist)
    icv = 1.0 - outside
    scale = np.minimum(1.0, icv / np.maximum(gm + wm, 1e-6))  # brain never exceeds the intracranial space
    gm, wm = gm * scale, wm * scale
    csf = icv - gm - wm
    bone = outside - _ramp(sdist - skull_mm)
    scalp = _ramp(sdist - skull_mm) - _ramp(sdist - skull_mm - scalp_mm)
    air = _ramp(sdist - skull_mm - scalp_mm)

    lesion = np.zeros_like(gm)
    rim = np.zeros_like(gm)
    balls = list(findings.lacunes) + ([findings.infarct] if findings.infarct else [])
    for ball in balls:
        idx = _near(q, ball.centre - ball.radius - 3.5, ball.centre + ball.radius + 3.5)
        qs = q[idx]
        core = _ball(qs, ball)
        shell = _ball(qs, Lesion(ball.centre, ball.radius + 2.0)) - core
        if ball.territory:
            inside = anatomy.territory(qs, ball.territory, ball.side or "R").astype(np.float32)
            core, shell = core * inside, shell * inside
        lesion[idx] = np.maximum(lesion[idx], core)
        rim[idx] = np.maximum(rim[idx], shell)
    brain = gm + wm
    lesion_frac = brain * lesion
    rim_frac = brain * np.minimum(rim, 1 - lesion)
    keep = 1 - lesion - np.minimum(rim, 1 - lesion)
    gm, wm = gm * keep, wm * keep

    wmd = np.zeros_like(wm)
    if need_pv:
        reach = _ramp(findings.wmd_radius - maps[:, 3], 3.0)
        patchy = 0.75 + 0.25 * np.sin(q[:, 0] * 0.35) * np.sin(q[:, 1] * 0.3 + 1.0)
        wmd = wm * reach * patchy
        wm = wm - wmd

    vessel = np.zeros_like(gm)
    clot = np.zeros_like(gm)
    for side in ("L", "R"):
        a, b = m1_segment(side)
        idx = _near(q, np.minimum(a, b) - 4, np.maximum(a, b) + 4)
        v = _ramp(VESSEL_RADIUS_MM - _segment_distance(q[idx], a, b), 0.8) * icv[idx]
        (clot if findings.hyperdense_side == side else vessel)[idx] = v
    # Vessels displace whatever else is inside the skull at that point.
    rest = 1 - vessel - clot
    csf, gm, wm, wmd, lesion_frac, rim_frac = (x * rest for x in (csf, gm, wm, wmd, lesion_frac, rim_frac))
    return TissueFractions(
        air, scalp, bone, np.clip(sdist, 0, None), csf, gm, wm, wmd, lesion_frac, rim_frac, vessel, clot
    )


def finding_fraction(q: np.ndarray, findings: FindingGeometry, edge_mm: float) -> np.ndarray:
    """How much of each point's neighbourhood (``edge_mm`` ~ voxel size) is a planted risk finding, 0..1."""
    out = np.zeros(len(q), dtype=np.float32)
    balls = list(findings.lacunes) + ([findings.infarct] if findings.infarct else [])
    for ball in balls:
        idx = _near(q, ball.centre - ball.radius - edge_mm, ball.centre + ball.radius + edge_mm)
        core = _ball(q[idx], ball, edge_mm)
        if ball.territory:
            core = core * anatomy.territory(q[idx], ball.territory, ball.side or "R")
        out[idx] = np.maximum(out[idx], core)
    if findings.hyperdense_side:
        a, b = m1_segment(findings.hyperdense_side)
        idx = _near(q, np.minimum(a, b) - 2 * edge_mm, np.maximum(a, b) + 2 * edge_mm)
        out[idx] = np.maximum(out[idx], _ramp(VESSEL_RADIUS_MM - _segment_distance(q[idx], a, b), edge_mm))
    if findings.wmd_radius > 0:
        idx = _near(q, np.array([-45.0, -70.0, -15.0]), np.array([45.0, 50.0, 50.0]))  # around the ventricles
        m = anatomy.sample_maps(anatomy.load_template(), q[idx], slice(1, 4))  # wm, sdist, pvdist
        wmd = m[:, 0] * _ramp(findings.wmd_radius - m[:, 2], edge_mm)
        out[idx] = np.maximum(out[idx], wmd)
    return out


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


def render(
    acq: Acquisition,
    pose: HeadPose,
    findings: FindingGeometry,
    look: Appearance,
    skull_mm: float,
    scalp_mm: float,
    noise_rng: np.random.Generator,
) -> Volume:
    """The image volume (HU for CT, FLAIR-like signal for MR) on the acquisition grid."""
    shape = (acq.n_slices, acq.size, acq.size)
    fr = tissue_fractions(template_grid(acq, pose), findings, skull_mm, scalp_mm)
    signal = compose(fr, look, skull_mm)
    if look.modality == "CT":
        signal += noise_rng.standard_normal(signal.shape, dtype=np.float32) * (
            look.noise * CT_NOISE_REF_PIXEL_MM / acq.pixel_mm
        )
    else:
        k, i, j = (ax - c for ax, c in zip(acq.axes(), acq.centre[::-1], strict=True))
        bias = 1.0 + look.bias[2] * k[:, None, None] + look.bias[1] * i[None, :, None] + look.bias[0] * j[None, None, :]
        signal *= bias.astype(np.float32).reshape(-1)
        sd = look.noise * CT_NOISE_REF_PIXEL_MM / acq.pixel_mm
        n1 = noise_rng.standard_normal(signal.shape, dtype=np.float32) * sd
        n2 = noise_rng.standard_normal(signal.shape, dtype=np.float32) * sd
        signal = np.sqrt((signal + n1) ** 2 + n2**2)  # Rician magnitude noise
    geom = {
        "origin": acq.origin(),
        "row_dir": np.array([1.0, 0.0, 0.0]),
        "col_dir": np.array([0.0, 1.0, 0.0]),
        "normal": np.array([0.0, 0.0, 1.0]),
        "spacing": (acq.slice_mm, acq.pixel_mm, acq.pixel_mm),
    }
    return Volume(voxels=signal.reshape(shape), **geom)
