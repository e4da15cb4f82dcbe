"""The vitals window of an assessment, from one anchor, for both the vitals sync and the scoring. Pure.

An assessment describes the patient at ``window_end``: the time of the latest input (the study, or the
last vital sign). The model reads the ``WINDOW_HOURS`` before it. The vitals sync fetches from the earliest
start any assessment of the patient can have, so the scorer never lacks data.

The end depends on the inputs only, never on the clock: a study counts as taken no later than the engine
first saw it (a modality clock running fast dates studies in the future), so scoring the same inputs at
any later time gives the same end, and the same assessment identity.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from inference import contract as C

WINDOW = timedelta(hours=C.WINDOW_HOURS)


def study_anchor(study_datetime: datetime | None, detected_at: datetime) -> datetime:
    """When a study counts as taken: its own date/time, or when the engine first saw it; never after it was
    first seen (a future StudyDate/StudyTime is a fast modality clock, and must not move with the clock)."""
    if study_datetime is None:
        return detected_at
    return min(study_datetime, detected_at)


def window_end(study_at: datetime | None, last_vital_at: datetime | None) -> datetime | None:
    """The latest input (study anchor or vital sign), to the second; None without any input.

    A pure function of the inputs: pass ``study_anchor(...)`` and the newest vital sign taken by now, and
    the same inputs give the same end whenever they are scored (the assessment identity is built on it).
    """
    candidates = [t for t in (study_at, last_vital_at) if t is not None]
    if not candidates:
        return None
    return max(candidates).replace(microsecond=0)


def window_start(end: datetime) -> datetime:
    return end - WINDOW


def sync_since(now: datetime, study_at: datetime | None) -> datetime:
    """Where a vitals sync starts reading: the window before the study (or before now, without one)."""
    anchor = min(study_at, now) if study_at is not None else now
    return window_start(anchor)


def followed_since(now: datetime) -> datetime:
    """The EHR poll follows a patient while their newest ready study's anchor is at or after this instant.

    The contract: an assessment made now, on a vital sign taken now, has the window ``[now - WINDOW, now]``.
    While the study's anchor lies inside it, new vital signs are scored together with that study: they change
    the assessment of the same episode, so the poll keeps syncing them. Once the anchor has left the window of
    every vital sign that can still arrive, new values would pair a stale image with unrelated vitals: the poll
    stops (the FHIR Subscription webhook can still ask for a sync, and a new study starts following again).
    """
    return now - WINDOW
