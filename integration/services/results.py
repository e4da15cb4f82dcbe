"""Use cases: an assessment's results in the PACS (a DICOM SR and a heat-map series in the source study), and the
heat-map of an assessment for whoever shows it (the dashboard).

``write_results`` runs in the publish stage after the RiskAssessment is in the EHR, for the bands
``[pacs_results] bands`` names. It reads the source series back from the PACS (the engine keeps only the model's
volume), computes the heat-map through the served model (``services.heatmap``), builds the objects
(``services.results_dicom``) and stores them by STOW-RS (or C-STORE). Its UIDs come from the assessment, so a
retried publish stores the same instances again. A newer assessment of the same study writes a new SR in a new
series that names the previous SR in its Predecessor Documents Sequence, and reuses the heat-map series (the map
depends on the image and the model alone) (the standard way for one SR to replace
another, PS3.3 C.17.2); the older series stay in the PACS (DICOMweb has no delete, and a radiologist may have read
them).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from itertools import islice

import numpy as np
from pydicom import Dataset

from inference import contract as C
from inference.runtime.base import ModelContractError, ModelInputs, ModelUnavailableError
from integration.domain.push import SCP_SOURCE
from integration.domain.records import AssessmentRecord
from integration.domain.results import ReportFacts, drivers_of, heatmap_uids, report_uids
from integration.domain.types import DomainError, Outcome
from integration.ports import RiskModel
from integration.services.context import Services
from integration.services.heatmap import HeatMap, image_heatmap, render_overlay, to_source
from integration.services.results_dicom import (
    CT_BRAIN_WINDOW,
    SourceSeries,
    heatmap_images,
    measurement_report,
    predecessor,
    source_series,
)

log = logging.getLogger(__name__)

#: Heat-map images made and stored per batch (one STOW-RS request, or one association's C-STOREs).
STORE_BATCH = 32


def image_only_inputs(image: np.ndarray) -> ModelInputs:
    """The volume with every other input absent (the contract's own "missing" encoding): the heat-map depends on
    the image alone, whatever the vitals window of the assessment was."""
    steps = (C.N_STEPS, C.N_FEATURES)
    return ModelInputs(
        image=np.asarray(image, dtype=np.float32),
        image_present=np.ones(1, dtype=np.float32),
        vitals=np.zeros(steps, dtype=np.float32),
        vitals_mask=np.zeros(steps, dtype=np.float32),
        vitals_delta=np.ones(steps, dtype=np.float32),
        demographics=np.asarray([0.0, 0.5], dtype=np.float32),
    )


@dataclass(frozen=True)
class AssessmentHeatMap:
    """An assessment's heat-map with the source slices it lies over (ordered along the slice normal)."""

    source: SourceSeries
    heat: HeatMap  # on the contract grid (D, H, W)
    on_slices: np.ndarray  # (n_slices, rows, columns): ``heat`` sampled at every source pixel

    def render(self, index: int, note: str = "") -> np.ndarray:
        """Slice ``index`` with the map blended over it and a legend: RGB uint8 (rows + legend, columns, 3)."""
        window = CT_BRAIN_WINDOW if self.source.modality == "CT" else None
        return render_overlay(self.source.pixels[index], self.on_slices[index], vmax=self.heat.vmax,
                              label=self.heat.label, window=window, note=note)

    def hottest_slice(self) -> int:
        return int(np.argmax(self.on_slices.reshape(len(self.on_slices), -1).max(axis=1)))


def assessment_heatmap(svc: Services, identifier: str) -> AssessmentHeatMap:
    """The heat-map of a scored assessment over its study's source slices (read from the PACS), for display.
    Raises DomainError: ``no_eligible_series`` when the assessment had no image, PACS/model outcomes otherwise."""
    row = svc.store.get_assessment(identifier)
    if row is None:
        raise DomainError(Outcome.INTERNAL_ERROR, f"no assessment {identifier}")
    source = _source(svc, row)
    heat = _heat(_model(svc), source)
    return AssessmentHeatMap(source, heat, to_source(heat.values, source.geometry))


def write_results(svc: Services, row: AssessmentRecord) -> str:
    """Store the SR (and the heat-map series) of this assessment in the source PACS. Returns ``written`` or
    ``skipped: <why>``. Raises DomainError (PACS_UNAVAILABLE retried, PACS_REJECTED not) for the caller to record."""
    policy = svc.results
    if svc.archive is None:
        return "skipped: no results archive configured"
    if not policy.wanted(row.band, row.study_uid):
        return "skipped: off, no study, or band not configured"
    source = _source(svc, row)
    uids = report_uids(row.identifier)
    written = _write_heatmap(svc, source) if policy.heatmap else 0
    facts = ReportFacts(
        assessment_identifier=row.identifier,
        probability=row.probability,
        band=row.band,
        model_name=C.MODEL_NAME,
        model_version=row.model_version,
        trained=row.trained,
        drivers=drivers_of(row.resource),
        disclaimer=policy.disclaimer,
    )
    sr = measurement_report(facts, source, uids, description=policy.sr_series_description,
                            manufacturer=policy.manufacturer, previous=_previous_sr(svc, row), now=row.created_at)
    svc.archive.store([sr])  # last: an SR in the PACS means its heat-map series is complete
    log.info("results in the PACS: SR %s and %d heat-map image(s)", uids.sr_instance, written)
    return "written"


def _write_heatmap(svc: Services, source: SourceSeries) -> int:
    """Store the heat-map series of the source series by the served model, unless the PACS has it complete (an
    earlier assessment of the same study by the same model wrote it: the map does not depend on the vital signs).
    Returns how many images were stored."""
    assert svc.archive is not None
    model = _model(svc)
    study_uid, series_uid = str(source.datasets[0].StudyInstanceUID), str(source.datasets[0].SeriesInstanceUID)
    uids = heatmap_uids(study_uid, series_uid, model.model_version)
    if svc.archive.find_instance(study_uid, uids.instance(len(source.datasets) - 1)) is not None:
        return 0  # stored in order, so the last image there means the whole series is
    images = heatmap_images(source, _heat(model, source), uids, description=svc.results.heatmap_series_description,
                            note="Not for diagnostic use", manufacturer=svc.results.manufacturer)
    written = 0
    while batch := list(islice(images, STORE_BATCH)):  # stored as they are made: never the whole series at once
        svc.archive.store(batch)
        written += len(batch)
    return written


def _source(svc: Services, row: AssessmentRecord) -> SourceSeries:
    if svc.archive is None:
        raise DomainError(Outcome.INTERNAL_ERROR, "no results archive configured (pacs_results)")
    study = svc.store.get_study(row.study_uid) if row.study_uid else None
    if study is None or not study.chosen_series_uid:
        raise DomainError(Outcome.NO_ELIGIBLE_SERIES, "the assessment used no image series")
    if study.source == SCP_SOURCE and svc.spooled_sources is not None:
        # Pushed: the instances scored are in the spool (no retrieval; the sender may not have stored them in the
        # PACS yet, or ever). Once retention has removed them, the PACS's copy.
        try:
            return source_series(svc.spooled_sources.source_instances(study.study_uid, study.chosen_series_uid))
        except DomainError as err:
            if err.outcome is not Outcome.NO_ELIGIBLE_SERIES:
                raise
    return source_series(svc.archive.source_instances(study.study_uid, study.chosen_series_uid))


def _model(svc: Services) -> RiskModel:
    try:
        return svc.model()
    except ModelUnavailableError as err:
        raise DomainError(Outcome.MODEL_UNAVAILABLE, f"heat-map: {err}") from err
    except ModelContractError as err:
        raise DomainError(Outcome.MODEL_MISMATCH, f"heat-map: {err}") from err


def _heat(model: RiskModel, source: SourceSeries) -> HeatMap:
    return image_heatmap(model, image_only_inputs(source.image_tensor()))


def _previous_sr(svc: Services, row: AssessmentRecord) -> Dataset | None:
    """The SR of the latest superseded assessment of the same study that is in the PACS (the one this replaces)."""
    assert svc.archive is not None and row.study_uid is not None
    identifier = row.supersedes_identifier
    for _ in range(svc.results.max_predecessor_lookups):
        if identifier is None:
            return None
        prior = svc.store.get_assessment(identifier)
        if prior is None:
            return None
        if prior.study_uid == row.study_uid:
            sop = report_uids(prior.identifier).sr_instance
            found = svc.archive.find_instance(row.study_uid, sop)
            if found is not None:
                return predecessor(row.study_uid, found["SeriesInstanceUID"], sop, found["SOPClassUID"])
        identifier = prior.supersedes_identifier
    return None
