"""Where a patient's planted findings sit in template space, and how much of each point they occupy.

* Lacunes: balls of 5-14 mm diameter in the deep grey/white matter (basal ganglia, thalamus, internal
  capsule, corona radiata): points with grey+white fraction > 0.85, >= 18 mm inside the intracranial
  boundary and >= 4 mm from the ventricles, |x| 8-32 mm.
* White-matter disease: white matter within ``wmd_radius`` of the lateral ventricles (grade 1: 3-5 mm,
  2: 6-9 mm, 3: 10-14 mm), patchy.
* Old territorial infarct: a ball of radius 14-26 mm centred in the brain of one vascular territory
  (MCA 70%, ACA 15%, PCA 15%) and clipped to it (``anatomy.territory``, a geometric approximation).
* Hyperdense MCA sign: a thrombosed M1 segment (a 4.4 mm-wide cylinder) on one side; the other M1 is a
  normal vessel.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from synth import anatomy
from synth.outcome import ImageFindings


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

    def balls(self) -> list[Lesion]:
        return [*self.lacunes, *([self.infarct] if self.infarct else [])]


#: M1 segment of the middle cerebral artery (ICA terminus -> bifurcation), right side, MNI mm.
M1_RIGHT = (np.array([12.0, 2.0, -16.0]), np.array([42.0, 6.0, -8.0]))
VESSEL_RADIUS_MM = 2.2


def m1_segment(side: str) -> tuple[np.ndarray, np.ndarray]:
    flip = np.array([-1.0, 1.0, 1.0]) if side == "L" else np.ones(3)
    return M1_RIGHT[0] * flip, M1_RIGHT[1] * flip


def ramp(x: np.ndarray, width: float = 1.0) -> np.ndarray:
    """0 below -width/2, 1 above +width/2, linear in between: a partial-volume edge."""
    return np.clip(x / width + 0.5, 0.0, 1.0)


def ball_fraction(q: np.ndarray, lesion: Lesion, edge: float = 1.5, grow: float = 0.0) -> np.ndarray:
    return ramp(lesion.radius + grow - np.linalg.norm(q - lesion.centre, axis=-1), edge)


def segment_distance(q: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    ab = b - a
    t = np.clip(((q - a) @ ab) / (ab @ ab), 0, 1)
    return np.linalg.norm(q - (a + t[:, None] * ab), axis=-1)


class Points:
    """Template points (P, 3) with contiguous coordinate columns, for fast box queries."""

    def __init__(self, q: np.ndarray) -> None:
        self.q = q
        self.cols = tuple(np.ascontiguousarray(q[:, a]) for a in range(3))

    def near(self, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
        """Indices of points inside the box [lo, hi] (findings are local: everything else is skipped)."""
        x = self.cols[0]
        idx = np.flatnonzero((x >= lo[0]) & (x <= hi[0]))
        for a in (1, 2):
            c = self.cols[a][idx]
            idx = idx[(c >= lo[a]) & (c <= hi[a])]
        return idx


def vessel_fractions(
    pts: Points, hyperdense_side: str | None, edge: float = 0.8
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{side: (indices, fraction)} for both M1 segments."""
    out = {}
    for side in ("L", "R"):
        a, b = m1_segment(side)
        idx = pts.near(np.minimum(a, b) - VESSEL_RADIUS_MM - edge, np.maximum(a, b) + VESSEL_RADIUS_MM + edge)
        out[side] = (idx, ramp(VESSEL_RADIUS_MM - segment_distance(pts.q[idx], a, b), edge))
    return out


#: Kinds of planted finding, in the order of ``finding_fractions`` rows; label maps code kind k as k + 1.
FINDING_KINDS: tuple[str, ...] = ("lacune", "wmd", "infarct", "hyperdense_vessel")


def finding_fractions(q: np.ndarray, findings: FindingGeometry, edge_mm: float) -> np.ndarray:
    """(len(FINDING_KINDS), P): how much of each point's neighbourhood (``edge_mm`` ~ voxel size) each kind fills."""
    pts = Points(q)
    out = np.zeros((len(FINDING_KINDS), len(q)), dtype=np.float32)
    for ball in findings.balls():
        idx = pts.near(ball.centre - ball.radius - edge_mm, ball.centre + ball.radius + edge_mm)
        core = ball_fraction(q[idx], ball, edge_mm)
        row = out[0]
        if ball.territory:
            core = core * anatomy.territory(q[idx], ball.territory, ball.side or "R")
            row = out[2]
        row[idx] = np.maximum(row[idx], core)
    if findings.hyperdense_side:
        idx, frac = vessel_fractions(pts, findings.hyperdense_side, edge_mm)[findings.hyperdense_side]
        out[3, idx] = np.maximum(out[3, idx], frac)
    if findings.wmd_radius > 0:
        idx = pts.near(np.array([-45.0, -70.0, -15.0]), np.array([45.0, 50.0, 50.0]))  # around the ventricles
        m = anatomy.sample_maps(anatomy.load_template(), q[idx], slice(1, 4))  # wm, sdist, pvdist
        out[1, idx] = np.maximum(out[1, idx], m[:, 0] * ramp(findings.wmd_radius - m[:, 2], edge_mm))
    return out


def finding_fraction(q: np.ndarray, findings: FindingGeometry, edge_mm: float) -> np.ndarray:
    """How much of each point's neighbourhood (``edge_mm`` ~ voxel size) is a planted risk finding, 0..1."""
    return finding_fractions(q, findings, edge_mm).max(axis=0)


def finding_labels(fractions: np.ndarray, threshold: float) -> np.ndarray:
    """(P,) uint8: 0 where no kind reaches ``threshold``, else 1 + the kind filling the point most."""
    best = fractions.argmax(axis=0)
    return np.where(fractions.max(axis=0) >= threshold, best + 1, 0).astype(np.uint8)


def place_findings(rng: np.random.Generator, f: ImageFindings) -> FindingGeometry:
    """Turn the risk-relevant findings (counts, grades, flags) into positions and sizes in the template."""
    tpl = anatomy.load_template()

    def deep(pts: np.ndarray, m: np.ndarray) -> np.ndarray:
        return (m[:, 0] + m[:, 1] > 0.85) & (m[:, 2] < -18) & (m[:, 3] > 4)

    lacunes = []
    for _ in range(int(f.lacunes)):
        x_lo, x_hi = (8.0, 32.0) if rng.random() < 0.5 else (-32.0, -8.0)
        c = anatomy.sample_points(rng, tpl, deep, np.array([x_lo, -30.0, -8.0]), np.array([x_hi, 25.0, 35.0]))
        lacunes.append(Lesion(c, float(rng.uniform(2.5, 7.0))))
    wmd_radius = (0.0, rng.uniform(3, 5), rng.uniform(6, 9), rng.uniform(10, 14))[int(f.wmd_grade)]
    infarct = None
    if f.territorial:
        name = str(rng.choice(anatomy.TERRITORIES, p=[0.7, 0.15, 0.15]))
        side = "L" if rng.random() < 0.5 else "R"

        def in_territory(pts: np.ndarray, m: np.ndarray) -> np.ndarray:
            return anatomy.territory(pts, name, side) & (m[:, 0] + m[:, 1] > 0.6) & (m[:, 2] < -8)

        lo, hi = np.array([-70.0, -100.0, -30.0]), np.array([70.0, 70.0, 75.0])
        infarct = Lesion(anatomy.sample_points(rng, tpl, in_territory, lo, hi), float(rng.uniform(14, 26)), name, side)
    hdv = ("L" if rng.random() < 0.5 else "R") if f.hyperdense_vessel else None
    return FindingGeometry(tuple(lacunes), float(wmd_radius), infarct, hdv)
