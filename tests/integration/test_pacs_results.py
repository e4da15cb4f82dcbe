"""Results in the PACS, against a real Orthanc and the FHIR sandbox: a synthetic head study goes through ingest,
vitals, scoring (the shipped ONNX model) and publish; the SR and the heat-map series land in the source study, are
read back with pydicom/highdicom, and the SR passes dciodvfy. A second assessment of the same study writes a new SR
that names the first as its predecessor; a re-published assessment writes nothing new."""

from __future__ import annotations

import io
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import highdicom as hd
import httpx
import numpy as np
import pydicom
import pytest

from integration.bootstrap import Engine, bootstrap
from integration.config import Settings
from integration.domain.records import AssessmentStatus
from integration.domain.results import DEFAULT_DISCLAIMER, heatmap_uids, report_uids
from integration.services.assess import assess_patients, publish
from integration.services.results import assessment_heatmap
from integration.services.studies import ingest_study
from integration.services.vitals import sync_vitals
from sandbox import FhirPeer, OrthancPeer
from sandbox.cohort import load_cohort

pytestmark = pytest.mark.peers

MRN_SYSTEM = "urn:oid:1.2.36.146.595.217.0.1"
SR_STORAGE = "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
SC_STORAGE = "1.2.840.10008.5.1.4.1.1.7"


@dataclass
class Flow:
    engine: Engine
    orthanc: OrthancPeer
    fhir: FhirPeer
    study_uid: str
    patient_id: str
    identifier: str


def settings(data_dir: Path, orthanc: OrthancPeer, fhir: FhirPeer, **results: Any) -> Settings:
    return Settings(
        sandbox=True, data_dir=data_dir,
        pacs={"dicomweb_url": orthanc.dicomweb_url, "kind": "generic", "lookback_hours": 48},
        ehr={"base_url": fhir.base_url, "patient_identifier_system": MRN_SYSTEM},
        # every band is written here: the synthetic patient's score is whatever the model says
        pacs_results={"enabled": True, "bands": ["low", "moderate", "high"], **results},
    )


def score_and_publish(eng: Engine, patient_id: str) -> str:
    svc = eng.services
    sync_vitals(svc, patient_id)
    scored = [r for r in assess_patients(svc, [patient_id]) if r.identifier]
    assert scored, "nothing scored"
    identifier = scored[0].identifier
    assert identifier is not None
    assert publish(svc, identifier) == "published", svc.store.get_assessment(identifier)
    return identifier


@pytest.fixture(scope="module")
def flow(tmp_path_factory: pytest.TempPathFactory, orthanc_peer: OrthancPeer, fhir_peer: FhirPeer) -> Iterator[Flow]:
    orthanc_peer.reset()
    fhir_peer.reset()
    now = datetime.now(UTC).replace(microsecond=0)
    loaded = load_cohort(1, 7, dicomweb_url=orthanc_peer.dicomweb_url, fhir_base_url=fhir_peer.base_url,
                         identifier_system=MRN_SYSTEM, window_end=now - timedelta(hours=2))
    eng = bootstrap(settings(tmp_path_factory.mktemp("results"), orthanc_peer, fhir_peer))
    svc = eng.services
    from integration.domain.types import StudyRef

    svc.store.add_study(StudyRef(loaded[0].study_uid, loaded[0].mrn, None), "qido", svc.clock.now())
    ingested = ingest_study(svc, loaded[0].study_uid)
    assert ingested.status == "ready", ingested
    assert ingested.patient_fhir_id
    identifier = score_and_publish(eng, ingested.patient_fhir_id)
    yield Flow(eng, orthanc_peer, fhir_peer, loaded[0].study_uid, ingested.patient_fhir_id, identifier)
    eng.close()


def orthanc_series(orthanc: OrthancPeer, study_uid: str) -> list[dict[str, Any]]:
    """Orthanc's own view: /studies/{id}/series of the study with this Study Instance UID."""
    found = httpx.post(f"{orthanc.url}/tools/lookup", content=study_uid, timeout=10).json()
    study_id = next(item["ID"] for item in found if item["Type"] == "Study")
    series: list[dict[str, Any]] = httpx.get(f"{orthanc.url}/studies/{study_id}/series", timeout=10).json()
    return series


def instance_files(orthanc: OrthancPeer, series: dict[str, Any]) -> list[bytes]:
    return [httpx.get(f"{orthanc.url}/instances/{i}/file", timeout=30).content for i in series["Instances"]]


def text_items(item: Any) -> Iterator[tuple[str, str]]:
    """(concept name, value) of every TEXT/UIDREF item in an SR content tree."""
    for child in item.get("ContentSequence", []):
        if child.ValueType in ("TEXT", "UIDREF"):
            value = child.TextValue if child.ValueType == "TEXT" else child.UID
            yield child.ConceptNameCodeSequence[0].CodeMeaning, str(value)
        yield from text_items(child)


def dciodvfy_errors(path: Path, data: bytes) -> list[str]:
    """dicom3tools' IOD check of a DICOM file: its Error lines (warnings allowed)."""
    path.write_bytes(data)
    dciodvfy = shutil.which("dciodvfy")
    assert dciodvfy, "dicom3tools is not installed (deploy/local/setup.sh installs it)"
    checked = subprocess.run([dciodvfy, str(path)], capture_output=True, text=True, timeout=60)
    return [line for line in (checked.stdout + checked.stderr).splitlines() if line.startswith("Error")]


def by_description(series: list[dict[str, Any]], description: str) -> list[dict[str, Any]]:
    return [s for s in series if s["MainDicomTags"].get("SeriesDescription") == description]


def test_the_sr_and_the_heatmap_series_are_in_the_source_study(flow: Flow, tmp_path: Path) -> None:
    series = orthanc_series(flow.orthanc, flow.study_uid)
    srs = by_description(series, "StrokeWatch stroke risk (SR)")
    heatmaps = by_description(series, "StrokeWatch stroke risk heat-map")
    assert len(srs) == 1 and len(heatmaps) == 1, [s["MainDicomTags"] for s in series]
    uids = report_uids(flow.identifier)
    assert srs[0]["MainDicomTags"]["SeriesInstanceUID"] == uids.sr_series
    row0 = flow.engine.services.store.get_assessment(flow.identifier)
    assert row0 is not None
    heat_series = heatmap_uids(flow.study_uid, study_series(flow), row0.model_version).series
    assert heatmaps[0]["MainDicomTags"]["SeriesInstanceUID"] == heat_series

    raw = instance_files(flow.orthanc, srs[0])[0]
    sr = hd.sr.srread(io.BytesIO(raw))
    assert sr.SOPClassUID == SR_STORAGE and sr.StudyInstanceUID == flow.study_uid
    assert sr.SOPInstanceUID == uids.sr_instance
    row = flow.engine.services.store.get_assessment(flow.identifier)
    assert row is not None and row.status is AssessmentStatus.PUBLISHED
    # the evidence: every source instance of the assessed series, by UID
    study = flow.engine.services.store.get_study(flow.study_uid)
    assert study is not None and study.chosen_series_uid
    evidence = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence
    assert [s.SeriesInstanceUID for s in evidence] == [study.chosen_series_uid]
    source = next(s for s in series if s["MainDicomTags"]["SeriesInstanceUID"] == study.chosen_series_uid)
    assert len(evidence[0].ReferencedSOPSequence) == len(source["Instances"])

    # TID 1500 content: probability, band, model, drivers, the statement
    report = hd.sr.MeasurementReport.from_sequence([sr])
    group = report.get_image_measurement_groups()[0]
    probability = group.get_measurements()[0]
    assert probability.value == pytest.approx(row.probability, abs=1e-6)
    evaluations = {(e.name.meaning, e.value.meaning) for e in group.get_qualitative_evaluations()}
    assert ("Risk band", f"{row.band} risk") in evaluations
    texts = dict(text_items(sr))
    assert texts["Algorithm Name"] == "stroke_fusion" and texts["Algorithm Version"] == row.model_version
    assert texts["Device Observer Model Name"] == f"stroke_fusion {row.model_version}"
    assert texts["Comment"].startswith(DEFAULT_DISCLAIMER)
    drivers = [m for _, m in evaluations if _ == "Risk driver"]
    assert all(d in row.resource["note"][0]["text"] for d in drivers)

    assert dciodvfy_errors(tmp_path / "sr.dcm", raw) == []

    files = instance_files(flow.orthanc, heatmaps[0])
    assert dciodvfy_errors(tmp_path / "sc.dcm", files[0]) == []
    images = [pydicom.dcmread(io.BytesIO(b)) for b in files]
    assert len(images) == len(source["Instances"])
    first = images[0]
    assert first.SOPClassUID == SC_STORAGE and first.StudyInstanceUID == flow.study_uid
    assert first.PhotometricInterpretation == "RGB" and first.BurnedInAnnotation == "YES"
    listed = httpx.get(f"{flow.orthanc.url}/series/{source['ID']}/instances", timeout=10).json()
    source_uids = {i["MainDicomTags"]["SOPInstanceUID"] for i in listed}
    assert {im.SourceImageSequence[0].ReferencedSOPInstanceUID for im in images} == source_uids
    coloured = max(int((np.abs(im.pixel_array[..., 0].astype(int) - im.pixel_array[..., 2]) > 60).sum())
                   for im in images)
    assert coloured > 0  # the map is drawn somewhere (red/yellow over grey), and the legend's bar at least


def test_the_dashboards_heatmap_is_the_one_in_the_pacs(flow: Flow) -> None:
    shown = assessment_heatmap(flow.engine.services, flow.identifier)
    assert shown.heat.method == "lesion_map"  # the shipped model serves its lesion maps
    assert shown.on_slices.shape == (len(shown.source.datasets), *shown.source.pixels[0].shape)
    k = shown.hottest_slice()
    rgb = shown.render(k)
    assert rgb.dtype == np.uint8 and rgb.shape[2] == 3 and rgb.shape[0] > shown.source.pixels[k].shape[0]
    heatmaps = by_description(orthanc_series(flow.orthanc, flow.study_uid), "StrokeWatch stroke risk heat-map")
    stored = [pydicom.dcmread(io.BytesIO(b)) for b in instance_files(flow.orthanc, heatmaps[0])]
    same = next(im for im in stored
                if im.SourceImageSequence[0].ReferencedSOPInstanceUID == shown.source.datasets[k].SOPInstanceUID)
    np.testing.assert_array_equal(same.pixel_array, shown.render(k, "Not for diagnostic use"))


def test_a_republish_writes_nothing_new_and_a_new_assessment_replaces_the_sr(flow: Flow) -> None:
    svc = flow.engine.services
    before = {s["MainDicomTags"]["SeriesInstanceUID"]: len(s["Instances"])
              for s in orthanc_series(flow.orthanc, flow.study_uid)}
    assert svc.store.requeue_assessment(flow.identifier)
    assert publish(svc, flow.identifier) == "published"
    again = {s["MainDicomTags"]["SeriesInstanceUID"]: len(s["Instances"])
             for s in orthanc_series(flow.orthanc, flow.study_uid)}
    assert again == before

    # new data for the patient: a fresh vital sign -> a new assessment of the same study
    observation = {
        "resourceType": "Observation", "status": "final",
        "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category",
                                  "code": "vital-signs"}]}],
        "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]},
        "subject": {"reference": f"Patient/{flow.patient_id}"},
        # taken now: the newest input of the patient (the window ends at the latest of study and vital signs)
        "effectiveDateTime": (datetime.now(UTC) - timedelta(seconds=2)).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "valueQuantity": {"value": 131, "unit": "/min", "system": "http://unitsofmeasure.org", "code": "/min"},
    }
    httpx.post(f"{flow.fhir.base_url}/Observation", json=observation, timeout=10).raise_for_status()
    svc.store.mark_needs_assessment(flow.patient_id)
    svc.store.require_vitals_sync(flow.patient_id)
    second = score_and_publish(flow.engine, flow.patient_id)
    assert second != flow.identifier
    series = orthanc_series(flow.orthanc, flow.study_uid)
    srs = by_description(series, "StrokeWatch stroke risk (SR)")
    assert len(srs) == 2  # the first stays (DICOMweb has no delete; it may have been read)
    # the same image and model give the same map: the heat-map series is shared, not written again
    assert [len(s["Instances"]) for s in by_description(series, "StrokeWatch stroke risk heat-map")] == [
        len(by_uid_series(series, study_series(flow))["Instances"])]
    newest = next(s for s in srs if s["MainDicomTags"]["SeriesInstanceUID"] == report_uids(second).sr_series)
    sr = pydicom.dcmread(io.BytesIO(instance_files(flow.orthanc, newest)[0]))
    previous = sr.PredecessorDocumentsSequence[0]
    assert previous.StudyInstanceUID == flow.study_uid
    ref = previous.ReferencedSeriesSequence[0]
    assert ref.SeriesInstanceUID == report_uids(flow.identifier).sr_series
    assert ref.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == report_uids(flow.identifier).sr_instance


def test_bands_not_configured_write_nothing(tmp_path: Path, flow: Flow) -> None:
    eng = bootstrap(settings(tmp_path / "off", flow.orthanc, flow.fhir, bands=[]))
    try:
        row = flow.engine.services.store.get_assessment(flow.identifier)
        assert row is not None
        from integration.services.results import write_results

        assert write_results(eng.services, row).startswith("skipped")
    finally:
        eng.close()


def test_a_pacs_outage_loses_nothing_the_publish_is_retried(flow: Flow) -> None:
    from integration.adapters.db.queries import list_failures
    from integration.adapters.dicom_results import DicomWebResults
    from integration.adapters.dicomweb import DicomWebPacs
    from sandbox._process import free_port

    svc = flow.engine.services
    working = svc.archive
    down = DicomWebPacs(f"http://127.0.0.1:{free_port()}/dicom-web", timeout=2)
    svc.archive = DicomWebResults(down)
    try:
        assert svc.store.requeue_assessment(flow.identifier)
        assert publish(svc, flow.identifier) == "retry"
    finally:
        svc.archive = working
        down.close()
    row = svc.store.get_assessment(flow.identifier)
    assert row is not None and row.status is AssessmentStatus.RETRY and row.outcome == "pacs_unavailable"
    assert row.next_attempt_at is not None  # the sweep sends it again after the backoff
    failures = list_failures(svc.store.sessions, stage="publish", subject=flow.identifier, open_only=True).items
    assert [f.outcome for f in failures] == ["pacs_unavailable"]
    assert failures[0].message.startswith("results in the PACS:")

    assert svc.store.requeue_assessment(flow.identifier)  # (the sweep would, once the backoff is over)
    assert publish(svc, flow.identifier) == "published"
    assert list_failures(svc.store.sessions, stage="publish", subject=flow.identifier, open_only=True).items == []


def test_a_dimse_only_pacs_gets_the_results_by_c_store(flow: Flow) -> None:
    """pacs.kind=dimse: the source series by C-GET, the results by C-STORE, the predecessor looked up by C-FIND."""
    from dataclasses import replace

    from integration.adapters.dicom_results import DimseResults
    from integration.adapters.dimse import DimsePacs
    from integration.services.results import write_results

    svc = flow.engine.services
    row = svc.store.get_assessment(flow.identifier)
    assert row is not None
    working = svc.archive
    dimse = DimseResults(DimsePacs("127.0.0.1", flow.orthanc.dicom_port, flow.orthanc.aet, connect_timeout_s=5,
                                   acse_timeout_s=10, dimse_timeout_s=30, network_timeout_s=30))
    study = svc.store.get_study(flow.study_uid)
    assert study is not None and study.chosen_series_uid
    source = dimse.source_instances(flow.study_uid, study.chosen_series_uid)
    listed = by_uid_series(orthanc_series(flow.orthanc, flow.study_uid), study.chosen_series_uid)
    assert len(source) == len(listed["Instances"]) and all("PixelData" in ds for ds in source)

    # other UIDs (another assessment, another model version): instances Orthanc does not have yet
    copy = replace(row, identifier=f"{row.identifier}-dimse")
    real_model = svc.model
    svc.model = lambda: VersionedModel(real_model(), "0.6.0-dimse")  # type: ignore[assignment]
    svc.archive = dimse
    try:
        assert write_results(svc, copy) == "written"
    finally:
        svc.archive = working
        svc.model = real_model
    uids = report_uids(copy.identifier)
    stored = by_uid_series(orthanc_series(flow.orthanc, flow.study_uid), uids.sr_series)
    assert len(stored["Instances"]) == 1
    heat = heatmap_uids(flow.study_uid, study.chosen_series_uid, "0.6.0-dimse")
    assert len(by_uid_series(orthanc_series(flow.orthanc, flow.study_uid), heat.series)["Instances"]) == len(source)
    assert dimse.find_instance(flow.study_uid, uids.sr_instance) == {
        "SeriesInstanceUID": uids.sr_series, "SOPClassUID": SR_STORAGE}
    assert dimse.find_instance(flow.study_uid, report_uids("never-written").sr_instance) is None


class VersionedModel:
    """The served model under another version string (a model upgrade, as far as the results' UIDs go)."""

    def __init__(self, model: Any, version: str) -> None:
        self._model, self.model_version = model, version

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)


def study_series(flow: Flow) -> str:
    study = flow.engine.services.store.get_study(flow.study_uid)
    assert study is not None and study.chosen_series_uid
    return study.chosen_series_uid


def by_uid_series(series: list[dict[str, Any]], series_uid: str) -> dict[str, Any]:
    return next(s for s in series if s["MainDicomTags"]["SeriesInstanceUID"] == series_uid)


def test_a_pushed_study_gets_its_results_from_the_spool(flow: Flow, tmp_path: Path) -> None:
    """A study pushed by C-STORE and not (yet) in the PACS: ingested from the spool, and its SR and heat-map are drawn
    from the spooled instances too, then stored in the PACS under the study's UID (nothing retrieved)."""
    import synth
    from integration.domain.push import SCP_SOURCE, ReceivedInstance
    from integration.domain.types import StudyRef

    svc = flow.engine.services
    spool = svc.spooled_sources
    assert spool is not None
    now = datetime.now(UTC).replace(microsecond=0)
    window_end = now - timedelta(hours=2)
    loaded = load_cohort(1, 11, dicomweb_url=flow.orthanc.dicomweb_url, fhir_base_url=flow.fhir.base_url,
                         identifier_system=MRN_SYSTEM, window_end=window_end, studies=False)  # the EHR only
    patient = next(synth.iter_cohort(1, 11))
    files = synth.write_dicom(patient, tmp_path / "pushed", window_end=window_end)
    for path in files:  # what the SCP does with each C-STORE: the data set as sent (no file meta), spooled
        data = path.read_bytes()
        meta_end = 144 + int.from_bytes(data[140:144], "little")  # after (0002,0000)'s group length
        meta = pydicom.dcmread(path, stop_before_pixels=True)
        received = ReceivedInstance("MODALITY", 1, str(meta.SOPClassUID), str(meta.SOPInstanceUID),
                                    str(meta.file_meta.TransferSyntaxUID), data[meta_end:])
        assert spool.put(spool.parse(received), received)  # type: ignore[attr-defined]
    study_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    before = httpx.get(f"{flow.orthanc.dicomweb_url}/studies/{study_uid}/series", timeout=10)
    assert before.status_code in (204, 404) or before.json() == []  # not in the PACS

    svc.store.add_study(StudyRef(study_uid, loaded[0].mrn, None), SCP_SOURCE, svc.clock.now())
    ingested = ingest_study(svc, study_uid)
    assert ingested.status == "ready", ingested
    assert ingested.patient_fhir_id
    score_and_publish(flow.engine, ingested.patient_fhir_id)

    series = orthanc_series(flow.orthanc, study_uid)  # the study exists in the PACS now: the results alone
    descriptions = sorted(s["MainDicomTags"].get("SeriesDescription") for s in series)
    assert descriptions == ["StrokeWatch stroke risk (SR)", "StrokeWatch stroke risk heat-map"]
    (heat,) = by_description(series, "StrokeWatch stroke risk heat-map")
    assert len(heat["Instances"]) == len(files)  # one image per spooled source slice
    (sr_series,) = by_description(series, "StrokeWatch stroke risk (SR)")
    sr = pydicom.dcmread(io.BytesIO(instance_files(flow.orthanc, sr_series)[0]))
    evidence = {str(ref.ReferencedSOPInstanceUID)
                for study in sr.CurrentRequestedProcedureEvidenceSequence
                for series_item in study.ReferencedSeriesSequence for ref in series_item.ReferencedSOPSequence}
    assert evidence == {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files}
