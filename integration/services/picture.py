"""Use case: the dashboard's picture of a patient's image, the key slice of the model-ready volume with the
attribution heat-map blended over it, as a PNG drawn on the server (no image library: numpy and zlib).

The volume is the one the model scored (``volumes/``, written by the ingest). When retention has removed it, the
study's chosen series is read back from the PACS through the engine's own reader and built again in memory (not
written back, and the study is not re-queued: looking at a page changes nothing).

``overlay_for`` is the heat-map layer: one value in 0..1 per voxel, from ``services.heatmap`` (the served model's
lesion maps; occlusion for a model without them), the map the heat-map series in the PACS shows too.
"""

from __future__ import annotations

import logging
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from inference import contract as C
from inference.preprocess import PreprocessError, series_tensor
from inference.runtime.base import ModelContractError, ModelUnavailableError
from integration.domain.records import StudyRecord
from integration.domain.types import DomainError
from integration.services.context import Services
from integration.services.heatmap import image_heatmap
from integration.services.results import image_only_inputs

log = logging.getLogger(__name__)

#: Display pixels per voxel side.
SCALE = 4
#: Heat-map values below this are not drawn (noise).
MIN_SHOWN = 0.15


@dataclass(frozen=True)
class Picture:
    png: bytes
    slice_index: int
    #: "volume" (the scored volume on disk) or "pacs" (read back from the PACS).
    source: str
    #: Whether a heat-map is drawn over the slice, and why not when it is not.
    overlay: bool
    note: str


def model_image(svc: Services, study: StudyRecord) -> tuple[np.ndarray, str] | None:
    """The study's model-ready volume (D, H, W) and where it came from; None when the study has none."""
    if study.volume_path:
        path = Path(study.volume_path)
        if path.resolve().parent == svc.volumes_dir.resolve():
            try:
                return _as_volume(np.load(path, allow_pickle=False)), "volume"
            except (OSError, ValueError):
                pass  # gone or unreadable: read back from the PACS below
    if not study.chosen_series_uid:
        return None
    try:
        modality, slices = svc.pacs.retrieve_series(study.study_uid, study.chosen_series_uid)
        return _as_volume(series_tensor(slices, modality)), "pacs"
    except (DomainError, PreprocessError) as err:
        log.info("picture of study %s: not read back from the PACS (%s)", study.study_uid, type(err).__name__)
        return None


def _as_volume(array: np.ndarray) -> np.ndarray:
    volume = np.asarray(array, dtype=np.float32).reshape(C.VOLUME_SHAPE)
    return volume


def overlay_for(svc: Services, patient_fhir_id: str, volume: np.ndarray) -> np.ndarray | None:
    """The heat-map over ``volume`` (same shape, values 0..1), from ``services.heatmap``: the served model's lesion
    maps (the probability of a finding per voxel, one model call), or occlusion for a model without them, scaled by
    the map's own top. It is the map of the image alone, the same the heat-map series in the PACS shows; None when
    the model cannot be reached."""
    del patient_fhir_id  # the map depends on the image and the model alone
    try:
        heat = image_heatmap(svc.model(), image_only_inputs(volume.reshape(C.input_spec("image").dims)))
    except (DomainError, ModelUnavailableError, ModelContractError) as err:
        log.info("no heat-map: %s", type(err).__name__)
        return None
    scaled: np.ndarray = np.clip(heat.values / heat.vmax, 0.0, 1.0).astype(np.float32)
    return scaled


def key_slice(volume: np.ndarray, overlay: np.ndarray | None) -> int:
    """The axial slice to show: where the heat-map is strongest; without one, the slice with most tissue."""
    if overlay is not None and overlay.max() > 0:
        return int(np.argmax(overlay.sum(axis=(1, 2))))
    tissue = (volume > C.VOLUME_PAD_VALUE + 0.05).sum(axis=(1, 2))
    return int(np.argmax(tissue))


def render(volume: np.ndarray, overlay: np.ndarray | None, index: int) -> bytes:
    """One axial slice as an RGB PNG, ``SCALE`` pixels per voxel: grey from the normalised values (-1..1), the
    heat-map from red (low) to yellow (high) blended over it where it is at least ``MIN_SHOWN``."""
    grey = np.clip((volume[index] + 1.0) * 127.5, 0, 255)
    rgb = np.repeat(grey[:, :, None], 3, axis=2)
    if overlay is not None:
        m = overlay[index]
        alpha = np.where(m >= MIN_SHOWN, 0.25 + 0.45 * m, 0.0)[:, :, None]
        heat = np.stack([np.full_like(m, 255.0), 255.0 * m, np.zeros_like(m)], axis=2)
        rgb = rgb * (1 - alpha) + heat * alpha
    pixels = np.kron(rgb.astype(np.uint8), np.ones((SCALE, SCALE, 1), dtype=np.uint8))
    return encode_png(pixels)


def encode_png(rgb: np.ndarray) -> bytes:
    """An 8-bit RGB image (H, W, 3) as PNG bytes (filter type 0 on every row)."""
    height, width, channels = rgb.shape
    assert channels == 3 and rgb.dtype == np.uint8
    raw = np.concatenate([np.zeros((height, 1), dtype=np.uint8), rgb.reshape(height, width * 3)], axis=1)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw.tobytes(), 6)) + chunk(
        b"IEND", b""
    )


def patient_picture(svc: Services, patient_fhir_id: str) -> Picture | None:
    """The picture of the patient's latest ready study (the one the current assessment scored); None without one."""
    study = svc.store.latest_ready_study(patient_fhir_id)
    if study is None:
        return None
    found = model_image(svc, study)
    if found is None:
        return None
    volume, source = found
    overlay = overlay_for(svc, patient_fhir_id, volume) if source == "volume" else None
    index = key_slice(volume, overlay)
    if overlay is None:
        note = ("no heat-map: the volume was read back from the PACS (the scored one is no longer on disk)"
                if source == "pacs" else "no heat-map: the model could not score the occluded variants")
    else:
        note = "heat-map: where the served model's image path sees findings (services.heatmap)"
    return Picture(render(volume, overlay, index), index, source, overlay is not None, note)
