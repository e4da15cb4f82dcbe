"""The series of a study as a DIMSE PACS lists them (C-FIND at SERIES level, one IMAGE-level match per series), read
into the same ``SeriesRef``s the DICOMweb adapter builds, so series selection applies unchanged."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from integration.adapters.dimse_query import INSTANCE_KEYS, SERIES_KEYS, Answer, query, series_ref
from integration.domain.ids import is_dicom_uid, shown
from integration.domain.limits import too_large
from integration.domain.types import DomainError, Outcome, SeriesRef

if TYPE_CHECKING:
    from integration.adapters.dimse_session import Session

log = logging.getLogger(__name__)


def list_series(session: Session, study_uid: str, *, max_find_results: int, max_instances: int) -> list[SeriesRef]:
    """Every series of the study with a DICOM UID (others skipped and said; INVALID_UID when none has one). Counts
    are the PACS's NumberOfSeriesRelatedInstances, or the IMAGE-level matches counted up to past ``max_instances``."""
    found = session.find(query("SERIES", SERIES_KEYS, StudyInstanceUID=study_uid), limit=max_find_results)
    if not found.complete:
        raise DomainError(Outcome.TOO_LARGE, f"study {study_uid} lists more than {max_find_results} series "
                          "(STROKEWATCH_PACS__DIMSE__MAX_FIND_RESULTS)")
    refs: list[SeriesRef] = []
    refused: list[str] = []
    seen: set[str] = set()
    study_description: str | None = None
    for answer in found.answers:
        if answer.text("StudyInstanceUID") not in ("", study_uid):  # a PACS that ignored the matching key
            continue
        series_uid = answer.text("SeriesInstanceUID")
        if series_uid in seen:
            continue
        if not is_dicom_uid(series_uid):  # it would go into the next queries: skipped, said, never used
            refused.append(shown(series_uid))
            log.warning("study %s: series %s skipped: not a DICOM UID (PS3.5 9.1)", study_uid, shown(series_uid))
            continue
        seen.add(series_uid)
        count = answer.integer("NumberOfSeriesRelatedInstances")
        first, counted = _first_instance(session, study_uid, series_uid, count is None,
                                         max(max_find_results, max_instances + 1))
        description = answer.text("StudyDescription")
        if not description:
            if study_description is None:
                study_description = _study_description(session, study_uid, max_find_results)
            description = study_description
        refs.append(series_ref(study_uid, answer, first, count if count is not None else counted, description))
    if refused and not refs:
        raise DomainError(Outcome.INVALID_UID, f"study {study_uid}: no series has a DICOM UID (PS3.5 9.1): "
                                               f"{', '.join(refused[:3])}")
    return refs


def _first_instance(session: Session, study_uid: str, series_uid: str, count: bool,
                    limit: int) -> tuple[Answer | None, int]:
    """One IMAGE-level match of the series (InstanceNumber 1 asked for first, cancelled after one answer), and with
    ``count`` how many instances match in all."""
    keys = {"StudyInstanceUID": study_uid, "SeriesInstanceUID": series_uid}
    if not count:
        found = session.find(query("IMAGE", INSTANCE_KEYS, InstanceNumber="1", **keys), limit=limit, keep=1,
                             cancel_after=1)
        if found.answers:
            return found.answers[0], found.matched
    found = session.find(query("IMAGE", INSTANCE_KEYS, **keys), limit=limit, keep=1,
                         cancel_after=None if count else 1)
    if not found.complete:
        raise too_large(f"series {series_uid} matches more than {limit} instances", str(limit - 1),
                        "MAX_SLICES_PER_SERIES")
    return (found.answers[0] if found.answers else None), found.matched


def _study_description(session: Session, study_uid: str, limit: int) -> str:
    found = session.find(query("STUDY", ("StudyInstanceUID", "StudyDescription"), StudyInstanceUID=study_uid),
                         limit=limit)
    return next((a.text("StudyDescription") for a in found.answers if a.text("StudyInstanceUID") == study_uid), "")
