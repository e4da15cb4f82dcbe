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
from synth import anatomy
from synth.findings import FindingGeometry
from synth.tissue import Appearance, compose, tissue_fractions

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
    q = template_grid(acq, pose)
    head = np.flatnonzero(anatomy.sdist_lower_bound(q) < skull_mm + scalp_mm + 0.5)  # the rest is pure air
    signal = np.full(q.shape[0], look.air, dtype=np.float32)
    signal[head] = compose(tissue_fractions(q[head], findings, skull_mm, scalp_mm), look, skull_mm)
    sd = look.noise * CT_NOISE_REF_PIXEL_MM / acq.pixel_mm  # same noise after averaging to any grid
    if look.modality == "CT":
        signal += noise_rng.standard_normal(signal.shape, dtype=np.float32) * sd
    else:
        k, i, j = (ax - c for ax, c in zip(acq.axes(), acq.centre[::-1], strict=True))
        bias = 1.0 + look.bias[2] * k[:, None, None] + look.bias[1] * i[None, :, None] + look.bias[0] * j[None, None, :]
        signal *= bias.astype(np.float32).reshape(-1)
        n1 = noise_rng.standard_normal(signal.shape, dtype=np.float32) * sd
        n2 = noise_rng.standard_normal(signal.shape, dtype=np.float32) * sd
        signal = np.sqrt((signal + n1) ** 2 + n2**2)  # Rician magnitude noise
    return Volume(
        voxels=signal.reshape(shape),
        origin=acq.origin(),
        row_dir=np.array([1.0, 0.0, 0.0]),
        col_dir=np.array([0.0, 1.0, 0.0]),
        normal=np.array([0.0, 0.0, 1.0]),
        spacing=(acq.slice_mm, acq.pixel_mm, acq.pixel_mm),
    )
