"""The vitals window of an assessment, from one anchor, for both the vitals sync and the scoring. Pure.

An assessment describes the patient at ``window_end``: the time of the latest input (the study, or the
last vital sign), never later than now. The model reads the ``WINDOW_HOURS`` before it. The vitals sync
fetches from the earliest start any assessment of the patient can have, so the scorer never lacks data.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from inference import contract as C

WINDOW = timedelta(hours=C.WINDOW_HOURS)


def study_anchor(study_datetime: datetime | None, detected_at: datetime) -> datetime:
    """When a study counts as taken: its own date/time, or when the engine first saw it."""
    return study_datetime or detected_at


def window_end(now: datetime, study_at: datetime | None, last_vital_at: datetime | None) -> datetime | None:
    """The latest input (study or vital sign), not after ``now``, to the second; None without any input."""
    candidates = [t for t in (study_at, last_vital_at) if t is not None]
    if not candidates:
        return None
    return min(max(candidates), now).replace(microsecond=0)


def window_start(end: datetime) -> datetime:
    return end - WINDOW


def sync_since(now: datetime, study_at: datetime | None) -> datetime:
    """Where a vitals sync starts reading: the window before the study (or before now, without one)."""
    anchor = min(study_at, now) if study_at is not None else now
    return window_start(anchor)
