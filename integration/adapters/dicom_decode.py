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

Hostile input is refused before anything is allocated for it: Rows, Columns, NumberOfFrames and BitsAllocated
are read from the header alone and checked against ``domain.limits.ImageLimits`` (TOO_LARGE), uncompressed pixel
data must be exactly as long as declared, a transfer syntax must agree with the encoding it names (native vs
encapsulated), each JPEG/JPEG-LS/JPEG 2000 codestream must declare the header's size (a codec allocates what its
codestream says), and a deflated object is inflated in bounded steps before pydicom inflates it whole.

Errors are DomainErrors naming the SOP Instance UID (not PHI): CORRUPT_PIXEL_DATA,
UNSUPPORTED_TRANSFER_SYNTAX, INCONSISTENT_GEOMETRY, NOT_IMAGE (colour images), TOO_LARGE.
"""

from __future__ import annotations

import io
import struct
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.encaps import generate_frames
from pydicom.errors import InvalidDicomError
from pydicom.pixels.decoders.base import get_decoder
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from inference.preprocess import Slice, block_factors, block_geometry, block_means
from integration.adapters.dicom_header import NativeHeader, read_native_header
from integration.domain.ids import is_dicom_uid, shown
from integration.domain.limits import ImageLimits, too_large
from integration.domain.types import DomainError, Outcome

_PIXEL_DATA_TAG = b"\xe0\x7f\x10\x00"  # (7FE0,0010) little endian
_ITEM_TAG = b"\xfe\xff\x00\xe0"  # (FFFE,E000) little endian: the first item of encapsulated pixel data
_UNDEFINED_LENGTH = 0xFFFFFFFF
_INT_TYPES = {(8, 0): "<u1", (8, 1): "<i1", (16, 0): "<u2", (16, 1): "<i2", (32, 0): "<u4", (32, 1): "<i4"}
_BITS_ALLOCATED = (8, 16, 32)
#: Explicit VR elements with a 4-byte length (PS3.5 7.1.2).
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
_NATIVE_LITTLE_ENDIAN = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
#: What the decoder reads a header through: pydicom's data set, or the hand-read one of the fast path.
Header = Dataset | NativeHeader


@dataclass(frozen=True)
class DecodedInstance:
    sop_instance_uid: str
    modality: str
    slices: list[Slice]


class BufferReader:
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


def _uid(ds: Header) -> str:
    """The SOP Instance UID for messages; anything that is not a UID is shown escaped and cut."""
    uid = str(ds.get("SOPInstanceUID", "") or "")
    if not uid:
        return "(no SOP Instance UID)"
    return uid if is_dicom_uid(uid) else shown(uid)


def _floats(value: Any, n: int) -> tuple[float, ...] | None:
    if value is None:
        return None
    items = value if isinstance(value, Sequence) and not isinstance(value, str | bytes) else [value]
    try:
        values = tuple(float(v) for v in items)
    except (TypeError, ValueError):
        return None
    return values if len(values) == n else None


def _item(ds: Header, keyword: str) -> Dataset | None:
    seq = ds.get(keyword)
    return seq[0] if seq else None


def _group(ds: Header, frame: Dataset | None, keyword: str) -> Dataset | None:
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


def _geometry_error(ds: Header, what: str, frame: int | None = None) -> DomainError:
    where = f"instance {_uid(ds)}" + (f" frame {frame + 1}" if frame is not None else "")
    return DomainError(
        Outcome.INCONSISTENT_GEOMETRY,
        f"{where} has no usable {what}; its slice cannot be placed in space",
    )


def _frame_infos(ds: Header, n_frames: int) -> list[_FrameInfo]:
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if per_frame is None and n_frames > 1:
        raise DomainError(
            Outcome.INCONSISTENT_GEOMETRY,
            f"instance {_uid(ds)} has {n_frames} frames but no per-frame functional groups (geometry unknown)",
        )
    infos: list[_FrameInfo] = []
    for k in range(n_frames):
        frame = per_frame[k] if per_frame is not None and k < len(per_frame) else None
        pos_src: Header | None
        ori_src: Header | None
        pix_src: Header | None
        rescale_src: Header
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


def _check_grayscale(ds: Header) -> None:
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


def _fix_unused_bits(raw: np.ndarray, ds: Header) -> np.ndarray:
    """Bits above BitsStored may hold garbage (overlays); mask them, sign-extending signed data."""
    allocated = raw.dtype.itemsize * 8
    stored = int(ds.get("BitsStored", allocated))
    if stored >= allocated or raw.size == 0:
        return raw
    # Most writers leave those bits clear: one reduction says so, and the frame is not copied to mask nothing.
    if raw.dtype.kind == "i":
        if -(1 << (stored - 1)) <= int(raw.min()) and int(raw.max()) < 1 << (stored - 1):
            return raw
        shift = allocated - stored
        return (raw << shift) >> shift  # arithmetic shift right sign-extends
    if int(raw.max()) < 1 << stored:
        return raw
    return raw & ((1 << stored) - 1)


def _to_slices(ds: Header, frames: np.ndarray, reduce: bool = False) -> list[Slice]:
    """Stored values (frames, rows, cols) -> Slices with the modality LUT and MONOCHROME1 handled. ``reduce``:
    planes finer than the model's grid become block means of the stored values first (``block_means``; the LUT is
    linear, so it applies to the means as to each value), never a full-size float copy of the frame."""
    modality = str(ds.get("Modality", "")).upper()
    infos = _frame_infos(ds, frames.shape[0])
    invert = str(ds.get("PhotometricInterpretation", "")) == "MONOCHROME1" and modality != "CT"
    if invert:
        stored = int(ds.get("BitsStored", frames.dtype.itemsize * 8))
        lo, hi = (-(1 << (stored - 1)), (1 << (stored - 1)) - 1) if frames.dtype.kind == "i" else (0, (1 << stored) - 1)
    slices: list[Slice] = []
    rows, cols = frames.shape[1:]
    for k, info in enumerate(infos):
        fr, fc = block_factors(info.spacing, rows, cols) if reduce else (1, 1)
        if (fr, fc) != (1, 1):
            means = block_means(frames[k], fr, fc)
            if invert:
                np.subtract(np.float32(lo + hi), means, out=means)
            if info.slope != 1.0:
                means *= np.float32(info.slope)
            if info.intercept != 0.0:
                means += np.float32(info.intercept)
            position, spacing, centre = block_geometry(info.position, info.orientation, info.spacing, rows, cols,
                                                       fr, fc)
            slices.append(Slice(means, position, info.orientation, spacing, centre))
            continue
        pixels = np.empty(frames.shape[1:], dtype=np.float32)
        if invert:  # stored values reversed, then the modality LUT
            np.subtract(np.float32(lo + hi), frames[k], out=pixels, dtype=np.float32)
            source: np.ndarray = pixels
        else:
            source = frames[k]
        # One pass over the stored values where one will do (a 512x512 frame: the cast is the rescale).
        if info.slope != 1.0:
            np.multiply(source, np.float32(info.slope), out=pixels, dtype=np.float32)
            if info.intercept != 0.0:
                pixels += np.float32(info.intercept)
        elif info.intercept != 0.0:
            np.add(source, np.float32(info.intercept), out=pixels, dtype=np.float32)
        elif source is not pixels:
            pixels[...] = source
        slices.append(Slice(pixels, info.position, info.orientation, info.spacing))
    return slices


def _n_frames(ds: Header) -> int:
    try:
        return max(1, int(ds.get("NumberOfFrames", 1) or 1))
    except (TypeError, ValueError):
        return 1


def _declared(ds: Header, limits: ImageLimits, series_bytes_left: int | None) -> tuple[int, int, int, int]:
    """(rows, columns, frames, bits allocated) as the header declares them, refused before a pixel is decoded
    when they are unusable (CORRUPT_PIXEL_DATA) or beyond the limits (TOO_LARGE): pydicom and the codecs
    allocate from these numbers."""
    try:
        rows, columns = int(ds.get("Rows")), int(ds.get("Columns"))
        bits = int(ds.get("BitsAllocated", 0) or 0)
    except (AttributeError, TypeError, ValueError) as err:
        raise DomainError(Outcome.CORRUPT_PIXEL_DATA, f"instance {_uid(ds)} has unreadable Rows/Columns/"
                                                      "BitsAllocated") from err
    if rows <= 0 or columns <= 0:
        raise DomainError(Outcome.CORRUPT_PIXEL_DATA, f"instance {_uid(ds)} declares {rows} x {columns} pixels")
    if bits not in _BITS_ALLOCATED:
        raise DomainError(Outcome.CORRUPT_PIXEL_DATA,
                          f"instance {_uid(ds)} declares BitsAllocated {bits}; a CT/MR image has 8, 16 or 32")
    frames = _n_frames(ds)
    decoded = limits.check_image(rows, columns, frames, f"instance {_uid(ds)}")
    if series_bytes_left is not None and decoded > series_bytes_left:
        raise too_large(f"the series would decode to more than {limits.max_series_bytes} bytes at instance "
                        f"{_uid(ds)}", str(limits.max_series_bytes), "MAX_SERIES_BYTES")
    return rows, columns, frames, bits


def _native_length(ds: Header, length: int, rows: int, columns: int, frames: int, bits: int) -> None:
    """Uncompressed pixel data must hold exactly what the header declares (plus one pad byte to an even length)."""
    expected = rows * columns * frames * bits // 8
    if length == expected or (expected % 2 and length == expected + 1):
        return
    problem = "truncated" if length < expected else "longer than declared"
    raise DomainError(
        Outcome.CORRUPT_PIXEL_DATA,
        f"instance {_uid(ds)}: PixelData is {problem}: {length} bytes for {rows}x{columns}x{frames} pixels of "
        f"{bits} bits ({expected} bytes)",
    )


def _syntax_lies(ds: Header, syntax: UID, encapsulated: bool) -> None:
    """A compressed syntax has encapsulated (fragmented, undefined-length) pixel data and a native one has not;
    the other way round the transfer syntax lies about the encoding."""
    if syntax.is_encapsulated != encapsulated:
        kind = "encapsulated (compressed)" if syntax.is_encapsulated else "native (uncompressed)"
        actual = "with a defined length" if syntax.is_encapsulated else "encapsulated in fragments"
        raise DomainError(
            Outcome.CORRUPT_PIXEL_DATA,
            f"instance {_uid(ds)}: transfer syntax {syntax.name} declares {kind} pixel data, but PixelData is "
            f"{actual}",
        )


def _codestream_size(frame: bytes) -> tuple[int, int] | None:
    """(rows, columns) that a JPEG, JPEG-LS or JPEG 2000 codestream declares for itself; None when it does not say.
    A codec allocates what its codestream says, whatever the DICOM header says."""
    if frame[:4] != b"\xff\x4f\xff\x51" and frame[4:8] == b"jP  ":  # a JP2 file wrapped around the codestream
        at = frame.find(b"\xff\x4f\xff\x51", 0, 4096)
        frame = frame[at:] if at >= 0 else b""
    if frame[:4] == b"\xff\x4f\xff\x51":  # J2K: SOC, then SIZ: Lsiz Rsiz Xsiz Ysiz XOsiz YOsiz
        if len(frame) < 24:
            return None
        xsiz, ysiz, x0, y0 = struct.unpack(">IIII", frame[8:24])
        return ysiz - y0, xsiz - x0
    if frame[:2] != b"\xff\xd8":
        return None
    pos = 2
    while pos + 4 <= len(frame):  # JPEG / JPEG-LS markers up to the first SOFn
        if frame[pos] != 0xFF:
            return None
        marker = frame[pos + 1]
        if marker == 0xFF or marker == 0x01 or 0xD0 <= marker <= 0xD8:
            pos += 1 if marker == 0xFF else 2
            continue
        if (0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC)) or marker == 0xF7:
            if pos + 9 > len(frame):
                return None
            rows, columns = struct.unpack(">HH", frame[pos + 5 : pos + 9])
            return rows, columns
        if marker == 0xDA:
            return None
        (length,) = struct.unpack(">H", frame[pos + 2 : pos + 4])
        pos += 2 + length
    return None


def _check_codestreams(ds: Dataset, rows: int, columns: int, frames: int) -> None:
    for k, frame in enumerate(generate_frames(ds.PixelData, number_of_frames=frames)):
        size = _codestream_size(frame[:65536])
        if size is not None and (size[1] != columns or size[0] not in (0, rows)):  # JPEG: 0 rows = set by DNL
            raise DomainError(
                Outcome.CORRUPT_PIXEL_DATA,
                f"instance {_uid(ds)} frame {k + 1}: the codestream declares {size[0]} x {size[1]} pixels, the "
                f"header {rows} x {columns}",
            )
        if k + 1 >= frames:
            return


def decode_dataset(
    ds: Dataset, limits: ImageLimits | None = None, series_bytes_left: int | None = None, *, reduce: bool = False
) -> DecodedInstance:
    """A fully read dataset (pixel data included) -> its slices, through pydicom's decoders; every size the
    header and the codestreams declare is checked against ``limits`` first. ``reduce``: see ``_to_slices``."""
    limits = limits or ImageLimits()
    _check_grayscale(ds)
    if "PixelData" not in ds:
        raise DomainError(Outcome.CORRUPT_PIXEL_DATA, f"instance {_uid(ds)} has no PixelData")
    syntax = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    if syntax is not None and not _decodable(syntax):
        raise _unsupported(ds, syntax)
    rows, columns, frames, bits = _declared(ds, limits, series_bytes_left)
    if syntax is not None:
        # Read from a file, encapsulated data has an undefined length; built in memory, it starts with an item.
        starts_with_item = bytes(ds.PixelData[:4]) == _ITEM_TAG
        _syntax_lies(ds, syntax, ds["PixelData"].is_undefined_length or (syntax.is_encapsulated and starts_with_item))
        if syntax.is_encapsulated:
            try:
                _check_codestreams(ds, rows, columns, frames)
            except (ValueError, struct.error) as err:  # broken fragment items
                raise _corrupt(ds, err) from err
        else:
            _native_length(ds, len(ds.PixelData), rows, columns, frames, bits)
    try:
        ds.pixel_array_options(allow_excess_frames=False)  # never more frames than the (checked) header says
        array = ds.pixel_array
    except Exception as err:  # a decoder that exists failed: the data is bad (ValueError, RuntimeError, ...)
        raise _corrupt(ds, err) from err
    if array.size != rows * columns * frames:
        raise _corrupt(ds, ValueError(f"decoded {array.size} pixels, header says {rows}x{columns}x{frames}"))
    return DecodedInstance(_uid(ds), str(ds.get("Modality", "")),
                           _to_slices(ds, array.reshape(frames, rows, columns), reduce))


def _decodable(syntax: UID) -> bool:
    if not syntax.is_transfer_syntax:
        return False
    try:
        return bool(get_decoder(syntax).is_available)
    except NotImplementedError:  # pydicom knows no decoder at all (video, private syntaxes)
        return False


def _unsupported(ds: Header, syntax: UID) -> DomainError:
    return DomainError(
        Outcome.UNSUPPORTED_TRANSFER_SYNTAX,
        f"instance {_uid(ds)}: no decoder for transfer syntax {syntax.name} ({shown(str(syntax))}); "
        "install pylibjpeg-libjpeg/-openjpeg/-rle or python-gdcm",
    )


def _corrupt(ds: Header, err: BaseException) -> DomainError:
    return DomainError(Outcome.CORRUPT_PIXEL_DATA, f"instance {_uid(ds)}: pixel data cannot be decoded ({err})")


def _file_meta(view: memoryview) -> tuple[str | None, int]:
    """(TransferSyntaxUID, where the file meta group ends) read by hand, before pydicom reads anything: a
    deflated dataset is inflated whole by ``dcmread``, so its size must be known first."""
    if bytes(view[128:132]) != b"DICM":
        return None, 0
    pos, syntax = 132, None
    while pos + 8 <= len(view):
        group, element = struct.unpack("<HH", view[pos : pos + 4])
        if group != 2:
            break
        vr = bytes(view[pos + 4 : pos + 6])
        if vr in _LONG_VRS:
            if pos + 12 > len(view):
                break
            (length,) = struct.unpack("<I", view[pos + 8 : pos + 12])
            start = pos + 12
        else:
            (length,) = struct.unpack("<H", view[pos + 6 : pos + 8])
            start = pos + 8
        if element == 0x0010:
            syntax = bytes(view[start : start + length]).rstrip(b"\x00 ").decode("ascii", "replace")
        pos = start + length
    return syntax, pos


def _check_inflated_size(view: memoryview, offset: int, limit: int) -> None:
    """Deflated Explicit VR Little Endian: inflate in bounded steps; a dataset over ``limit`` is a zip bomb."""
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    total, data = 0, bytes(view[offset:])
    while data:
        total += len(inflater.decompress(data, 1 << 20))
        if total > limit:
            raise too_large(f"a deflated object inflates to more than {limit} bytes", str(limit),
                            "MULTIPART_MAX_PART_BYTES")
        data = inflater.unconsumed_tail
        if inflater.eof:
            break


def _pixel_element(syntax: UID, view: memoryview, offset: int) -> tuple[int, int] | None:
    """(where the PixelData value starts, its length: 0xFFFFFFFF when encapsulated) from the element header
    where pydicom stopped; None when no PixelData follows there."""
    head = bytes(view[offset : offset + 12])
    tag = _PIXEL_DATA_TAG if syntax.is_little_endian else b"\x7f\xe0\x00\x10"
    if head[:4] != tag or len(head) < 8:
        return None
    order = "<" if syntax.is_little_endian else ">"
    if syntax.is_implicit_VR:
        return offset + 8, struct.unpack(order + "I", head[4:8])[0]
    if head[4:6] in _LONG_VRS and len(head) == 12:
        return offset + 12, struct.unpack(order + "I", head[8:12])[0]
    return offset + 8, struct.unpack(order + "H", head[6:8])[0]


def decode_part10(
    buffer: bytes | bytearray | memoryview, limits: ImageLimits | None = None, series_bytes_left: int | None = None,
    *, reduce: bool = False,
) -> DecodedInstance:
    """One DICOM Part 10 object (a file, or one part of a WADO-RS multipart answer) -> its slices (``reduce``: as
    block means where finer than the model's grid, see ``_to_slices``).

    Only the header is parsed before the declared sizes are checked against ``limits`` (and against what is
    left of the series' byte budget, ``series_bytes_left``); a deflated object is measured before it is read."""
    limits = limits or ImageLimits()
    view = memoryview(buffer).cast("B")
    syntax_text, meta_end = _file_meta(view)
    if syntax_text is not None:
        if not UID(syntax_text).is_transfer_syntax:
            raise DomainError(Outcome.UNSUPPORTED_TRANSFER_SYNTAX,
                              f"a retrieved object names {shown(syntax_text)} as its transfer syntax")
        if UID(syntax_text).is_deflated:
            _check_inflated_size(view, meta_end, limits.multipart_max_part_bytes)
    found = None
    if syntax_text is not None and syntax_text in _NATIVE_LITTLE_ENDIAN:  # the fast path: the header read by hand
        found = read_native_header(view, meta_end, explicit=syntax_text == ExplicitVRLittleEndian)
        syntax = UID(syntax_text)
    reader = BufferReader(view)
    header: Header
    if found is not None:
        header, offset = found
    else:
        try:
            header = pydicom.dcmread(reader, stop_before_pixels=True, force=True)
        except (InvalidDicomError, EOFError, ValueError, struct.error, KeyError, OSError, zlib.error) as err:
            raise DomainError(Outcome.CORRUPT_PIXEL_DATA, f"a retrieved object is not readable DICOM ({err})") from err
        offset = reader.tell()
        if "TransferSyntaxUID" not in header.file_meta:
            raise DomainError(Outcome.CORRUPT_PIXEL_DATA,
                              f"instance {_uid(header)} has no transfer syntax in its meta")
        syntax = header.file_meta.TransferSyntaxUID
    _check_grayscale(header)
    if not _decodable(syntax):
        raise _unsupported(header, syntax)
    rows, columns, frames, bits = _declared(header, limits, series_bytes_left)
    element = None if syntax.is_deflated else _pixel_element(syntax, view, offset)
    if element is not None:
        start, length = element
        _syntax_lies(header, syntax, length == _UNDEFINED_LENGTH)
        if not syntax.is_encapsulated:
            _native_length(header, min(length, len(view) - start), rows, columns, frames, bits)
            if syntax.is_little_endian:
                return DecodedInstance(_uid(header), str(header.get("Modality", "")),
                                       _to_slices(header, _native_view(header, view, start, rows, columns, frames),
                                                  reduce))
    reader.seek(0)
    try:
        full = pydicom.dcmread(reader, force=True)
    except Exception as err:  # truncated elements etc.
        raise _corrupt(header, err) from err
    return decode_dataset(full, limits, series_bytes_left, reduce=reduce)


def _native_view(ds: Header, view: memoryview, start: int, rows: int, columns: int, frames: int) -> np.ndarray:
    """Uncompressed little-endian pixels straight from the buffer, without a copy (lengths already checked)."""
    dtype = _INT_TYPES.get((int(ds.get("BitsAllocated", 0)), int(ds.get("PixelRepresentation", 0))))
    if dtype is None:
        raise DomainError(Outcome.CORRUPT_PIXEL_DATA,
                          f"instance {_uid(ds)} has PixelRepresentation {ds.get('PixelRepresentation')}")
    raw = np.frombuffer(view, dtype=dtype, count=rows * columns * frames, offset=start)
    return _fix_unused_bits(raw, ds).reshape(frames, rows, columns)


@dataclass
class SeriesSlices:
    """One series' slices as its instances are decoded, whichever reader brings them (WADO-RS parts, spooled files,
    C-GET sub-operations): each instance gets what is left of the series' decoded-byte budget, the image count is
    checked after each, and the time spent decoding is summed (the ``decode`` stage, where the reader reports it)."""

    series_uid: str
    limits: ImageLimits
    reduce: bool = False  # planes as block means (``decode_part10``)
    source: str = "sent"  # how the messages say the images came: "sent" (a PACS), "holds" (the spool)
    modality: str = ""
    slices: list[Slice] = field(default_factory=list)
    decoded_bytes: int = 0
    decoding_s: float = 0.0

    def add(self, buffer: bytes | bytearray | memoryview, expect_sop_instance: str | None = None) -> DecodedInstance:
        """Decode one Part 10 object into the series; ``expect_sop_instance``: the UID its request named."""
        limits = self.limits
        started = time.perf_counter()
        decoded = decode_part10(buffer, limits, limits.max_series_bytes - self.decoded_bytes, reduce=self.reduce)
        self.decoding_s += time.perf_counter() - started
        if expect_sop_instance is not None and decoded.sop_instance_uid != expect_sop_instance:
            raise DomainError(Outcome.CORRUPT_PIXEL_DATA, f"instance {expect_sop_instance}: the data set names "
                              "another SOP Instance UID than its C-STORE request")
        self.modality = self.modality or decoded.modality.upper()
        self.slices.extend(decoded.slices)
        self.decoded_bytes += sum(s.pixels.nbytes for s in decoded.slices)
        if len(self.slices) > limits.max_slices_per_series:
            raise too_large(f"series {self.series_uid} {self.source} more than {limits.max_slices_per_series} images",
                            str(limits.max_slices_per_series), "MAX_SLICES_PER_SERIES")
        return decoded


def decode_file(path: str | Path, limits: ImageLimits | None = None) -> DecodedInstance:
    return decode_part10(Path(path).read_bytes(), limits)


def sorted_along_normal(slices: list[Slice]) -> list[Slice]:
    """File order means nothing; order by position along the first slice's normal (stack_slices agrees)."""
    orient = np.asarray(slices[0].orientation, dtype=np.float64)
    normal = np.cross(orient[:3], orient[3:])
    along = np.asarray([s.position for s in slices], dtype=np.float64) @ normal
    return [slices[i] for i in np.argsort(along, kind="stable")]
