"""The few header elements the decoder needs, read by hand from an uncompressed little-endian DICOM object.

``dicom_decode.decode_part10``'s fast path: pydicom parses every element of a header and converts each value it is
asked for through its value hooks, about half a millisecond an instance, which is most of the decode time of a
512x512 CT series whose pixels are viewed in place. This reader walks the top-level data set once, keeps the values
of ``WANTED`` (converted as pydicom would: strings stripped, DS/IS as numbers, US as integers), skips everything
else by its length (sequences of undefined length by their items and delimiters), and stops at PixelData.

It only ever answers for objects it reads unambiguously. Anything unusual makes it answer None and the caller
parses with pydicom as before, so malformed and hostile input meets exactly the checks and messages it always did:
a value of another VR than the standard's, an empty or multi-valued number, a string that is not plain ASCII, a
UID that is not a UID, explicit-VR bytes that are not a VR, an enhanced multi-frame object (functional groups),
float pixel data, no PixelData, nesting deeper than ``MAX_DEPTH``, or lengths that run past the buffer.
"""

from __future__ import annotations

import re
import struct
from typing import Any

from integration.domain.ids import is_dicom_uid

#: tag -> (keyword, VR) of the elements ``dicom_decode`` reads from a single-frame CT/MR header.
WANTED: dict[int, tuple[str, bytes]] = {
    0x00080018: ("SOPInstanceUID", b"UI"),
    0x00080060: ("Modality", b"CS"),
    0x00200032: ("ImagePositionPatient", b"DS"),
    0x00200037: ("ImageOrientationPatient", b"DS"),
    0x00280002: ("SamplesPerPixel", b"US"),
    0x00280004: ("PhotometricInterpretation", b"CS"),
    0x00280008: ("NumberOfFrames", b"IS"),
    0x00280010: ("Rows", b"US"),
    0x00280011: ("Columns", b"US"),
    0x00280030: ("PixelSpacing", b"DS"),
    0x00280100: ("BitsAllocated", b"US"),
    0x00280101: ("BitsStored", b"US"),
    0x00280103: ("PixelRepresentation", b"US"),
    0x00281052: ("RescaleIntercept", b"DS"),
    0x00281053: ("RescaleSlope", b"DS"),
}
#: Shared / Per-frame Functional Groups: an enhanced multi-frame object, whose geometry lives in sequences.
_FUNCTIONAL_GROUPS = {0x52009229, 0x52009230}
_PIXEL_DATA = 0x7FE00010
_UNDEFINED = 0xFFFFFFFF
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
MAX_DEPTH = 8
_HEAD = struct.Struct("<HH")
_ITEM = struct.Struct("<HHI")
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_DS = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")
_IS = re.compile(r"[+-]?\d+")


class Unusual(Exception):
    """The object is not one this reader answers for; pydicom reads it."""


class NativeHeader:
    """The wanted elements by keyword, with the part of pydicom's ``Dataset`` interface the decoder uses."""

    __slots__ = ("_values",)

    def __init__(self, values: dict[str, Any]) -> None:
        self._values = values

    def get(self, keyword: str, default: Any = None) -> Any:
        return self._values.get(keyword, default)

    def __contains__(self, keyword: object) -> bool:
        return keyword in self._values


def read_native_header(view: memoryview, start: int, *, explicit: bool) -> tuple[NativeHeader, int] | None:
    """(the header, where the PixelData element starts) for the data set beginning at ``start`` (after the file
    meta group) in Explicit (``explicit``) or Implicit VR Little Endian; None where pydicom must read it."""
    try:
        return _read(view, start, explicit)
    except (Unusual, struct.error, UnicodeDecodeError, ValueError):
        return None


def _element(view: memoryview, pos: int, explicit: bool) -> tuple[int, bytes | None, int, int]:
    """(tag, VR or None when implicit, where the value starts, its length) of the element header at ``pos``."""
    group, element = _HEAD.unpack_from(view, pos)
    tag = group << 16 | element
    if not explicit or group == 0xFFFE:  # item tags have no VR in either encoding
        return tag, None, pos + 8, _U32.unpack_from(view, pos + 4)[0]
    vr = bytes(view[pos + 4 : pos + 6])
    if not (len(vr) == 2 and 65 <= vr[0] <= 90 and 65 <= vr[1] <= 90):
        raise Unusual("explicit VR bytes that are not a VR")  # e.g. implicit data under an explicit syntax
    if vr in _LONG_VRS:
        return tag, vr, pos + 12, _U32.unpack_from(view, pos + 8)[0]
    return tag, vr, pos + 8, _U16.unpack_from(view, pos + 6)[0]


def _read(view: memoryview, pos: int, explicit: bool) -> tuple[NativeHeader, int]:
    values: dict[str, Any] = {}
    size = len(view)
    while pos + 8 <= size:
        tag, vr, start, length = _element(view, pos, explicit)
        if tag == _PIXEL_DATA:
            return NativeHeader(values), pos
        if tag >= 0x7FE00000 or tag in _FUNCTIONAL_GROUPS or tag >> 16 == 0xFFFE:
            raise Unusual("float pixel data, functional groups or a stray delimiter")
        if length == _UNDEFINED:  # a sequence (or UN holding implicit-VR items)
            pos = _skip_items(view, start, explicit and vr != b"UN", 1)
            continue
        end = start + length
        if end > size:
            raise Unusual("an element runs past the object")
        wanted = WANTED.get(tag)
        if wanted is not None:
            keyword, kind = wanted
            if vr is not None and vr != kind:
                raise Unusual(f"{keyword} encoded as {vr!r}")
            values[keyword] = _value(kind, bytes(view[start:end]))
        pos = end
    raise Unusual("no PixelData")


def _skip_items(view: memoryview, pos: int, explicit: bool, depth: int) -> int:
    """Past the sequence delimiter of an undefined-length sequence whose items start at ``pos``."""
    if depth > MAX_DEPTH:
        raise Unusual("sequences nested too deep")
    size = len(view)
    while pos + 8 <= size:
        group, element, length = _ITEM.unpack_from(view, pos)
        pos += 8
        if group != 0xFFFE:
            raise Unusual("a sequence holds something other than items")
        if element == 0xE0DD:
            return pos
        if element != 0xE000:
            raise Unusual("an unexpected delimiter in a sequence")
        pos = _skip_item(view, pos, explicit, depth) if length == _UNDEFINED else pos + length
    raise Unusual("a sequence runs past the object")


def _skip_item(view: memoryview, pos: int, explicit: bool, depth: int) -> int:
    """Past the item delimiter of an undefined-length item whose elements start at ``pos``."""
    size = len(view)
    while pos + 8 <= size:
        tag, vr, start, length = _element(view, pos, explicit)
        if tag == 0xFFFEE00D:
            return start
        if tag >> 16 == 0xFFFE:
            raise Unusual("an unexpected delimiter in an item")
        pos = _skip_items(view, start, explicit and vr != b"UN", depth + 1) if length == _UNDEFINED else start + length
    raise Unusual("an item runs past the object")


def _text(raw: bytes) -> str:
    text = raw.rstrip(b"\x00 ").decode("ascii")
    if "\\" in text or text != text.lstrip() or not text.isprintable():
        raise Unusual("a multi-valued or padded string")
    return text


def _value(kind: bytes, raw: bytes) -> Any:
    if kind == b"US":
        if len(raw) != 2:
            raise Unusual("a US value that is not one 16-bit number")
        return _U16.unpack(raw)[0]
    if kind == b"UI":
        uid = _text(raw)
        if not is_dicom_uid(uid):
            raise Unusual("a UID that is not a UID")
        return uid
    if kind == b"CS":
        return _text(raw)
    items = raw.decode("ascii").strip(" \x00").split("\\")
    if items == [""]:
        raise Unusual("an empty number")
    pattern, number = (_IS, int) if kind == b"IS" else (_DS, float)
    numbers: list[Any] = []
    for item in items:
        if not pattern.fullmatch(item := item.strip(" ")):
            raise Unusual("a number pydicom would not read as one")
        numbers.append(number(item))
    return numbers[0] if len(numbers) == 1 else numbers
