"""The engine's slices -> image tensor (``series_tensor``: in-plane block means taken slice by slice) gives the
tensor the reference path gives (``volume_tensor(stack_slices(...))``: the whole series stacked, then reduced),
for CT and MR, odd sizes, oblique and shuffled slices, and tiny series the box filter leaves alone."""

from __future__ import annotations

import numpy as np
import pytest

from inference import contract as C
from inference.preprocess import (
    PreprocessError,
    Slice,
    Volume,
    _box_downsample,
    _separable_trilinear,
    _trilinear,
    block_means,
    contract_grid_points,
    reduced_stack,
    resample_to_contract,
    series_tensor,
    stack_slices,
    volume_tensor,
)


def series(n: int, size: int, pixel_mm: float, dz: float, *, oblique: bool = False, seed: int = 0) -> list[Slice]:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    head = ((yy - size / 2) ** 2 + (xx - size / 2) ** 2) < (0.4 * size) ** 2
    if oblique:  # rotated 20 degrees about x: rows along x, columns along (0, cos, sin)
        a = np.deg2rad(20)
        row, col = np.array([1.0, 0, 0]), np.array([0, np.cos(a), np.sin(a)])
    else:
        row, col = np.array([1.0, 0, 0]), np.array([0, 1.0, 0])
    normal = np.cross(row, col)
    origin = np.array([-size * pixel_mm / 2, -size * pixel_mm / 2 + 7, -60.0])
    out = []
    for k in range(n):
        pixels = np.where(head, 40.0 + k, -1000.0) + rng.normal(0, 8, (size, size))
        position = origin + k * dz * normal
        out.append(Slice(pixels.astype(np.float32), tuple(position), (*row, *col), (pixel_mm, pixel_mm * 1.01)))
    order = rng.permutation(n)  # file order means nothing
    return [out[i] for i in order]


@pytest.mark.parametrize(
    ("n", "size", "pixel_mm", "dz", "modality", "oblique"),
    [
        (32, 256, 0.9, 5.0, "CT", False),
        (160, 512, 0.45, 1.0, "CT", False),
        (41, 333, 0.7, 2.5, "MR", False),
        (24, 199, 1.1, 6.0, "MR", True),
        (30, 64, 3.6, 5.0, "CT", False),  # coarser than the grid in-plane: nothing to reduce
    ],
)
def test_the_reduced_path_gives_the_reference_tensor(
    n: int, size: int, pixel_mm: float, dz: float, modality: str, oblique: bool
) -> None:
    slices = series(n, size, pixel_mm, dz, oblique=oblique)
    reference = volume_tensor(stack_slices(slices), modality)
    engine = series_tensor(slices, modality)
    assert engine.shape == reference.shape == (1, *C.VOLUME_SHAPE)
    assert np.abs(engine - reference).max() < 1e-4


def test_the_reduced_stack_is_smaller_and_keeps_the_acquired_centre() -> None:
    slices = series(20, 512, 0.45, 1.0)
    full, reduced = stack_slices(slices), reduced_stack(slices)
    assert reduced.voxels.nbytes * 40 < full.voxels.nbytes  # 7 x 7 blocks in-plane
    assert np.allclose(reduced.centre, full.centre)
    assert reduced.spacing[1] == pytest.approx(0.45 * 7) and reduced.spacing[0] == full.spacing[0]


def test_a_series_too_small_for_one_block_is_stacked_as_it_is() -> None:
    slices = series(3, 5, 0.45, 1.0)  # five pixels: no whole 7 x 7 block
    assert reduced_stack(slices).voxels.shape == (3, 5, 5)
    assert np.abs(series_tensor(slices, "CT") - volume_tensor(stack_slices(slices), "CT")).max() < 1e-4


def test_the_same_geometry_checks_refuse_bad_series() -> None:
    slices = series(10, 64, 0.9, 2.0)
    with pytest.raises(PreprocessError) as err:
        reduced_stack([*slices, slices[0]])
    assert err.value.code == "duplicate_slices"
    with pytest.raises(PreprocessError) as err:
        reduced_stack(slices[:1])
    assert err.value.code == "too_few_slices"


@pytest.mark.parametrize("dtype", [np.uint16, np.int16, np.float32])
@pytest.mark.parametrize(("fr", "fc"), [(1, 1), (1, 3), (3, 1), (7, 7), (2, 5)])
def test_block_means_are_the_means_of_the_whole_blocks(dtype: type, fr: int, fc: int) -> None:
    low = -1000 if dtype is np.int16 else 0
    plane = np.random.default_rng(fr * 10 + fc).integers(low, 4000, (37, 50)).astype(dtype)
    rows, cols = 37 // fr * fr, 50 // fc * fc
    expected = plane[:rows, :cols].astype(np.float64).reshape(rows // fr, fr, cols // fc, fc).mean(axis=(1, 3))
    got = block_means(plane, fr, fc)
    assert got.dtype == np.float32 and got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=1e-6)


@pytest.mark.parametrize("shape", [(9, 11, 13), (1, 11, 13), (9, 1, 13), (2, 1, 1)])
def test_trilinear_sampling_matches_the_corner_formula(shape: tuple[int, int, int]) -> None:
    rng = np.random.default_rng(3)
    voxels = rng.normal(size=shape).astype(np.float32)
    idx = rng.uniform(-1.0, 1.0, (5, 6, 7, 3)) * np.array(shape) + np.array(shape) / 2  # some outside the volume
    got, inside = _trilinear(voxels, idx)
    # the definition, one point at a time: clamped lower corner, weights (1 - f, f) per axis, edges repeated
    size = np.array(shape)
    for point in np.ndindex(idx.shape[:-1]):
        x = np.clip(idx[point], 0, size - 1)
        lo = np.minimum(np.floor(x).astype(int), np.maximum(size - 2, 0))
        f = x - lo
        value = 0.0
        for corner in np.ndindex(2, 2, 2):
            at = tuple(min(lo[a] + corner[a], size[a] - 1) for a in range(3))
            value += voxels[at] * np.prod([f[a] if corner[a] else 1 - f[a] for a in range(3)])
        assert got[point] == pytest.approx(value, abs=1e-5)
        assert inside[point] == bool(np.all((idx[point] >= -0.5) & (idx[point] <= size - 0.5)))


def _general_resample(volume: Volume) -> tuple[np.ndarray, np.ndarray]:
    """The contract grid sampled point by point (``_trilinear`` on every grid point's continuous index)."""
    vol = _box_downsample(volume, min(C.VOLUME_SPACING_MM))
    rel = contract_grid_points(volume.centre) - vol.origin
    dz, dr, dc = vol.spacing
    idx = np.stack([rel @ vol.normal / dz, rel @ vol.col_dir / dr, rel @ vol.row_dir / dc], axis=-1)
    return _trilinear(vol.voxels, idx)


AXES = {"x": np.array([1.0, 0, 0]), "y": np.array([0, 1.0, 0]), "z": np.array([0, 0, 1.0])}


@pytest.mark.parametrize(
    ("row", "col", "shift"),
    [
        ("x", "y", (0, 0, 0)),  # axial
        ("x", "-z", (0, 0, 0)),  # coronal, rows left to right, columns head to feet
        ("y", "-z", (3.3, -2.0, 4.1)),  # sagittal, off-centre
        ("-x", "y", (0, 0, 0)),  # axial, flipped
        ("x", "y", (0, 0, 90.0)),  # the grid reaches past the acquired slab: part of it outside
    ],
)
def test_the_axis_aligned_resample_is_the_point_by_point_one(row: str, col: str, shift: tuple[float, ...]) -> None:
    """Axis-aligned acquisitions take the separable path (three 1-D interpolations); it gives what sampling every
    grid point gives, values and the inside mask, for any orientation, flip and a grid partly outside."""

    def axis(name: str) -> np.ndarray:
        return -AXES[name[1]] if name.startswith("-") else AXES[name]

    rng = np.random.default_rng(7)
    r, c, normal = axis(row), axis(col), np.cross(axis(row), axis(col))
    voxels = rng.normal(size=(23, 70, 61)).astype(np.float32)
    spacing = (4.3, 2.9, 3.1)
    origin = np.asarray(shift) - 11 * spacing[0] * normal - 35 * spacing[1] * c - 30 * spacing[2] * r
    volume = Volume(voxels, origin, r, c, normal, spacing)
    centre = volume.centre if shift[2] < 50 else volume.centre - np.array([0, 0, shift[2]])
    volume = Volume(voxels, origin, r, c, normal, spacing, centre)
    assert _separable_trilinear(_box_downsample(volume, min(C.VOLUME_SPACING_MM)), volume.centre) is not None
    values, inside = resample_to_contract(volume)
    expected, expected_inside = _general_resample(volume)
    assert values.shape == inside.shape == C.VOLUME_SHAPE and values.dtype == np.float32
    np.testing.assert_array_equal(inside, expected_inside)
    np.testing.assert_allclose(values, expected, rtol=1e-5, atol=1e-5)
    if shift[2] >= 50:
        assert 0 < inside.mean() < 1


def test_an_oblique_volume_takes_the_point_by_point_path() -> None:
    volume = stack_slices(series(12, 40, 1.2, 5.0, oblique=True))
    assert _separable_trilinear(volume, volume.centre) is None
    values, inside = resample_to_contract(volume)
    expected, expected_inside = _general_resample(volume)
    np.testing.assert_array_equal(values, expected)
    np.testing.assert_array_equal(inside, expected_inside)
