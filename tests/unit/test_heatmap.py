"""The heat-map: served lesion maps or occlusion through a small fake model, its geometry back onto source slices,
and the rendered overlay."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest

from inference import contract as C
from inference.preprocess import Slice, series_tensor
from inference.runtime.base import ModelInputs, Prediction
from integration.domain.types import DomainError
from integration.services.heatmap import (
    LEGEND_ROWS,
    SliceGeometry,
    grid_centre,
    image_heatmap,
    lesion_heatmap,
    render_overlay,
    to_source,
)
from integration.services.results import image_only_inputs

D, H, W = C.VOLUME_SHAPE


class BrightSpotModel:
    """Scores by the mean intensity of one block of the contract grid: only that block matters."""

    model_version, trained, runtime_name = "t", True, "fake"

    def __init__(self, block: tuple[slice, slice, slice]) -> None:
        self.block = block
        self.calls = 0

    def predict(self, batch: Sequence[ModelInputs]) -> list[Prediction]:
        self.calls += 1
        return [Prediction(float(np.clip(0.5 + 0.5 * b.image[0][self.block].mean(), 0, 1)), 0.0, "t", "fake")
                for b in batch]


class LesionModel(BrightSpotModel):
    def lesion_maps(self, batch: Sequence[ModelInputs]) -> list[np.ndarray] | None:
        maps = np.zeros((len(C.LESION_KINDS), *C.LESION_MAP_SHAPE), dtype=np.float32)
        maps[2, 4, 10, 20] = 0.9  # an infarct at half-resolution voxel (4, 10, 20)
        return [maps for _ in batch]


def head_volume() -> np.ndarray:
    image = np.full((1, D, H, W), C.VOLUME_PAD_VALUE, dtype=np.float32)
    image[0, 2:30, 8:56, 8:56] = 0.1  # a box of "tissue"
    return image


def test_occlusion_finds_the_block_that_drives_the_score() -> None:
    image = head_volume()
    image[0, 12:16, 24:32, 40:48] = 0.9  # a bright finding the model scores on
    model = BrightSpotModel((slice(12, 16), slice(24, 32), slice(40, 48)))
    heat = image_heatmap(model, image_only_inputs(image))
    assert heat.method == "occlusion" and heat.values.shape == C.VOLUME_SHAPE
    peak = np.unravel_index(int(np.argmax(heat.values)), heat.values.shape)
    assert 12 <= peak[0] < 16 and 24 <= peak[1] < 32 and 40 <= peak[2] < 48
    assert heat.values[2, 10, 10] == pytest.approx(0.0, abs=1e-6)  # far away: adds nothing
    assert model.calls == 1  # one batched call (the runtime splits it at MAX_BATCH)


def test_a_served_lesion_map_is_used_without_occlusion() -> None:
    model = LesionModel((slice(0, 1),) * 3)
    heat = image_heatmap(model, image_only_inputs(head_volume()))
    assert heat.method == "lesion_map" and model.calls == 0 and heat.vmax == 1.0
    peak = np.unravel_index(int(np.argmax(heat.values)), heat.values.shape)
    assert peak[0] in (8, 9) and peak[1] in (20, 21) and peak[2] in (40, 41)  # half-res cell (4, 10, 20) = 2x2x2 voxels
    assert lesion_heatmap(np.zeros((4, *C.LESION_MAP_SHAPE))).values.max() == 0.0


def test_no_image_no_map() -> None:
    inputs = image_only_inputs(head_volume())
    from dataclasses import replace

    with pytest.raises(DomainError):
        image_heatmap(BrightSpotModel((slice(0, 1),) * 3), replace(inputs, image_present=np.zeros(1, np.float32)))


def oblique_series(n: int = 40, size: int = 64, spacing: float = 3.0, thickness: float = 4.0) -> list[SliceGeometry]:
    """Axial slices tilted 20 degrees about x, centred off the origin."""
    a = np.deg2rad(20)
    row, col = np.array([1.0, 0, 0]), np.array([0, np.cos(a), np.sin(a)])
    normal = np.cross(row, col)
    start = np.array([-90.0, -80.0, 30.0])
    return [SliceGeometry(tuple(start + k * thickness * normal), (*row, *col), (spacing, spacing), size, size)
            for k in range(n)]


def test_to_source_samples_the_grid_where_each_pixel_lies() -> None:
    geometry = oblique_series()
    centre = grid_centre(geometry)
    # a map whose value is the world x coordinate of the voxel (mm): sampled anywhere, it must give the pixel's x
    xs = (np.arange(W) - (W - 1) / 2) * C.VOLUME_SPACING_MM[2] + centre[0]
    heat = np.broadcast_to(xs, C.VOLUME_SHAPE).astype(np.float32)
    on_slices = to_source(heat, geometry)
    g = geometry[20]
    i, j = 30, 17
    world = np.asarray(g.position) + j * g.pixel_spacing[1] * np.asarray(g.orientation[:3]) \
        + i * g.pixel_spacing[0] * np.asarray(g.orientation[3:])
    assert on_slices[20, i, j] == pytest.approx(world[0], abs=1e-3)
    assert on_slices.shape == (40, 64, 64)


def test_the_grid_centre_is_the_one_preprocessing_uses() -> None:
    geometry = oblique_series(n=12)
    # a volume with one bright voxel-sized spot at a known world point; series_tensor must put it where the
    # map put the same point
    target = np.asarray(geometry[6].position) + 32 * 3.0 * np.asarray(geometry[6].orientation[:3]) \
        + 20 * 3.0 * np.asarray(geometry[6].orientation[3:])
    slices = []
    for g in geometry:
        pixels = np.full((g.rows, g.columns), 30.0, dtype=np.float32)
        if g is geometry[6]:
            pixels[18:23, 30:35] = 110.0
        slices.append(Slice(pixels, g.position, g.orientation, g.pixel_spacing))
    image = series_tensor(slices, "CT")[0]
    hot = np.unravel_index(int(np.argmax(image)), image.shape)
    centre = grid_centre(geometry)
    expected = (target - centre) / np.asarray(C.VOLUME_SPACING_MM[::-1]) + (np.asarray(C.VOLUME_SHAPE[::-1]) - 1) / 2
    assert np.allclose(hot[::-1], expected, atol=1.5)  # (x, y, z) grid indices of the same point


def test_the_overlay_keeps_the_anatomy_and_adds_a_legend() -> None:
    pixels = np.tile(np.linspace(0, 80, 32, dtype=np.float32), (32, 1))
    heat = np.zeros((32, 32), dtype=np.float32)
    heat[10:14, 10:14] = 1.0
    rgb = render_overlay(pixels, heat, vmax=1.0, label="lesion probability", window=(0, 80), note="Not for diagnosis")
    assert rgb.shape == (32 + LEGEND_ROWS, 32, 3) and rgb.dtype == np.uint8
    assert (rgb[:32, :, 0] == rgb[:32, :, 2]).sum() > 32 * 32 - 16 - 4  # grey except where the map is
    assert int(rgb[12, 12, 0]) > int(rgb[12, 12, 2]) + 50  # coloured where the map is
    assert rgb[32:].any()  # the legend strip is drawn


def test_patient_orientation_follows_the_source_plane() -> None:
    from integration.services.results_dicom import patient_orientation

    axial = SliceGeometry((0, 0, 0), (1, 0, 0, 0, 1, 0), (1, 1), 4, 4)
    coronal = SliceGeometry((0, 0, 0), (1, 0, 0, 0, 0, -1), (1, 1), 4, 4)
    sagittal = SliceGeometry((0, 0, 0), (0, 1, 0, 0, 0, -1), (1, 1), 4, 4)
    assert patient_orientation(axial) == ("L", "P")
    assert patient_orientation(coronal) == ("L", "F")
    assert patient_orientation(sagittal) == ("P", "F")


def test_png_of_an_overlay() -> None:
    from integration.services.heatmap import png_bytes

    data = png_bytes(render_overlay(np.zeros((8, 8)), np.zeros((8, 8)), vmax=1.0, label="x"))
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
