"""What the engine writes back to the PACS for an assessment, decided without I/O: whether (band, study), the
deterministic UIDs of the objects (a retry or a re-sent publish writes the same instances again, never new ones),
and the facts the DICOM SR carries (``services.results`` builds the objects with highdicom)."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from inference import contract as C
from integration.domain.drivers import IMAGE, group_label

#: The statement the SR and every heat-map image carry, as MODEL_CARD.md asks ("Not for clinical use without local
#: validation"; "not a diagnosis").
DEFAULT_DISCLAIMER = (
    "Not for diagnostic use: research decision support from a model trained on synthetic patients; "
    "not a diagnosis and not validated for clinical use (see the StrokeWatch model card)."
)
#: Private coding scheme for StrokeWatch's own concepts in the SR (PS3.16 8.1: "99" + a local name).
CODING_SCHEME = "99STRKW"


@dataclass(frozen=True)
class ResultsPolicy:
    """``[pacs_results]`` settings the services read."""

    enabled: bool = True
    bands: frozenset[str] = frozenset({"moderate", "high"})  # bands whose assessments are written to the PACS
    heatmap: bool = True  # also the heat-map series (the SR alone when False)
    sr_series_description: str = "StrokeWatch stroke risk (SR)"
    heatmap_series_description: str = "StrokeWatch stroke risk heat-map"
    disclaimer: str = DEFAULT_DISCLAIMER
    #: Superseded assessments looked at for the SR this one replaces (Predecessor Documents Sequence).
    max_predecessor_lookups: int = 5
    manufacturer: str = "StrokeWatch"

    def wanted(self, band: str, study_uid: str | None) -> bool:
        return self.enabled and study_uid is not None and band in self.bands


def derived_uid(*parts: str) -> str:
    """A DICOM UID made from ``parts`` alone (PS3.5 B.2: "2.25." + a 128-bit number): the same parts give the same
    UID on every worker and every retry."""
    digest = hashlib.sha256("\x1f".join(parts).encode()).digest()
    return "2.25." + str(int.from_bytes(digest[:16], "big"))


@dataclass(frozen=True)
class ReportUids:
    """The UIDs of one assessment's SR: each assessment has its own."""

    sr_series: str
    sr_instance: str


def report_uids(assessment_identifier: str) -> ReportUids:
    return ReportUids(
        sr_series=derived_uid("strokewatch", "sr-series", assessment_identifier),
        sr_instance=derived_uid("strokewatch", "sr", assessment_identifier),
    )


@dataclass(frozen=True)
class HeatmapUids:
    """The UIDs of a heat-map series. The map depends on the source series and the model alone (never on the vital
    signs), so every assessment of the same study by the same model version shares one series: a re-scoring on new
    vital signs adds a new SR, not another copy of the images."""

    series: str

    def instance(self, index: int) -> str:
        return derived_uid(self.series, str(index))


def heatmap_uids(study_uid: str, source_series_uid: str, model_version: str) -> HeatmapUids:
    return HeatmapUids(derived_uid("strokewatch", "heatmap-series", study_uid, source_series_uid, model_version))


@dataclass(frozen=True)
class Driver:
    """One driver as the SR codes it: the input group (``code``: ``image`` or a vital sign's key) and the phrase."""

    code: str
    phrase: str


_NOTE_DRIVERS = re.compile(r"Main drivers: (.*?)\.(?:\s|$)")


def drivers_of(resource: Mapping[str, Any]) -> list[Driver]:
    """The drivers written in the RiskAssessment's note (``domain.assessment.note_text``), each with its group."""
    labels = {group_label(g): g for g in (IMAGE, *(f.key for f in C.VITAL_FEATURES))}
    out: list[Driver] = []
    for note in resource.get("note") or []:
        found = _NOTE_DRIVERS.search(str(note.get("text", "")))
        if not found:
            continue
        for phrase in found.group(1).split("; "):
            group = next((g for label, g in labels.items() if phrase.startswith(label)), "other")
            out.append(Driver(group, phrase.strip()))
    return out


@dataclass(frozen=True)
class ReportFacts:
    """What the SR says about one assessment."""

    assessment_identifier: str
    probability: float
    band: str
    model_name: str
    model_version: str
    trained: bool
    drivers: Sequence[Driver] = field(default_factory=tuple)
    disclaimer: str = DEFAULT_DISCLAIMER
    horizon_days: int = C.HORIZON_DAYS
