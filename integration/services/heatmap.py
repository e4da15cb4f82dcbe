"""Where in the image the model saw risk: an attribution heat-map of the volume, in the source slices' geometry.

Two ways, both through the served model (ONNX Runtime or Triton; the engine has no torch):

- **lesion map** (``C.LESION_MAP``), when the served model declares it: the fusion model's image path reads the
  risk off per-voxel lesion-probability maps (``modelling.branches.ImageBranch``), so the map it scored from is the
  attribution, from one forward pass. The runtimes ask for it only here, never while scoring (it is 4 x 16k floats
  per patient);
- **occlusion** for any other model (an older model package, a model without lesion maps): the volume with one
  block at a time replaced by the head's median intensity, in batched calls, and how many probability points each
  block added (``OCCLUSION_BLOCK`` voxels; the block grid is then interpolated to voxels).

Either map lives on the contract grid (``C.VOLUME_SHAPE``, centred on the acquired volume, LPS axes) and is
sampled at every source pixel (``to_source``) so it can be laid over the slices the radiologist scrolls
(``render_overlay``: the slice in grey, the map in colour, a legend strip below).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Literal, Protocol, runtime_checkable

import numpy as np
from scipy.ndimage import map_coordinates

from inference import contract as C
from inference.runtime.base import ModelContractError, ModelInputs, ModelUnavailableError
from integration.domain.types import DomainError, Outcome
from integration.ports import RiskModel

log = logging.getLogger(__name__)

Method = Literal["lesion_map", "occlusion"]
#: Occlusion block (z, y, x) in contract voxels: 20 x 28 x 28 mm, 512 blocks over the grid (those outside the head
#: are skipped).
OCCLUSION_BLOCK: tuple[int, int, int] = (4, 8, 8)
#: Below this fraction of the map's maximum nothing is coloured (the anatomy stays readable).
SHOW_ABOVE = 0.15


@runtime_checkable
class LesionMapModel(Protocol):
    """A runtime that can serve the model's lesion maps (``C.LESION_MAP``), asked for on their own."""

    def lesion_maps(self, batch: Sequence[ModelInputs]) -> list[np.ndarray] | None:
        """Per patient (len(C.LESION_KINDS), d, h, w) probabilities; None when the served model has none."""
        ...


@dataclass(frozen=True)
class HeatMap:
    """The map on the contract grid (D, H, W), what it means, and its scale (legend)."""

    values: np.ndarray  # (D, H, W) float32, >= 0
    method: Method
    label: str  # what a value is, for the legend
    vmax: float  # the legend's top (the largest value, or the method's natural maximum)


@dataclass(frozen=True)
class SliceGeometry:
    """Where one source image lies (DICOM Image Plane module: LPS mm)."""

    position: tuple[float, float, float]
    orientation: tuple[float, float, float, float, float, float]
    pixel_spacing: tuple[float, float]  # (between rows, between columns)
    rows: int
    columns: int


def image_heatmap(model: RiskModel, inputs: ModelInputs) -> HeatMap:
    """The patient's heat-map: the served lesion map if the model has one, else occlusion. Raises DomainError
    (``model_unavailable``, retryable) when the model cannot be reached."""
    if float(np.asarray(inputs.image_present).reshape(-1)[0]) < 0.5:
        raise DomainError(Outcome.INTERNAL_ERROR, "no image was used for this score: there is nothing to map")
    try:
        if isinstance(model, LesionMapModel):
            maps = model.lesion_maps([inputs])
            if maps is not None:
                return lesion_heatmap(maps[0])
        return occlusion_heatmap(model, inputs)
    except ModelUnavailableError as err:
        raise DomainError(Outcome.MODEL_UNAVAILABLE, f"heat-map: {err}") from err
    except ModelContractError as err:
        raise DomainError(Outcome.MODEL_MISMATCH, f"heat-map: {err}") from err


def lesion_heatmap(lesion: np.ndarray) -> HeatMap:
    """(K, d, h, w) lesion probabilities -> the probability of any finding per contract voxel (max over kinds)."""
    lesion = np.asarray(lesion, dtype=np.float32)
    coarse = lesion.max(axis=0)  # (d, h, w)
    values = _upsample(coarse, C.VOLUME_SHAPE)
    return HeatMap(np.clip(values, 0.0, 1.0), "lesion_map", "lesion probability (model)", 1.0)


def occlusion_heatmap(model: RiskModel, inputs: ModelInputs, block: tuple[int, int, int] = OCCLUSION_BLOCK) -> HeatMap:
    """Probability points each block of the volume adds: p(all) - p(block replaced by the head's median)."""
    image = np.asarray(inputs.image, dtype=np.float32)  # (1, D, H, W)
    volume = image[0]
    head = volume > C.VOLUME_PAD_VALUE + 0.05  # (D, H, W): inside the acquired field, above air
    fill = float(np.median(volume[head])) if head.any() else 0.0
    grid = tuple(n // b for n, b in zip(C.VOLUME_SHAPE, block, strict=True))  # blocks per axis
    blocks = [idx for idx in np.ndindex(*grid) if head[_block_slices(idx, block)].mean() > 0.1]
    variants = []
    for idx in blocks:
        occluded = volume.copy()
        occluded[_block_slices(idx, block)] = fill
        variants.append(replace(inputs, image=occluded[None]))
    scores = model.predict([inputs, *variants])
    full = scores[0].probability
    coarse = np.zeros(grid, dtype=np.float32)
    for idx, scored in zip(blocks, scores[1:], strict=True):
        coarse[idx] = max(0.0, full - scored.probability)
    values = _upsample(coarse, C.VOLUME_SHAPE) * head
    top = float(values.max())
    return HeatMap(values.astype(np.float32), "occlusion", "probability added (occlusion)", top if top > 0 else 1.0)


def _block_slices(idx: tuple[int, ...], block: tuple[int, int, int]) -> tuple[slice, slice, slice]:
    return tuple(slice(i * b, (i + 1) * b) for i, b in zip(idx, block, strict=True))  # type: ignore[return-value]


def _upsample(coarse: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """Trilinear from a coarse grid whose cells tile ``shape`` (cell centres to voxel centres)."""
    axes = [
        (np.arange(n) + 0.5) * (c / n) - 0.5 for n, c in zip(shape, coarse.shape, strict=True)
    ]  # each voxel's position in coarse-cell units
    coords = np.stack(np.meshgrid(*axes, indexing="ij"))  # (3, D, H, W)
    out: np.ndarray = map_coordinates(coarse.astype(np.float32), coords, order=1, mode="nearest")
    return out.astype(np.float32)


# -- the source slices' geometry ------------------------------------------------------------------------------


def grid_centre(geometry: Sequence[SliceGeometry]) -> np.ndarray:
    """The centre of the acquired volume, on which ``inference.preprocess`` centres the contract grid (LPS mm)."""
    if not geometry:
        raise ValueError("no slices")
    first = geometry[0]
    row_dir, col_dir, normal = _axes(first)
    along = np.asarray([np.dot(g.position, normal) for g in geometry])
    lowest = geometry[int(np.argmin(along))]
    dr, dc = lowest.pixel_spacing
    plane_centre = (
        np.asarray(lowest.position) + (lowest.rows - 1) / 2 * dr * col_dir + (lowest.columns - 1) / 2 * dc * row_dir
    )
    centre: np.ndarray = plane_centre + (float(along.max() - along.min()) / 2) * normal
    return centre


def to_source(heat: np.ndarray, geometry: Sequence[SliceGeometry]) -> np.ndarray:
    """The contract-grid map sampled at every pixel of every source slice: (n_slices, rows, columns), in the order
    of ``geometry``. Pixels outside the grid get 0."""
    centre = grid_centre(geometry)
    out = np.zeros((len(geometry), geometry[0].rows, geometry[0].columns), dtype=np.float32)
    for k, g in enumerate(geometry):
        if (g.rows, g.columns) != out.shape[1:]:
            raise ValueError("source slices differ in size")
        out[k] = sample_slice(heat, centre, g)
    return out


def sample_slice(heat: np.ndarray, centre: np.ndarray, g: SliceGeometry) -> np.ndarray:
    """The contract-grid map (centred on ``centre``, ``grid_centre``) at every pixel of one source slice:
    (rows, columns), 0 outside the grid."""
    d, h, w = C.VOLUME_SHAPE
    sz, sy, sx = C.VOLUME_SPACING_MM
    row_dir, col_dir, _ = _axes(g)
    dr, dc = g.pixel_spacing
    i, j = np.meshgrid(np.arange(g.rows), np.arange(g.columns), indexing="ij")
    points = np.asarray(g.position) + i[..., None] * dr * col_dir + j[..., None] * dc * row_dir  # (R, C, 3)
    rel = points - centre
    coords = np.stack([
        rel[..., 2] / sz + (d - 1) / 2,  # z (superior)
        rel[..., 1] / sy + (h - 1) / 2,  # y (posterior)
        rel[..., 0] / sx + (w - 1) / 2,  # x (left)
    ])  # (3, R, C) contract-grid indices
    out: np.ndarray = map_coordinates(heat.astype(np.float32), coords, order=1, mode="constant", cval=0.0)
    return out


def _axes(g: SliceGeometry) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    orient = np.asarray(g.orientation, dtype=np.float64)
    row_dir, col_dir = orient[:3], orient[3:]
    normal = np.cross(row_dir, col_dir)
    return row_dir, col_dir, normal / (np.linalg.norm(normal) or 1.0)


# -- what a viewer shows ---------------------------------------------------------------------------------------

LEGEND_ROWS = 40


def colormap(t: np.ndarray) -> np.ndarray:
    """0..1 -> RGB 0..1, dark red - red - yellow: (..., 3). Never white or grey, so it cannot be mistaken for bone
    or contrast on a CT."""
    t = np.clip(t, 0.0, 1.0)
    return np.stack([np.clip(0.4 + 1.2 * t, 0, 1), np.clip(2 * t - 0.8, 0, 1), np.zeros_like(t)], axis=-1)


def grey(pixels: np.ndarray, window: tuple[float, float] | None = None) -> np.ndarray:
    """A slice (rows, cols) in its own units -> 0..1 for display, through ``window`` (low, high) or the 1st..99th
    percentile of the slice."""
    pixels = np.asarray(pixels, dtype=np.float32)
    if window is None:
        lo, hi = (float(v) for v in np.percentile(pixels, [1, 99]))
    else:
        lo, hi = window
    return np.clip((pixels - lo) / ((hi - lo) or 1.0), 0.0, 1.0)


def render_overlay(
    pixels: np.ndarray,
    heat: np.ndarray,
    *,
    vmax: float,
    label: str,
    window: tuple[float, float] | None = None,
    note: str = "",
) -> np.ndarray:
    """One source slice with the map blended over it and a legend strip below: RGB uint8 (rows + LEGEND_ROWS,
    columns, 3). ``heat`` is the slice's map (rows, columns) from ``to_source``; values below SHOW_ABOVE x vmax are
    not coloured; the colour bar runs from 0 to ``vmax``, labelled with ``label`` (and ``note``)."""
    base = grey(pixels, window)[..., None].repeat(3, axis=-1)  # (R, C, 3)
    t = np.clip(np.asarray(heat, dtype=np.float32) / (vmax or 1.0), 0.0, 1.0)
    alpha = np.where(t >= SHOW_ABOVE, 0.35 + 0.4 * t, 0.0)[..., None]  # (R, C, 1)
    blended = base * (1 - alpha) + colormap(t) * alpha
    legend = _legend(base.shape[1], vmax, label, note)
    return (np.concatenate([blended, legend], axis=0) * 255 + 0.5).astype(np.uint8)


def _legend(width: int, vmax: float, label: str, note: str) -> np.ndarray:
    """A colour bar from SHOW_ABOVE x vmax to vmax with its end values and the label, RGB 0..1 (LEGEND_ROWS, width)."""
    from PIL import Image, ImageDraw, ImageFont

    strip = np.zeros((LEGEND_ROWS, width, 3), dtype=np.float32)
    bar_w = min(max(16, width // 3), width - 8)  # a third of the width; none on a tiny image
    if bar_w > 0:
        strip[4:14, 4 : 4 + bar_w] = colormap(np.linspace(SHOW_ABOVE, 1.0, bar_w, dtype=np.float32))[None]
    bar_w = max(bar_w, 0)
    picture = Image.fromarray((strip * 255).astype(np.uint8))
    draw = ImageDraw.Draw(picture)
    font = ImageFont.load_default()
    draw.text((8 + bar_w, 3), f"{SHOW_ABOVE * vmax:.2g} .. {vmax:.2g}  {label}", fill=(255, 255, 255), font=font)
    if note:
        draw.text((4, 22), note, fill=(255, 255, 255), font=font)
    return np.asarray(picture, dtype=np.float32) / 255.0


def png_bytes(rgb: np.ndarray) -> bytes:
    """An RGB uint8 image (``render_overlay``) as PNG bytes, for a web page."""
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.asarray(rgb, dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()
