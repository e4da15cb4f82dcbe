"""DICOM instances -> ``inference.preprocess.Slice`` (pixels in HU for CT, geometry in patient LPS mm).

Two paths, same result:

* fast: uncompressed little-endian pixel data is viewed in place with ``np.frombuffer`` at the offset
  where the header ends (pydicom parses only the header), so an 80 MiB series is not copied twice;
* general: everything else (JPEG baseline/extended/lossless, JPEG-LS, JPEG 2000, RLE, big endian)
  goes through pydicom's ``pixel_array`` with the pylibjpeg plugins (or python-gdcm when installed).

Pixel values: CT gets the modality LUT (RescaleSlope/Intercept) so values are Hounsfield units. MR gets
the rescale too when present (a linear map that the MR z-score normalisation does not care about).
MONOCHROME1 (minimum shown white) is inverted for non-CT images so that brighter always means more
signal; CT is not inverted because the photometric interpretation applies after the modality LUT and
HU keep their meaning. Multi-frame Enhanced CT/MR objects yield one Slice per frame, with geometry and
rescale from the per-frame or shared functional groups.

Errors are DomainErrors naming the SOP Instance UID (not PHI): CORRUPT_PIXEL_DATA,
UNSUPPORTED_TRANSFER_SYNTAX, INCONSISTENT_GEOMETRY, NOT_IMAGE (colour images).
"""

from __future__ import annotations

import io
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels.decoders.base import get_decoder
from pydicom.uid import UID

from inference.preprocess import Slice
from integration.domain.types import DomainError, Outcome

_PIXEL_DATA_TAG = b"\xe0\x7f\x10\x00"  # (7FE0,0010) little endian
_UNDEFINED_LENGTH = 0xFFFFFFFF
_INT_TYPES = {(8, 0): "<u1", (8, 1): "<i1", (16, 0): "<u2", (16, 1): "<i2", (32, 0): "<u4", (32, 1): "<i4"}


@dataclass(frozen=True)
class DecodedInstance:
    sop_instance_uid: str
    modality: str
    slices: list[Slice]


class _BufferReader:
    """A read-only file object over part of a buffer, so pydicom can parse a header without a copy of the part."""

    def __init__(self, view: memoryview) -> None:
        self._view = view
        self._pos = 0

    def read(self, size: int = -1) -> bytes:
        end = len(self._view) if size is None or size < 0 else min(len(self._view), self._pos + size)
        chunk = bytes(self._view[self._pos : end])
        self._pos = end
        return chunk

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: len(self._view)}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def tell(self) -> int:
        return self._pos

    def close(self) -> None:  # pydicom may close what it was given
        pass


def _uid(ds: Dataset) -> str:
    return str(ds.get("SOPInstanceUID", "(no SOP Instance UID)"))


def _floats(value: Any, n: int) -> tuple[float, ...] | None:
    if value is None:
        return None
    items = value if isinstance(value, Sequence) and not isinstance(value, str | bytes) else [value]
    try:
        values = tuple(float(v) for v in items)
    except (TypeError, ValueError):
        return None
    return values if len(values) == n else None


def _item(ds: Dataset, keyword: str) -> Dataset | None:
    seq = ds.get(keyword)
    return seq[0] if seq else None


def _group(ds: Dataset, frame: Dataset | None, keyword: str) -> Dataset | None:
    """A functional group macro for one frame: per-frame first, then shared (PS3.3 C.7.6.16)."""
    if frame is not None and (found := _item(frame, keyword)) is not None:
        return found
    shared = _item(ds, "SharedFunctionalGroupsSequence")
    return _item(shared, keyword) if shared is not None else None


@dataclass(frozen=True)
class _FrameInfo:
    position: tuple[float, float, float]
    orientation: tuple[float, float, float, float, float, float]
    spacing: tuple[float, float]
    slope: float
    intercept: float


def _geometry_error(ds: Dataset, what: str, frame: int | None = None) -> DomainError:
    where = f"instance {_uid(ds)}" + (f" frame {frame + 1}" if frame is not None else "")
    return DomainError(
        Outcome.INCONSISTENT_GEOMETRY,
        f"{where} has no usable {what}; its slice cannot be placed in space",
    )


def _frame_infos(ds: Dataset, n_frames: int) -> list[_FrameInfo]:
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if per_frame is None and n_frames > 1:
        raise DomainError(
            Outcome.INCONSISTENT_GEOMETRY,
            f"instance {_uid(ds)} has {n_frames} frames but no per-frame functional groups (geometry unknown)",
        )
    infos: list[_FrameInfo] = []
    for k in range(n_frames):
        frame = per_frame[k] if per_frame is not None and k < len(per_frame) else None
        if per_frame is not None:
            pos_src = _group(ds, frame, "PlanePositionSequence")
            ori_src = _group(ds, frame, "PlaneOrientationSequence")
            pix_src = _group(ds, frame, "PixelMeasuresSequence")
            rescale_src = _group(ds, frame, "PixelValueTransformationSequence") or ds
        else:
            pos_src = ori_src = pix_src = rescale_src = ds
        where = k if per_frame is not None else None
        position = _floats(pos_src.get("ImagePositionPatient") if pos_src else None, 3)
        if position is None:
            raise _geometry_error(ds, "ImagePositionPatient", where)
        orientation = _floats(ori_src.get("ImageOrientationPatient") if ori_src else None, 6)
        if orientation is None:
            raise _geometry_error(ds, "ImageOrientationPatient", where)
        spacing = _floats(pix_src.get("PixelSpacing") if pix_src else None, 2)
        if spacing is None or min(spacing) <= 0:
            raise _geometry_error(ds, "PixelSpacing", where)
        slope = float(rescale_src.get("RescaleSlope", 1.0) or 1.0)
        intercept = float(rescale_src.get("RescaleIntercept", 0.0) or 0.0)
        infos.append(_FrameInfo(position, orientation, spacing, slope, intercept))  # type: ignore[arg-type]
    return infos


def _check_grayscale(ds: Dataset) -> None:
    if int(ds.get("SamplesPerPixel", 1)) != 1 or not str(ds.get("PhotometricInterpretation", "MONOCHROME2")).startswith(
        "MONOCHROME"
    ):
        raise DomainError(
            Outcome.NOT_IMAGE,
            f"instance {_uid(ds)} is {ds.get('PhotometricInterpretation', '?')} with {ds.get('SamplesPerPixel')} "
            "samples per pixel; a CT/MR volume must be grayscale",
        )
    if "Rows" not in ds or "Columns" not in ds:
        raise DomainError(Outcome.CORRUPT_PIXEL_DATA, f"instance {_uid(ds)} has no Rows/Columns")


def _fix_unused_bits(raw: np.ndarray, ds: Dataset) -> np.ndarray:
    """Bits above BitsStored may hold garbage (overlays); mask them, sign-extending signed data."""
    allocated = raw.dtype.itemsize * 8
    stored = int(ds.get("BitsStored", allocated))
    if stored >= allocated:
        return raw
    if raw.dtype.kind == "i":
        shift = allocated - stored
        return (raw << shift) >> shift  # arithmetic shift right sign-extends
    return raw & ((1 << stored) - 1)


def _to_slices(ds: Dataset, frames: np.ndarray) -> list[Slice]:
    """Stored values (frames, rows, cols) -> Slices with the modality LUT and MONOCHROME1 handled."""
    modality = str(ds.get("Modality", "")).upper()
    infos = _frame_infos(ds, frames.shape[0])
    invert = str(ds.get("PhotometricInterpretation", "")) == "MONOCHROME1" and modality != "CT"
    if invert:
        stored = int(ds.get("BitsStored", frames.dtype.itemsize * 8))
        lo, hi = (-(1 << (stored - 1)), (1 << (stored - 1)) - 1) if frames.dtype.kind == "i" else (0, (1 << stored) - 1)
    slices: list[Slice] = []
    for k, info in enumerate(infos):
        pixels = frames[k].astype(np.float32)
        if invert:
            np.subtract(lo + hi, pixels, out=pixels)
        if info.slope != 1.0:
            pixels *= np.float32(info.slope)
        if info.intercept != 0.0:
            pixels += np.float32(info.intercept)
        slices.append(Slice(pixels, info.position, info.orientation, info.spacing))
    return slices


def _n_frames(ds: Dataset) -> int:
    try:
        return max(1, int(ds.get("NumberOfFrames", 1) or 1))
    except (TypeError, ValueError):
        return 1


def decode_dataset(ds: Dataset) -> DecodedInstance:
    """A fully read dataset (pixel data included) -> its slices, through pydicom's decoders."""
    _check_grayscale(ds)
    if "PixelData" not in ds:
        raise DomainError(Outcome.CORRUPT_PIXEL_DATA, f"instance {_uid(ds)} has no PixelData")
    syntax = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    if syntax is not None and not _decodable(syntax):
        raise DomainError(
            Outcome.UNSUPPORTED_TRANSFER_SYNTAX,
            f"instance {_uid(ds)}: no decoder for transfer syntax {syntax.name} ({syntax}); "
            "install pylibjpeg-libjpeg/-openjpeg/-rle or python-gdcm",
        )
    try:
        array = ds.pixel_array
    except Exception as err:  # a decoder that exists failed: the data is bad (ValueError, RuntimeError, ...)
        raise _corrupt(ds, err) from err
    frames = array.reshape(-1, int(ds.Rows), int(ds.Columns))
    expected = _n_frames(ds)
    if frames.shape[0] != expected:
        raise _corrupt(ds, ValueError(f"decoded {frames.shape[0]} frames, header says {expected}"))
    return DecodedInstance(_uid(ds), str(ds.get("Modality", "")), _to_slices(ds, frames))


def _decodable(syntax: UID) -> bool:
    try:
        return bool(get_decoder(syntax).is_available)
    except NotImplementedError:  # pydicom knows no decoder at all (video, private syntaxes)
        return False


def _corrupt(ds: Dataset, err: BaseException) -> DomainError:
    return DomainError(Outcome.CORRUPT_PIXEL_DATA, f"instance {_uid(ds)}: pixel data cannot be decoded ({err})")


def _uncompressed_view(ds: Dataset, buffer: memoryview, offset: int) -> np.ndarray | None:
    """Pixels straight from the buffer when the syntax is uncompressed little endian; None to use pydicom."""
    syntax = ds.file_meta.get("TransferSyntaxUID")
    if syntax is None or syntax.is_compressed or not syntax.is_little_endian or syntax.is_deflated:
        return None
    dtype = _INT_TYPES.get((int(ds.get("BitsAllocated", 0)), int(ds.get("PixelRepresentation", 0))))
    header = bytes(buffer[offset : offset + 12])
    if dtype is None or header[:4] != _PIXEL_DATA_TAG:
        return None
    if syntax.is_implicit_VR:
        (length,), start = struct.unpack("<I", header[4:8]), offset + 8
    elif header[4:6] in (b"OB", b"OW"):
        (length,), start = struct.unpack("<I", header[8:12]), offset + 12
    else:
        return None
    rows, cols, n_frames = int(ds.Rows), int(ds.Columns), _n_frames(ds)
    count = rows * cols * n_frames
    if length == _UNDEFINED_LENGTH or length < count * np.dtype(dtype).itemsize or start + length > len(buffer):
        raise _corrupt(
            ds, ValueError(f"PixelData holds {min(length, len(buffer) - start)} bytes, {rows}x{cols}x{n_frames} "
                           f"pixels of {np.dtype(dtype).itemsize} bytes are expected")
        )
    raw = np.frombuffer(buffer, dtype=dtype, count=count, offset=start)
    return _fix_unused_bits(raw, ds).reshape(n_frames, rows, cols)


def decode_part10(buffer: bytes | bytearray | memoryview) -> DecodedInstance:
    """One DICOM Part 10 object (a file, or one part of a WADO-RS multipart answer) -> its slices."""
    view = memoryview(buffer).cast("B")
    reader = _BufferReader(view)
    try:
        header = pydicom.dcmread(reader, stop_before_pixels=True, force=True)
    except (InvalidDicomError, EOFError, ValueError, struct.error, KeyError, OSError) as err:
        raise DomainError(Outcome.CORRUPT_PIXEL_DATA, f"a retrieved object is not readable DICOM ({err})") from err
    offset = reader.tell()
    if "TransferSyntaxUID" not in header.file_meta:
        raise DomainError(Outcome.CORRUPT_PIXEL_DATA, f"instance {_uid(header)} has no transfer syntax in its meta")
    _check_grayscale(header)
    frames = _uncompressed_view(header, view, offset)
    if frames is not None:
        return DecodedInstance(_uid(header), str(header.get("Modality", "")), _to_slices(header, frames))
    reader.seek(0)
    try:
        full = pydicom.dcmread(reader, force=True)
    except Exception as err:  # truncated elements etc.
        raise _corrupt(header, err) from err
    return decode_dataset(full)


def decode_file(path: str | Path) -> DecodedInstance:
    return decode_part10(Path(path).read_bytes())
