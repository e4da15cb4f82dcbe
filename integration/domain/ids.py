"""Identifiers that end up in URLs and file names, checked by pattern before they get there.

A DICOM UID (PS3.5 section 9.1): components of digits separated by dots, no component with a leading zero (a
single ``0`` is fine), at most 64 characters. An Orthanc id: the SHA-1 based identifier Orthanc gives patients,
studies, series and instances, five groups of eight lower-case hex digits joined by ``-``. Nothing else is
let through: ``../instances/x/file`` or ``x?y`` would otherwise change the URL a request goes to.
"""

from __future__ import annotations

import hashlib
import re

DICOM_UID_MAX_LENGTH = 64
_DICOM_UID = re.compile(r"(?:0|[1-9][0-9]*)(?:\.(?:0|[1-9][0-9]*))*")
_ORTHANC_ID = re.compile(r"[0-9a-f]{8}(?:-[0-9a-f]{8}){4}")


def is_dicom_uid(value: object) -> bool:
    return (
        isinstance(value, str)
        and 0 < len(value) <= DICOM_UID_MAX_LENGTH
        and _DICOM_UID.fullmatch(value) is not None
    )


def is_orthanc_id(value: object) -> bool:
    return isinstance(value, str) and _ORTHANC_ID.fullmatch(value) is not None


def shown(value: object, limit: int = 80) -> str:
    """A refused value as it may appear in a message: repr'd (control characters escaped) and cut."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}..."


def require_dicom_uid(value: object, what: str = "DICOM UID") -> str:
    """``value`` if it is a DICOM UID, else ``ValueError`` naming ``what``."""
    if not is_dicom_uid(value):
        raise ValueError(f"{what} {shown(value)} is not a DICOM UID (digits and dots, at most 64, PS3.5 9.1)")
    return str(value)


def require_orthanc_id(value: object, what: str = "Orthanc id") -> str:
    """``value`` if it is an Orthanc id, else ``ValueError`` naming ``what``."""
    if not is_orthanc_id(value):
        raise ValueError(f"{what} {shown(value)} is not an Orthanc id (5 groups of 8 hex digits joined by '-')")
    return str(value)


def opaque_name(value: str) -> str:
    """A name derived from ``value`` (SHA-256, hex) for files and ledger subjects: never a path, any length in."""
    return hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest()
