"""How long the engine keeps what it no longer needs, and which study volumes are still needed. Pure.

Nothing a current assessment or a re-scoring can read is removed: vitals inside a patient's current window,
the current (non-superseded) assessments, open failures, and the volume of a study that may be scored again.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from integration.domain.push import SCP_SOURCE, SpooledStudy
from integration.domain.records import StudyRecord, StudyStatus
from integration.domain.window import WINDOW, study_anchor


@dataclass(frozen=True)
class RetentionPolicy:
    """Per-table retention (``retention`` settings); every delete runs in transactions of ``batch_size`` rows."""

    #: Vitals taken longer ago than this, outside every patient's current window.
    vitals: timedelta = timedelta(days=400)
    #: Failures resolved (by a later success) longer ago than this; open failures are kept.
    resolved_failures: timedelta = timedelta(days=90)
    #: Assessments superseded by a newer one, scored longer ago than this.
    superseded_assessments: timedelta = timedelta(days=365)
    #: Volumes (``volumes/*.npy``) of studies seen longer ago than this that no scoring will read again.
    volumes: timedelta = timedelta(days=7)
    #: Messages the embedded broker delivered longer ago than this (kombu keeps them, ``visible = false``).
    broker_messages: timedelta = timedelta(hours=1)
    #: Instances pushed by C-STORE (``spool/``) of studies scored (or failed, or replaced) and received longer ago.
    spool: timedelta = timedelta(days=7)
    batch_size: int = 1000


def volume_removable(
    study: StudyRecord,
    *,
    now: datetime,
    keep_for: timedelta,
    latest_ready_uid: str | None,
    scored: bool,
    last_vital_at: datetime | None,
) -> bool:
    """Whether a study's volume may go. A re-scoring (new vitals) reads the volume of the patient's latest
    ready study, so that one stays while it can still be needed: until it was scored, is older than the vitals
    window, and the patient has had no new vital sign for ``keep_for``. The volume of a failed study, or of
    a study a newer one replaced, goes after ``keep_for`` (an operator's retry rebuilds it from the PACS).
    """
    cutoff = now - keep_for
    if study.volume_path is None or study.detected_at >= cutoff:
        return False
    if study.status is StudyStatus.FAILED:
        return True
    if study.status is not StudyStatus.READY:
        return False  # held (waiting for its Patient), in progress, or queued: it will be read
    if study.study_uid != latest_ready_uid:
        return True
    anchor = study_anchor(study.study_datetime, study.detected_at)
    quiet = last_vital_at is None or last_vital_at < cutoff
    return scored and anchor < min(cutoff, now - WINDOW) and quiet


def spool_removable(
    spooled: SpooledStudy,
    study: StudyRecord | None,
    *,
    now: datetime,
    keep_for: timedelta,
    latest_ready_uid: str | None,
    scored: bool,
) -> bool:
    """Whether a pushed study's spooled instances may go. Nothing received within ``keep_for`` goes. After that:
    a study that was scored, failed, or replaced by a newer ready study of its patient (scoring reads only the
    latest), or that was ingested from the PACS instead; entries no instance of which can be read. A study never
    registered stays (the SCP completes it when it runs), as does one waiting for its patient or being ingested.
    Its volume is kept by ``volume_removable``'s rules; a rebuild without the spool reads the PACS.
    """
    if spooled.newest >= now - keep_for:
        return False
    if spooled.study_uid is None:
        return True
    if study is None:
        return spooled.complete  # registered once, and the database forgot it
    if study.source != SCP_SOURCE or study.status is StudyStatus.FAILED:
        return True
    if study.status is not StudyStatus.READY:
        return False
    return study.study_uid != latest_ready_uid or scored
