"""Wire formats of DICOMweb answers: DICOM JSON attributes (PS3.18 F.2) and multipart/related bodies.

Pure functions over bytes and dicts, used by ``dicomweb.DicomWebPacs``; no I/O.
"""

from __future__ import annotations

import re
from datetime import date, datetime, time, timedelta, timezone
from typing import Any

from integration.domain.limits import too_large
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


class MultipartReader:
    """Incremental multipart/related parser: feed network chunks, get whole parts as soon as they end.

    Lets the caller decode part k while part k+1 is still arriving, and holds about one part in memory
    instead of the whole answer. Bounded whatever the server sends: a part's header block, a part, and the
    number of parts have caps (``Outcome.TOO_LARGE`` beyond one); a part's Content-Length is a hint that is
    checked against the delimiter, never a reason to stop looking for it or to buffer beyond the part cap.
    """

    def __init__(
        self,
        boundary: bytes,
        *,
        max_header_bytes: int = 16 * 1024,
        max_part_bytes: int = 512 << 20,
        max_parts: int = 100_000,
    ) -> None:
        self._dash = b"--" + boundary
        self._delimiter = b"\r\n" + self._dash
        self._buf = bytearray()
        self._state = "preamble"  # preamble -> headers -> body -> headers ... -> closed
        self._scan = 0  # where to resume looking for the delimiter in a part body
        self._content_type = ""
        self._length: int | None = None
        self.max_header_bytes = max_header_bytes
        self.max_part_bytes = max_part_bytes
        self.max_parts = max_parts
        self.parts = 0  # parts started so far

    @property
    def closed(self) -> bool:
        return self._state == "closed"

    def feed(self, chunk: bytes | bytearray | memoryview) -> list[tuple[str, bytes | bytearray]]:
        """(Content-Type, payload) of every part completed by this chunk."""
        if self._state != "closed":
            self._buf += chunk
        parts: list[tuple[str, bytes | bytearray]] = []
        while self._step(parts):
            pass
        return parts

    def finish(self) -> list[tuple[str, bytes | bytearray]]:
        """Call at the end of the body: the parts still pending (a part whose Content-Length was wrong ends at
        its delimiter); a missing close-delimiter means the answer was cut short (``PACS_UNAVAILABLE``)."""
        parts: list[tuple[str, bytes | bytearray]] = []
        if self._state == "body" and self._length is not None:
            self._length = None  # the declared length runs past the body: the delimiter decides
            while self._step(parts):
                pass
        if self._state == "body":
            raise DomainError(Outcome.PACS_UNAVAILABLE, f"multipart answer ends inside part {self.parts}, without a "
                                                        "closing boundary (truncated answer?)")
        if self._state == "headers" and self._buf:
            raise DomainError(Outcome.PACS_UNAVAILABLE, "multipart part without a header end (truncated answer?)")
        if self._state == "headers":
            raise DomainError(Outcome.PACS_UNAVAILABLE,
                              f"multipart answer without its closing boundary after {self.parts} part(s) "
                              "(truncated answer?)")
        return parts

    def _step(self, parts: list[tuple[str, bytes | bytearray]]) -> bool:
        if self._state == "preamble":
            return self._skip_preamble()
        if self._state == "headers":
            return self._read_headers()
        if self._state == "body":
            return self._read_body(parts)
        return False

    def _skip_preamble(self) -> bool:
        buf = self._buf
        found = buf.find(self._dash)
        if found < 0:
            del buf[: max(0, len(buf) - len(self._dash))]
            return False
        del buf[: found + len(self._dash)]
        self._state = "headers"
        return True

    def _read_headers(self) -> bool:
        buf = self._buf
        if len(buf) < 2:
            return False
        if buf[:2] == b"--":  # close-delimiter: the epilogue is ignored
            self._state = "closed"
            buf.clear()
            return False
        header_end = buf.find(b"\r\n\r\n", 0, self.max_header_bytes + 4)
        if header_end < 0:
            if len(buf) > self.max_header_bytes + 4:
                raise too_large(f"a multipart part's header block is over {self.max_header_bytes} bytes",
                                str(self.max_header_bytes), "MULTIPART_MAX_HEADER_BYTES")
            return False
        self.parts += 1
        if self.parts > self.max_parts:
            raise too_large(f"the multipart answer has more than {self.max_parts} parts", str(self.max_parts),
                            "MULTIPART_MAX_PARTS")
        line_end = buf.find(b"\r\n")
        headers = _part_headers(bytes(buf[line_end + 2 : header_end]) if header_end > line_end else b"")
        self._content_type = headers.get("content-type", "")
        length = headers.get("content-length", "")
        self._length = int(length) if length.isdigit() and len(length) < 20 else None
        if self._length is not None and self._length > self.max_part_bytes:
            raise too_large(f"multipart part {self.parts} declares {self._length} bytes", str(self.max_part_bytes),
                            "MULTIPART_MAX_PART_BYTES")
        del buf[: header_end + 4]
        self._state, self._scan = "body", 0
        return True

    def _read_body(self, parts: list[tuple[str, bytes | bytearray]]) -> bool:
        buf, delimiter = self._buf, self._delimiter
        end = -1
        if self._length is not None:
            if len(buf) < self._length + len(delimiter):
                return False  # at most the (capped) declared length is waited for
            if buf[self._length : self._length + len(delimiter)] == delimiter:
                end = self._length
            else:
                self._length = None  # a wrong Content-Length: the delimiter decides, searched from the part's start
        if end < 0:
            end = buf.find(delimiter, self._scan)
            if end < 0:
                if len(buf) - len(delimiter) > self.max_part_bytes:
                    raise too_large(f"multipart part {self.parts} is over {self.max_part_bytes} bytes",
                                    str(self.max_part_bytes), "MULTIPART_MAX_PART_BYTES")
                self._scan = max(0, len(buf) - len(delimiter) + 1)
                return False
        if end > self.max_part_bytes:
            raise too_large(f"multipart part {self.parts} is {end} bytes", str(self.max_part_bytes),
                            "MULTIPART_MAX_PART_BYTES")
        rest = len(buf) - end - len(delimiter)
        if rest < end:
            # The part fills most of the buffer: hand the buffer itself over (truncated in place) and keep a copy of
            # the little that follows, instead of copying the part (half a megabyte per CT slice).
            self._buf = buf[end + len(delimiter) :]
            del buf[end:]
            parts.append((self._content_type, buf))
        else:
            with memoryview(buf) as view:
                parts.append((self._content_type, bytes(view[:end])))
            del buf[: end + len(delimiter)]
        self._state = "headers"
        return True


def split_multipart(body: bytes | bytearray | memoryview, boundary: bytes) -> list[tuple[str, bytes | bytearray]]:
    """(Content-Type, payload) for each part of a complete multipart body."""
    reader = MultipartReader(boundary)
    parts = reader.feed(body)
    return parts + reader.finish()


def _part_headers(block: bytes) -> dict[str, str]:
    headers: dict[str, str] = {}
    if not block:
        return headers
    for line in block.split(b"\r\n"):
        name, sep, value = line.partition(b":")
        if sep:
            headers[name.strip().lower().decode("latin-1")] = value.strip().decode("latin-1")
    return headers
