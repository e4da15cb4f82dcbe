"""The base anatomy: the MNI152 2009 template shipped inside nilearn, turned into tissue maps once and cached.

nilearn ships (offline, under ``nilearn/datasets/data/``) a skull-stripped T1 template and grey/white-matter
probability maps of the ICBM 2009 symmetric non-linear atlas at 1 mm. From them we derive, on a 1.5 mm grid:

* ``gm``, ``wm``: tissue fractions 0..1 (CSF is the intracranial remainder, see ``tissue_fractions``);
* ``sdist``: signed distance in mm to the intracranial boundary (negative inside), from which skull and
  scalp are built as shells (the template has no skull; shells are a documented geometric stand-in);
* ``pvdist``: distance in mm to the lateral ventricles, which places periventricular white-matter disease.

Coordinates are MNI/RAS millimetres (+x right, +y anterior, +z superior). Vascular territories are a
geometric approximation in those coordinates (no atlas is shipped in a Python package): see ``territory``.
"""

from __future__ import annotations

import functools
import os
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

CACHE_VERSION = 1
BASE_MM = 1.5
#: World position (RAS mm) of template index [0, 0, 0] at 1 mm (the nilearn files' affine).
TEMPLATE_ORIGIN_RAS = np.array([-98.0, -134.0, -72.0])
#: Values sampled outside the template grid: no tissue, far outside the head, far from the ventricles.
_FILL = np.array([0.0, 0.0, 80.0, 80.0], dtype=np.float32)


@dataclass(frozen=True)
class Template:
    """Channels-last tissue maps: ``maps[..., c]`` for c in (gm, wm, sdist, pvdist) on a BASE_MM grid."""

    maps: np.ndarray  # (X, Y, Z, 4) float32
    origin: np.ndarray  # (3,) RAS mm of index [0, 0, 0]
    spacing: float

    def index_of(self, ras: np.ndarray) -> np.ndarray:
        return (ras - self.origin) / self.spacing


def _cache_dir() -> Path:
    root = os.environ.get("STROKEWATCH_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "strokewatch"
    )
    return Path(root)


def _build() -> Template:
    import nibabel as nib
    from nilearn import datasets
    from scipy import ndimage

    data_dir = Path(datasets.__file__).parent / "data"

    def load(name: str) -> np.ndarray:
        img = nib.load(data_dir / f"mni_icbm152_{name}_tal_nlin_sym_09a_converted.nii.gz")
        return np.asarray(img.dataobj, dtype=np.float32) / 255.0  # type: ignore[attr-defined]

    t1, gm, wm = load("t1"), load("gm"), load("wm")
    icv = ndimage.binary_fill_holes(t1 > 0)
    d_out = ndimage.distance_transform_edt(~icv)
    d_in = ndimage.distance_transform_edt(icv)
    sdist = (d_out - d_in).astype(np.float32)
    csf = np.clip(icv - gm - wm, 0, 1)
    # Lateral ventricles: CSF deep inside the brain, near the midline (excludes sulcal and cisternal CSF).
    x, y, z = (np.arange(n, dtype=np.float32) + o for n, o in zip(t1.shape, TEMPLATE_ORIGIN_RAS, strict=True))
    box = (np.abs(x)[:, None, None] < 32) & ((y > -48) & (y < 30))[None, :, None] & ((z > -5) & (z < 35))[None, None]
    ventricles = (csf > 0.5) & (d_in > 12) & box
    pvdist = np.minimum(ndimage.distance_transform_edt(~ventricles), 80).astype(np.float32)

    maps_1mm = np.stack([gm, wm, sdist, pvdist], axis=-1)  # (X, Y, Z, 4)
    shape = tuple(int((n - 1) // BASE_MM) + 1 for n in t1.shape)
    grid = np.stack(np.meshgrid(*(np.arange(n) * BASE_MM for n in shape), indexing="ij"))  # (3, X', Y', Z')
    maps = np.empty((*shape, 4), dtype=np.float32)
    for c in range(4):
        smooth = ndimage.gaussian_filter(maps_1mm[..., c], sigma=0.5)  # anti-alias before 1.5 mm
        maps[..., c] = ndimage.map_coordinates(smooth, grid, order=1, mode="nearest")
    # Stored as float16 in the cache: round here too, so a fresh build and a cached load are identical.
    return Template(maps=maps.astype(np.float16).astype(np.float32), origin=TEMPLATE_ORIGIN_RAS.copy(), spacing=BASE_MM)


@functools.lru_cache(maxsize=1)
def load_template() -> Template:
    """The cached template (built from nilearn's files on first use, ~10 s, then read from the cache)."""
    path = _cache_dir() / f"synth-template-v{CACHE_VERSION}.npz"
    if path.exists():
        try:
            with np.load(path) as z:
                return Template(z["maps"].astype(np.float32), z["origin"], float(z["spacing"]))
        except (OSError, ValueError, KeyError, zipfile.BadZipFile):
            pass  # unreadable cache (e.g. truncated by a full disk): rebuild it
    tpl = _build()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp.npz")
        np.savez(tmp, maps=tpl.maps.astype(np.float16), origin=tpl.origin, spacing=tpl.spacing)
        os.replace(tmp, path)  # atomic: concurrent builders never see a half-written cache
    except OSError:
        pass  # read-only home: work from memory, rebuild next time
    return tpl


@functools.lru_cache(maxsize=1)
def _torch_maps() -> object | None:
    """The template as a torch tensor (1, C, Z, Y, X) for grid_sample, or None without torch (numpy path)."""
    try:
        import torch
    except ImportError:  # the numpy path below gives the same numbers, ~5x slower
        return None
    return torch.from_numpy(np.ascontiguousarray(load_template().maps.transpose(3, 2, 1, 0)))[None]


def sample_maps(tpl: Template, ras: np.ndarray, channels: slice = slice(0, 4)) -> np.ndarray:
    """Trilinear sample of template channels at RAS points (P, 3) -> (P, C); outside the grid -> fill values."""
    maps_t = _torch_maps() if tpl is load_template() else None
    if maps_t is not None:
        return _sample_torch(maps_t, tpl, ras, channels)
    return _sample_numpy(tpl, ras, channels)


def _sample_torch(maps_t: object, tpl: Template, ras: np.ndarray, channels: slice) -> np.ndarray:
    import torch

    shape = np.asarray(tpl.maps.shape[:3], dtype=np.float64)
    idx = tpl.index_of(ras)
    outside = np.any((idx < 0) | (idx > shape - 1), axis=-1)
    grid = torch.from_numpy((idx / (shape - 1) * 2 - 1).astype(np.float32)).view(1, 1, 1, -1, 3)
    vol = maps_t[:, channels]  # type: ignore[index]
    with torch.no_grad():
        out = torch.nn.functional.grid_sample(vol, grid, mode="bilinear", padding_mode="border", align_corners=True)
    res = out[0, :, 0, 0, :].T.numpy().copy()  # (P, C)
    res[outside] = _FILL[channels]
    return res


def _sample_numpy(tpl: Template, ras: np.ndarray, channels: slice) -> np.ndarray:
    maps = tpl.maps[..., channels]
    fill = _FILL[channels]
    shape = np.asarray(maps.shape[:3])
    idx = tpl.index_of(ras)
    outside = np.any((idx < 0) | (idx > shape - 1), axis=-1)
    idx = np.clip(idx, 0, shape - 1.0001)
    lo = idx.astype(np.int64)
    f = (idx - lo).astype(np.float32)
    flat = maps.reshape(-1, maps.shape[-1])
    sy, sz = shape[1] * shape[2], shape[2]
    base = lo[:, 0] * sy + lo[:, 1] * sz + lo[:, 2]
    out = np.zeros((len(ras), maps.shape[-1]), dtype=np.float32)
    for dx in (0, 1):
        wx = f[:, 0] if dx else 1 - f[:, 0]
        for dy in (0, 1):
            wxy = wx * (f[:, 1] if dy else 1 - f[:, 1])
            for dz in (0, 1):
                w = wxy * (f[:, 2] if dz else 1 - f[:, 2])
                out += flat[base + dx * sy + dy * sz + dz] * w[:, None]
    out[outside] = fill
    return out


# ------------------------------------------------------------------------------------------------
# Vascular territories: a geometric approximation in MNI mm, documented as such (SYNTH.md).
# ACA: medial frontal/parietal strip; PCA: occipital lobe + inferomedial temporal; MCA: the rest of the
# lateral hemisphere above the skull base, including the basal ganglia (lenticulostriate branches).
# Cerebellum/brainstem (posterior fossa) belong to none of them.
# ------------------------------------------------------------------------------------------------
TERRITORIES = ("MCA", "ACA", "PCA")


def territory(ras: np.ndarray, name: str, side: str) -> np.ndarray:
    """Bool per point (P, 3): inside the named territory of the given hemisphere ('L' or 'R')."""
    x, y, z = ras[..., 0], ras[..., 1], ras[..., 2]
    hemi = (x < 0) if side == "L" else (x > 0)
    ax = np.abs(x)
    fossa = (z < -20) & (y < -35)
    aca = (ax < 16) & (y > -55) & (z > 0)
    pca = ((y < -68) & (z > -20)) | ((y < -25) & (y >= -68) & (z < -5) & (z > -30) & (ax > 12))
    if name == "ACA":
        region = aca
    elif name == "PCA":
        region = pca & ~aca
    elif name == "MCA":
        region = (ax >= 12) & (z > -35) & (z < 75) & (y > -75) & ~aca & ~pca
    else:
        raise ValueError(f"unknown territory {name!r}")
    return hemi & region & ~fossa


def sample_points(
    rng: np.random.Generator,
    tpl: Template,
    accept: Callable[[np.ndarray, np.ndarray], np.ndarray],
    lo: np.ndarray,
    hi: np.ndarray,
    tries: int = 64,
) -> np.ndarray:
    """Rejection-sample one RAS point in the box [lo, hi] where ``accept(points, maps)`` holds."""
    for _ in range(tries):
        pts = rng.uniform(lo, hi, size=(64, 3))
        ok = accept(pts, sample_maps(tpl, pts))
        if ok.any():
            return pts[int(np.argmax(ok))]
    return (np.asarray(lo) + np.asarray(hi)) / 2


#: Node spacing (in template voxels) of the coarse distance map used to skip air quickly.
_COARSE_STEP = 4


@functools.lru_cache(maxsize=1)
def _coarse_sdist() -> np.ndarray:
    return np.ascontiguousarray(load_template().maps[::_COARSE_STEP, ::_COARSE_STEP, ::_COARSE_STEP, 2])


def sdist_lower_bound(ras: np.ndarray) -> np.ndarray:
    """A lower bound (mm) of the signed distance to the intracranial boundary at RAS points (P, 3).

    Nearest node of a coarse (6 mm) copy of ``sdist``, minus a full node diagonal (nodes are clamped at
    the grid's far edge) and the smoothing slack: a distance map changes by at most 1 mm per mm, so every
    point whose bound exceeds the head's shells is pure air. Points off the template grid are air anyway.
    """
    tpl = load_template()
    coarse = _coarse_sdist()
    step = tpl.spacing * _COARSE_STEP
    flat_index = np.zeros(len(ras), dtype=np.int64)
    off_grid = np.zeros(len(ras), dtype=bool)
    for axis in range(3):  # column by column: contiguous, no (P, 3) temporaries
        rel = (ras[:, axis] - tpl.origin[axis]) / tpl.spacing
        off_grid |= (rel < 0) | (rel > tpl.maps.shape[axis] - 1)
        node = np.clip(np.rint(rel / _COARSE_STEP).astype(np.int64), 0, coarse.shape[axis] - 1)
        flat_index = flat_index * coarse.shape[axis] + node
    bound = coarse.reshape(-1)[flat_index] - np.float32(step * np.sqrt(3) + tpl.spacing)
    bound[off_grid] = np.inf
    return bound
