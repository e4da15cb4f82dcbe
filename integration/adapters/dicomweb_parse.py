"""Wire formats of DICOMweb answers: DICOM JSON attributes (PS3.18 F.2) and multipart/related bodies.

Pure functions over bytes and dicts, used by ``dicomweb.DicomWebPacs``; no I/O.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import date, datetime, time, timedelta, timezone
from typing import Any

from integration.domain.types import DomainError, Outcome

# -- DICOM JSON ---------------------------------------------------------------------------------------------


def attr_values(item: dict[str, Any], tag: str) -> list[Any]:
    """The Value array of one attribute (tag as 8 hex digits), [] when absent or empty."""
    element = item.get(tag) or item.get(tag.lower())
    if not isinstance(element, dict):
        return []
    values = element.get("Value")
    return values if isinstance(values, list) else []


def attr_str(item: dict[str, Any], tag: str) -> str:
    values = attr_values(item, tag)
    if not values or values[0] is None:
        return ""
    first = values[0]
    if isinstance(first, dict):  # PN: {"Alphabetic": ...}
        return str(first.get("Alphabetic", ""))
    return str(first).strip()


def attr_strs(item: dict[str, Any], tag: str) -> tuple[str, ...]:
    return tuple(str(v).strip() for v in attr_values(item, tag) if v is not None)


def attr_int(item: dict[str, Any], tag: str) -> int | None:
    try:
        return int(float(attr_str(item, tag)))
    except ValueError:
        return None


def attr_float(item: dict[str, Any], tag: str) -> float | None:
    try:
        return float(attr_str(item, tag))
    except ValueError:
        return None


def attr_floats(item: dict[str, Any], tag: str, n: int) -> tuple[float, ...] | None:
    try:
        values = tuple(float(v) for v in attr_values(item, tag))
    except (TypeError, ValueError):
        return None
    return values if len(values) == n else None


_TM = re.compile(r"^(\d{2})(\d{2})?(\d{2})?(?:\.(\d{1,6}))?$")
_TZ = re.compile(r"^([+-])(\d{2})(\d{2})$")


def dicom_datetime(da: str, tm: str = "", tz_offset: str = "") -> datetime | None:
    """StudyDate (+ StudyTime, + TimezoneOffsetFromUTC) -> datetime; naive unless an offset is given.

    Accepts the old ACR-NEMA forms too (``1987.03.14``, ``10:15:00``). None when the date is unusable.
    """
    digits = da.replace(".", "").strip()
    try:
        day = date(int(digits[:4]), int(digits[4:6]), int(digits[6:8]))
    except (ValueError, IndexError):
        return None
    clock = time()
    match = _TM.match(tm.replace(":", "").strip())
    if match:
        hh, mm, ss, frac = match.groups()
        try:
            clock = time(int(hh), int(mm or 0), min(int(ss or 0), 59), int((frac or "0").ljust(6, "0")))
        except ValueError:
            clock = time()
    when = datetime.combine(day, clock)
    offset = _TZ.match(tz_offset.strip())
    if offset:
        sign, hours, minutes = offset.groups()
        delta = timedelta(hours=int(hours), minutes=int(minutes))
        when = when.replace(tzinfo=timezone(-delta if sign == "-" else delta))
    return when


# -- multipart/related ----------------------------------------------------------------------------------


def multipart_boundary(content_type: str) -> bytes:
    """The boundary parameter of a multipart Content-Type header (RFC 2046), quoted or not."""
    if not content_type.lower().startswith("multipart/"):
        raise DomainError(Outcome.PACS_UNAVAILABLE, f"PACS answered with {content_type or 'no content type'}, "
                                                    "not multipart/related")
    match = re.search(r'boundary\s*=\s*(?:"([^"]+)"|([^;\s]+))', content_type, re.IGNORECASE)
    if not match:
        raise DomainError(Outcome.PACS_UNAVAILABLE, f"multipart answer without a boundary: {content_type}")
    return (match.group(1) or match.group(2)).encode("latin-1")


def split_multipart(body: bytes | bytearray | memoryview, boundary: bytes) -> Iterator[tuple[str, memoryview]]:
    """(Content-Type, payload view) for each part; payloads are views into ``body``, not copies."""
    data = body if isinstance(body, bytes | bytearray) else bytes(body)
    view = memoryview(data)
    dash = b"--" + boundary
    delimiter = b"\r\n" + dash
    pos = data.find(dash)
    if pos < 0:
        return
    pos += len(dash)
    while True:
        if data[pos : pos + 2] == b"--":  # close-delimiter
            return
        line_end = data.find(b"\r\n", pos)
        if line_end < 0:
            raise DomainError(Outcome.PACS_UNAVAILABLE, "multipart answer ends inside a boundary line")
        header_end = data.find(b"\r\n\r\n", line_end)
        if header_end < 0:
            raise DomainError(Outcome.PACS_UNAVAILABLE, "multipart part without a header end (truncated answer?)")
        headers = _part_headers(bytes(data[line_end + 2 : header_end]))
        start = header_end + 4
        end = -1
        length = headers.get("content-length")
        if length is not None and length.isdigit():
            candidate = start + int(length)
            if data[candidate : candidate + len(delimiter)] == delimiter:
                end = candidate
        if end < 0:
            end = data.find(delimiter, start)
        if end < 0:
            raise DomainError(Outcome.PACS_UNAVAILABLE, "multipart answer ends inside a part (truncated answer?)")
        yield headers.get("content-type", ""), view[start:end]
        pos = end + len(delimiter)


def _part_headers(block: bytes) -> dict[str, str]:
    headers: dict[str, str] = {}
    if not block:
        return headers
    for line in block.split(b"\r\n"):
        name, sep, value = line.partition(b":")
        if sep:
            headers[name.strip().lower().decode("latin-1")] = value.strip().decode("latin-1")
    return headers
