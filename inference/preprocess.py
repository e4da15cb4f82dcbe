"""Turn raw inputs into the model's tensors, exactly as ``inference.contract`` defines them.

Two pure functions families (numpy only, no DICOM or FHIR parsing here):

* images: decoded slices + their DICOM geometry -> a volume on the contract's physical grid;
* vitals: timestamped samples in canonical units -> the regular time grid with masks and deltas.

Training (``synth``, ``modelling.train``) and the engine call the same functions, so what the
model saw in training is what it sees in production.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from inference import contract as C


class PreprocessError(ValueError):
    """Input that cannot be turned into a tensor; ``code`` names the reason for the record."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


# ======================================================================================
# Images
# ======================================================================================


@dataclass(frozen=True)
class Slice:
    """One decoded image plane in physical units (HU for CT after rescale; raw for MR).

    ``pixels`` is (rows, cols). Geometry is DICOM's: ImagePositionPatient (mm, LPS),
    ImageOrientationPatient (row direction cosines, then column direction cosines) and
    PixelSpacing as (spacing between rows, spacing between columns).
    """

    pixels: np.ndarray
    position: tuple[float, float, float]
    orientation: tuple[float, float, float, float, float, float]
    pixel_spacing: tuple[float, float]
    #: Set when ``pixels`` are already block means of the acquired plane (``block_means``, done by a decoder): the
    #: acquired plane's centre, on which the contract grid is centred. ``position`` and ``pixel_spacing`` are then
    #: those of the blocks.
    plane_centre: tuple[float, float, float] | None = None


#: In-plane pixels finer than this are averaged in blocks before resampling (the contract's finest spacing).
BLOCK_TARGET_MM: float = min(C.VOLUME_SPACING_MM)


def block_factors(pixel_spacing: tuple[float, float], rows: int, cols: int,
                  target_mm: float = BLOCK_TARGET_MM) -> tuple[int, int]:
    """(rows, columns) per block for a plane of this spacing: what ``resample_to_contract``'s box filter averages.
    (1, 1) when the plane is too small for one whole block."""
    fr, fc = max(1, int(target_mm // pixel_spacing[0])), max(1, int(target_mm // pixel_spacing[1]))
    return (1, 1) if rows < fr or cols < fc else (fr, fc)


def block_means(plane: np.ndarray, fr: int, fc: int) -> np.ndarray:
    """Means of the whole fr x fc blocks of ``plane`` (any numeric dtype: stored values are summed as float32
    without a full-size float copy), float32, shape (rows // fr, cols // fc).

    Summed as fr strided row slices, then fc strided column slices: element-wise adds, several times faster than a
    reduction over a short inner axis (integer stored values sum exactly in float32 below 2**24)."""
    rows, cols = plane.shape[0] // fr * fr, plane.shape[1] // fc * fc
    p = plane[:rows, :cols]
    acc = np.add(p[0:rows:fr], p[1:rows:fr], dtype=np.float32) if fr > 1 else np.array(p, dtype=np.float32)
    for k in range(2, fr):
        acc += p[k:rows:fr]
    out = np.add(acc[:, 0:cols:fc], acc[:, 1:cols:fc]) if fc > 1 else acc
    for k in range(2, fc):
        out += acc[:, k:cols:fc]
    if fr * fc > 1:
        out *= np.float32(1.0 / (fr * fc))
    return out


def block_geometry(
    position: tuple[float, float, float], orientation: tuple[float, ...], pixel_spacing: tuple[float, float],
    rows: int, cols: int, fr: int, fc: int,
) -> tuple[tuple[float, float, float], tuple[float, float], tuple[float, float, float]]:
    """(position of the first block's centre, the blocks' spacing, the acquired plane's centre)."""
    row_dir, col_dir = np.asarray(orientation[:3], dtype=np.float64), np.asarray(orientation[3:], dtype=np.float64)
    sr, sc = float(pixel_spacing[0]), float(pixel_spacing[1])
    origin = np.asarray(position, dtype=np.float64)
    first = origin + (fr - 1) / 2 * sr * col_dir + (fc - 1) / 2 * sc * row_dir
    centre = origin + (rows - 1) / 2 * sr * col_dir + (cols - 1) / 2 * sc * row_dir
    return (tuple(float(v) for v in first), (sr * fr, sc * fc),  # type: ignore[return-value]
            tuple(float(v) for v in centre))


@dataclass(frozen=True)
class Volume:
    """A stack of parallel slices: voxels[k, i, j] sits at origin + k*dz*normal + i*dr*col + j*dc*row."""

    voxels: np.ndarray  # (n_slices, rows, cols) float32
    origin: np.ndarray  # (3,) position of voxel [0, 0, 0]
    row_dir: np.ndarray  # (3,) direction of increasing column index j
    col_dir: np.ndarray  # (3,) direction of increasing row index i
    normal: np.ndarray  # (3,) direction of increasing slice index k
    spacing: tuple[float, float, float]  # (slice, row, col) mm
    #: The acquired slices' centre where ``voxels`` were reduced from them (``reduced_stack``): the contract grid is
    #: centred on what was acquired, not on the part of it whole blocks cover.
    acquired_centre: np.ndarray | None = None

    @property
    def centre(self) -> np.ndarray:
        if self.acquired_centre is not None:
            return self.acquired_centre
        n, r, c = self.voxels.shape
        dz, dr, dc = self.spacing
        centre: np.ndarray = (
            self.origin
            + (n - 1) / 2 * dz * self.normal
            + (r - 1) / 2 * dr * self.col_dir
            + (c - 1) / 2 * dc * self.row_dir
        )
        return centre


@dataclass(frozen=True)
class _Stacking:
    """Where each slice goes: ``order`` (indices into the slices, along the normal), their positions in that order,
    the axes, and the slice spacing."""

    order: np.ndarray
    positions: np.ndarray
    row_dir: np.ndarray
    col_dir: np.ndarray
    normal: np.ndarray
    dz: float


def _stacking(slices: Sequence[Slice], spacing_tolerance: float) -> _Stacking:
    """The checks and the order of ``stack_slices`` (see there), from the slices' geometry alone."""
    if len(slices) < 2:
        raise PreprocessError("too_few_slices", f"need at least 2 slices, got {len(slices)}")
    first = slices[0]
    orient = np.asarray(first.orientation, dtype=np.float64)
    row_dir, col_dir = orient[:3], orient[3:]
    normal = np.cross(row_dir, col_dir)
    norm = np.linalg.norm(normal)
    if norm < 1e-6:
        raise PreprocessError("bad_geometry", "ImageOrientationPatient rows and columns are parallel")
    normal = normal / norm
    shape = first.pixels.shape
    for s in slices:
        if s.pixels.shape != shape:
            raise PreprocessError("inconsistent_geometry", f"slice sizes differ: {shape} vs {s.pixels.shape}")
        if not np.allclose(s.orientation, first.orientation, atol=1e-3):
            raise PreprocessError("inconsistent_geometry", "slices have different orientations")
        if not np.allclose(s.pixel_spacing, first.pixel_spacing, rtol=1e-3):
            raise PreprocessError("inconsistent_geometry", "slices have different pixel spacing")

    positions = np.asarray([s.position for s in slices], dtype=np.float64)  # (n, 3)
    along = positions @ normal  # (n,)
    order = np.argsort(along, kind="stable")
    along = along[order]
    gaps = np.diff(along)
    if np.any(gaps < 1e-3):
        raise PreprocessError("duplicate_slices", "two or more slices share a position along the normal")
    dz = float(np.median(gaps))
    if np.any(np.abs(gaps - dz) > spacing_tolerance * dz):
        raise PreprocessError(
            "inconsistent_spacing",
            f"slice spacing varies from {gaps.min():.2f} to {gaps.max():.2f} mm (median {dz:.2f} mm)",
        )
    # In-plane drift between slices means gantry tilt or a mixed series; we do not shear-correct.
    drift = positions[order] - positions[order][0] - np.outer(along - along[0], normal)
    if np.abs(drift).max() > 0.5 * max(first.pixel_spacing):
        raise PreprocessError("inconsistent_geometry", "slice positions are not along the slice normal (tilt?)")
    return _Stacking(order, positions[order], row_dir, col_dir, normal, dz)


def stack_slices(slices: Sequence[Slice], *, spacing_tolerance: float = 0.1) -> Volume:
    """Order slices along the slice normal (never by file or instance order) and stack them.

    Raises PreprocessError for mixed orientations or sizes, duplicate positions, or gaps:
    slice spacing must agree with the median within ``spacing_tolerance`` (fraction).
    """
    g = _stacking(slices, spacing_tolerance)
    voxels = np.stack([np.asarray(slices[i].pixels, dtype=np.float32) for i in g.order])  # (n, rows, cols)
    spacing = slices[0].pixel_spacing
    return Volume(voxels, g.positions[0], g.row_dir, g.col_dir, g.normal,
                  (g.dz, float(spacing[0]), float(spacing[1])))


def reduced_stack(slices: Sequence[Slice], *, spacing_tolerance: float = 0.1) -> Volume:
    """``stack_slices`` with the in-plane part of the anti-aliasing box filter applied one slice at a time (or
    already applied by the decoder: ``Slice.plane_centre``): the same volume ``resample_to_contract`` sees (to float
    rounding), but a 160x512^2 CT is never held twice at full size in float32 (block means are 1/49 of it)."""
    g = _stacking(slices, spacing_tolerance)
    first = slices[int(g.order[0])]
    n, (r, c) = len(slices), first.pixels.shape
    sr, sc = (float(v) for v in first.pixel_spacing)
    fr, fc = block_factors((sr, sc), r, c)
    fz = max(1, int(BLOCK_TARGET_MM // g.dz))
    if first.plane_centre is None and (n // fz == 0 or (fr, fc) == (1, 1)):
        return stack_slices(slices, spacing_tolerance=spacing_tolerance)  # _box_downsample decides, as before
    voxels = np.empty((n, r // fr, c // fc), dtype=np.float32)
    for k, i in enumerate(g.order):
        voxels[k] = block_means(slices[int(i)].pixels, fr, fc)
    position, spacing, plane_centre = block_geometry(tuple(g.positions[0]), first.orientation, (sr, sc), r, c, fr, fc)
    if first.plane_centre is not None:
        plane_centre = first.plane_centre
    centre = np.asarray(plane_centre) + (n - 1) / 2 * g.dz * g.normal
    return Volume(voxels, np.asarray(position), g.row_dir, g.col_dir, g.normal, (g.dz, *spacing), centre)


def _box_downsample(volume: Volume, target_mm: float) -> Volume:
    """Average blocks of voxels so no source axis is much finer than the target grid (anti-aliasing)."""
    factors = tuple(max(1, int(target_mm // s)) for s in volume.spacing)
    if factors == (1, 1, 1):
        return volume
    v = volume.voxels
    n, r, c = (v.shape[a] // factors[a] * factors[a] for a in range(3))
    if min(n, r, c) == 0:
        return volume
    v = v[:n, :r, :c].reshape(n // factors[0], factors[0], r // factors[1], factors[1], c // factors[2], factors[2])
    v = v.mean(axis=(1, 3, 5), dtype=np.float32)
    dz, dr, dc = (volume.spacing[a] * factors[a] for a in range(3))
    origin = (
        volume.origin
        + (factors[0] - 1) / 2 * volume.spacing[0] * volume.normal
        + (factors[1] - 1) / 2 * volume.spacing[1] * volume.col_dir
        + (factors[2] - 1) / 2 * volume.spacing[2] * volume.row_dir
    )
    return Volume(v, origin, volume.row_dir, volume.col_dir, volume.normal, (dz, dr, dc))


def contract_grid_points(centre: np.ndarray) -> np.ndarray:
    """World (LPS, mm) coordinates of every contract voxel, shape (D, H, W, 3), grid centred on ``centre``.

    Output axes: z increases superior, y increases posterior, x increases to the patient's left.
    """
    d, h, w = C.VOLUME_SHAPE
    sz, sy, sx = C.VOLUME_SPACING_MM
    z = (np.arange(d) - (d - 1) / 2) * sz
    y = (np.arange(h) - (h - 1) / 2) * sy
    x = (np.arange(w) - (w - 1) / 2) * sx
    zz, yy, xx = np.meshgrid(z, y, x, indexing="ij")
    points: np.ndarray = np.stack([xx, yy, zz], axis=-1) + centre  # (D, H, W, 3) as (x, y, z)
    return points


def _trilinear(voxels: np.ndarray, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sample ``voxels`` at continuous indices idx (..., 3) -> (values, inside-mask). The eight corners are
    gathered by flat offsets from the lower corner (one ``take`` each, not a three-array fancy index)."""
    shape = np.asarray(voxels.shape)
    inside = np.all((idx >= -0.5) & (idx <= shape - 0.5), axis=-1)
    idx = np.clip(idx, 0, shape - 1)
    lo = np.minimum(np.floor(idx).astype(np.intp), np.maximum(shape - 2, 0))
    frac = (idx - lo).astype(np.float32)
    strides = np.array([shape[1] * shape[2], shape[2], 1], dtype=np.intp)
    step = (np.minimum(lo + 1, shape - 1) - lo) * strides  # per axis: 0 where the axis has a single voxel
    base = lo @ strides
    flat = np.ascontiguousarray(voxels).reshape(-1)
    out = np.zeros(idx.shape[:-1], dtype=np.float32)
    for dk in (0, 1):
        wk = frac[..., 0] if dk else 1 - frac[..., 0]
        for di in (0, 1):
            wki = wk * (frac[..., 1] if di else 1 - frac[..., 1])
            for dj in (0, 1):
                offset = base + step[..., 0] * dk + step[..., 1] * di + step[..., 2] * dj
                out += flat.take(offset) * (wki * (frac[..., 2] if dj else 1 - frac[..., 2]))
    return out, inside


def _axis_weights(index: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One axis of ``_trilinear``: for continuous indices into an axis of ``n`` voxels, (lower voxel, upper voxel,
    weight of the upper one (float32), inside mask), with the same clipping and edge rules."""
    inside = (index >= -0.5) & (index <= n - 0.5)
    index = np.clip(index, 0, n - 1)
    lo = np.minimum(np.floor(index).astype(np.intp), max(n - 2, 0))
    return lo, np.minimum(lo + 1, n - 1), (index - lo).astype(np.float32), inside


def _separable_trilinear(vol: Volume, centre: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """``_trilinear`` on the contract grid when each axis of ``vol`` lies along one axis of the grid (an axial,
    coronal or sagittal acquisition, any flips): each voxel index then depends on one grid coordinate only, and the
    interpolation is three one-dimensional ones, axis after axis (exact: the trilinear weights are products of
    per-axis weights). None for an oblique volume (the general path samples every point)."""
    sizes, grid_spacing = C.VOLUME_SHAPE, C.VOLUME_SPACING_MM
    # grid axis 0 runs along world z, 1 along y, 2 along x (``contract_grid_points``)
    directions, spacings = (vol.normal, vol.col_dir, vol.row_dir), vol.spacing
    grid_axis_of: list[int] = []
    for direction in directions:
        world = int(np.argmax(np.abs(direction)))
        if abs(float(direction[world])) < 1 - 1e-6:
            return None
        grid_axis_of.append(2 - world)
    if sorted(grid_axis_of) != [0, 1, 2]:
        return None
    inside = np.ones((), dtype=bool)
    # interpolate the volume's axes in the grid's order; each step replaces the volume axis by the grid axis
    order = [grid_axis_of.index(g) for g in range(3)]  # volume axis for grid axis g
    values = np.transpose(vol.voxels, order)
    for g in range(3):
        a, world = order[g], 2 - g
        coords = (np.arange(sizes[g]) - (sizes[g] - 1) / 2) * grid_spacing[g] + centre[world]
        index = (coords - vol.origin[world]) * directions[a][world] / spacings[a]
        lo, hi, frac, ins = _axis_weights(index, values.shape[g])
        shape = [1, 1, 1]
        shape[g] = sizes[g]
        frac = frac.reshape(shape)
        values = np.take(values, lo, axis=g) * (1 - frac) + np.take(values, hi, axis=g) * frac
        inside = inside & ins.reshape(shape)
    return values.astype(np.float32, copy=False), np.broadcast_to(inside, C.VOLUME_SHAPE).copy()


def resample_to_contract(volume: Volume) -> tuple[np.ndarray, np.ndarray]:
    """Resample a volume onto the contract grid. Returns (values (D,H,W) float32, inside-FOV mask)."""
    vol = _box_downsample(volume, min(C.VOLUME_SPACING_MM))
    separable = _separable_trilinear(vol, volume.centre)
    if separable is not None:
        return separable
    points = contract_grid_points(volume.centre)  # (D, H, W, 3)
    rel = points - vol.origin
    dz, dr, dc = vol.spacing
    idx = np.stack([rel @ vol.normal / dz, rel @ vol.col_dir / dr, rel @ vol.row_dir / dc], axis=-1)
    return _trilinear(vol.voxels, idx)


def normalise_ct(hu: np.ndarray, inside: np.ndarray) -> np.ndarray:
    lo, hi = C.CT_WINDOW_HU
    out = np.clip((hu - lo) / (hi - lo) * 2.0 - 1.0, -1.0, 1.0).astype(np.float32)
    out[~inside] = C.VOLUME_PAD_VALUE
    return out


def normalise_mr(values: np.ndarray, inside: np.ndarray) -> np.ndarray:
    """Robust z-score over the head (voxels above a fraction of the 99th percentile)."""
    data = values[inside]
    if data.size == 0:
        raise PreprocessError("empty_volume", "no voxel of the series falls inside the brain grid")
    p99 = float(np.percentile(data, 99))
    head = data[data > 0.1 * p99] if p99 > 0 else data
    if head.size < 100:
        raise PreprocessError("empty_volume", "MR volume has almost no signal")
    lo, hi = np.percentile(head, [1, 99])
    clipped = np.clip(head, lo, hi)
    mean, std = float(clipped.mean()), float(clipped.std()) or 1.0
    z = np.clip((values - mean) / std, -C.MR_CLIP_Z, C.MR_CLIP_Z) / C.MR_CLIP_Z
    out = z.astype(np.float32)
    out[~inside] = C.VOLUME_PAD_VALUE
    return out


def volume_tensor(volume: Volume, modality: str) -> np.ndarray:
    """Volume -> the contract's ``image`` tensor for one patient, shape (1, D, H, W) float32."""
    values, inside = resample_to_contract(volume)
    if modality == "CT":
        out = normalise_ct(values, inside)
    elif modality == "MR":
        out = normalise_mr(values, inside)
    else:
        raise PreprocessError("unsupported_modality", f"modality {modality!r} is neither CT nor MR")
    return out[None]  # (1, D, H, W)


def series_tensor(slices: Sequence[Slice], modality: str) -> np.ndarray:
    """Decoded slices -> the contract's ``image`` tensor (what the engine runs: ``reduced_stack``)."""
    return volume_tensor(reduced_stack(slices), modality)


# ======================================================================================
# Vitals
# ======================================================================================


@dataclass(frozen=True)
class VitalSample:
    """One observed value in the feature's canonical unit, ``hours_before_end`` >= 0."""

    feature: int  # index into contract.VITAL_FEATURES
    hours_before_end: float
    value: float


def vitals_tensors(samples: Sequence[VitalSample]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Samples -> (vitals, vitals_mask, vitals_delta), each (N_STEPS, N_FEATURES) float32.

    Step t covers hours [end - (N_STEPS - t) * STEP, end - (N_STEPS - t - 1) * STEP); the last step
    ends at the window end. Several samples in a step are averaged. Values are z-scored with the
    contract's constants and carried forward; before the first observation they are 0 (the mean).
    The delta is the time since the last observation up to the step's end, divided by the window;
    1.0 where nothing has been observed yet. Samples outside the window are ignored.
    """
    T, F = C.N_STEPS, C.N_FEATURES
    sums = np.zeros((T, F), dtype=np.float64)
    counts = np.zeros((T, F), dtype=np.int64)
    last_seen = np.full((T, F), np.nan)  # hours before end of the most recent sample inside each step
    for s in samples:
        if not (0.0 <= s.hours_before_end < C.WINDOW_HOURS):
            continue
        step = T - 1 - int(s.hours_before_end // C.STEP_HOURS)
        feat = C.VITAL_FEATURES[s.feature]
        sums[step, s.feature] += (s.value - feat.mean) / feat.std
        counts[step, s.feature] += 1
        prev = last_seen[step, s.feature]
        if np.isnan(prev) or s.hours_before_end < prev:
            last_seen[step, s.feature] = s.hours_before_end

    mask = (counts > 0).astype(np.float32)
    values = np.zeros((T, F), dtype=np.float32)
    delta = np.ones((T, F), dtype=np.float32)
    carry = np.zeros(F, dtype=np.float64)
    last = np.full(F, np.nan)  # hours-before-end of the latest observation so far
    for t in range(T):
        step_end = (T - 1 - t) * C.STEP_HOURS  # hours before window end at this step's end
        seen = counts[t] > 0
        carry[seen] = sums[t, seen] / counts[t, seen]
        last[seen] = last_seen[t, seen]
        values[t] = carry
        known = ~np.isnan(last)
        delta[t, known] = np.minimum((last[known] - step_end) / C.WINDOW_HOURS, 1.0)
    return values, mask, delta


def demographics_tensor(age_years: float | None, sex: str | None) -> np.ndarray:
    """(age, sex) -> the contract's ``demographics`` vector; unknown age is the mean, unknown sex 0.5."""
    age = C.AGE_MEAN if age_years is None else float(age_years)
    s = {"male": 1.0, "female": 0.0}.get((sex or "").lower(), 0.5)
    return np.asarray([(age - C.AGE_MEAN) / C.AGE_STD, s], dtype=np.float32)


def empty_image() -> np.ndarray:
    """The ``image`` tensor when no study is available (``image_present`` = 0)."""
    return np.zeros((1, *C.VOLUME_SHAPE), dtype=np.float32)
