"""This machine's IANA time zone, for reading local DICOM dates when no zone is configured.

``datetime.now().astimezone().tzinfo`` is only today's fixed offset; it would read a winter study with
summer time. This finds the zone's name (``TZ``, the ``/etc/localtime`` link, ``/etc/timezone``) so the
zone's DST rules apply, and falls back to the fixed offset only when no name can be found.
"""

from __future__ import annotations

import contextlib
import os
from datetime import datetime, tzinfo
from pathlib import Path
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError


def _zone(name: str) -> ZoneInfo | None:
    name = name.strip().lstrip(":")
    if not name:
        return None
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        return None


def machine_zone_name() -> str | None:
    """The IANA name of this machine's zone, or None when it cannot be told."""
    tz_env = os.environ.get("TZ", "")
    if tz_env.strip():  # libc uses TZ when set: its name, or (a POSIX rule) no name at all
        zone = _zone(tz_env)
        return zone.key if zone is not None else None
    candidates: list[str] = []
    localtime = Path("/etc/localtime")
    if localtime.is_symlink():
        target = str(localtime.resolve())
        if "zoneinfo/" in target:
            candidates.append(target.split("zoneinfo/", 1)[1])
    with contextlib.suppress(OSError):
        candidates.append(Path("/etc/timezone").read_text().strip())
    for name in candidates:
        zone = _zone(name)
        if zone is not None:
            return zone.key
    return None


def machine_zone() -> tzinfo:
    """This machine's zone with its DST rules; today's fixed offset when its name cannot be found."""
    name = machine_zone_name()
    if name is not None:
        return ZoneInfo(name)
    fixed = datetime.now().astimezone().tzinfo
    assert fixed is not None
    return fixed
