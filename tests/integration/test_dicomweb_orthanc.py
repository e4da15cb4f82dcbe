"""DicomWebPacs against a real Orthanc + DICOMweb plugin: search, series selection, retrieval, errors."""

from __future__ import annotations

import io
import random
from datetime import UTC, date, datetime
from zoneinfo import ZoneInfo

import httpx
import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate, generate_frames
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, RLELossless, generate_uid

from inference.preprocess import series_tensor, stack_slices, volume_tensor
from integration.adapters.dicomweb import DicomWebPacs
from integration.domain.series import SeriesRules, choose
from integration.domain.studytime import StudyWindow
from integration.domain.types import DomainError, Outcome
from sandbox import OrthancPeer, free_port

pytestmark = pytest.mark.peers

CT_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
SLICE_GAP_MM = 5.0
Z0_MM = -40.0


def stored_values(k: int, size: int) -> np.ndarray:
    """Stored (pre-rescale) int16 pixels of slice k: a ramp, so each slice and pixel is recognisable."""
    ramp = np.add.outer(np.arange(size), np.arange(size)).astype(np.int16)
    return (ramp + 1000 + 7 * k).astype(np.int16)


def ct_series(
    study_uid: str,
    *,
    n: int = 20,
    size: int = 64,
    series_uid: str | None = None,
    description: str = "Head 5mm",
    body_part: str = "HEAD",
    study_date: str = "19870314",
    study_time: str = "101500",
    patient_id: str = "SW-TEST-1",
    seed: int = 0,
) -> list[Dataset]:
    """n axial CT slices with known geometry and HU (stored - 1024), InstanceNumber and order shuffled."""
    series_uid = series_uid or generate_uid()
    numbers = list(range(1, n + 1))
    random.Random(seed).shuffle(numbers)
    slices = []
    for k in range(n):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CT_STORAGE
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CT_STORAGE, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
        ds.PatientID, ds.PatientName = patient_id, "Test^Synthetic"
        ds.StudyDate, ds.StudyTime, ds.StudyDescription = study_date, study_time, "CT HEAD W/O"
        ds.Modality, ds.BodyPartExamined, ds.SeriesDescription = "CT", body_part, description
        ds.SeriesNumber, ds.InstanceNumber = 2, numbers[k]
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.ConvolutionKernel, ds.SliceThickness = "H30s", SLICE_GAP_MM
        ds.Rows = ds.Columns = size
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [-16.0, -16.0, Z0_MM + SLICE_GAP_MM * k]
        ds.PixelSpacing = [0.5, 0.5]
        ds.PixelData = stored_values(k, size).tobytes()
        slices.append(ds)
    random.Random(seed + 1).shuffle(slices)  # storage order is not slice order either
    return slices


def non_image(study_uid: str, modality: str, sop_class: str, description: str) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, generate_uid()
    ds.PatientID, ds.PatientName, ds.StudyDate, ds.StudyTime = "SW-TEST-1", "Test^Synthetic", "19870314", "101500"
    ds.Modality, ds.SeriesDescription, ds.SeriesNumber, ds.InstanceNumber = modality, description, 90, 1
    return ds


def dicom_bytes(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def store(peer: OrthancPeer, datasets: list[Dataset]) -> None:
    with httpx.Client(timeout=30) as http:
        for ds in datasets:
            response = http.post(f"{peer.url}/instances", content=dicom_bytes(ds),
                                 headers={"Content-Type": "application/dicom"})
            assert response.status_code == 200, response.text


@pytest.fixture
def pacs(orthanc_peer: OrthancPeer) -> DicomWebPacs:
    client = DicomWebPacs(orthanc_peer.dicomweb_url, study_timezone=UTC)
    yield client  # type: ignore[misc]
    client.close()


def test_find_studies_by_date_and_time_window(orthanc_peer: OrthancPeer, pacs: DicomWebPacs) -> None:
    morning, night, later = generate_uid(), generate_uid(), generate_uid()
    store(orthanc_peer, ct_series(morning, n=2, study_date="19830607", study_time="101500"))
    store(orthanc_peer, ct_series(night, n=2, study_date="19830607", study_time="230000"))
    store(orthanc_peer, ct_series(later, n=2, study_date="19830609", study_time="080000"))
    sr_only = generate_uid()
    sr = non_image(sr_only, "SR", "1.2.840.10008.5.1.4.1.1.88.11", "Report")
    sr.StudyDate = "19830607"
    store(orthanc_peer, [sr])
    ours = {morning, night, later, sr_only}

    same_day = pacs.find_studies(date(1983, 6, 7), date(1983, 6, 7))  # QIDO date-range matching
    assert {s.study_uid for s in same_day} & ours == {morning, night}  # the SR-only study is not CT/MR
    window = StudyWindow(datetime(1983, 6, 7, 9, 0, tzinfo=UTC), datetime(1983, 6, 7, 12, 0, tzinfo=UTC))
    assert {s.study_uid for s in same_day if window.contains(s)} & ours == {morning}
    ref = next(s for s in same_day if s.study_uid == morning)
    assert ref.study_datetime == datetime(1983, 6, 7, 10, 15, tzinfo=UTC) and not ref.date_only
    assert ref.patient_id == "SW-TEST-1" and ref.modalities == ("CT",) and ref.description == "CT HEAD W/O"

    wide = pacs.find_studies(date(1983, 6, 6), date(1983, 6, 10))
    assert {s.study_uid for s in wide} & ours == {morning, night, later}


def test_study_times_are_read_in_their_offset_or_the_pacs_zone(orthanc_peer: OrthancPeer) -> None:
    naive, offset, date_only = generate_uid(), generate_uid(), generate_uid()
    store(orthanc_peer, ct_series(naive, n=1, study_date="19860115", study_time="231500"))
    with_offset = ct_series(offset, n=1, study_date="19860116", study_time="131500")
    with_offset[0].TimezoneOffsetFromUTC = "+1400"
    store(orthanc_peer, with_offset)
    no_time = ct_series(date_only, n=1, study_date="19860115", study_time="")
    store(orthanc_peer, no_time)
    with DicomWebPacs(orthanc_peer.dicomweb_url, study_timezone=ZoneInfo("Europe/Berlin")) as berlin:
        refs = {r.study_uid: r for r in berlin.find_studies(date(1986, 1, 15), date(1986, 1, 16))}
    assert refs[naive].study_datetime == datetime(1986, 1, 15, 22, 15, tzinfo=UTC)  # CET, winter
    assert refs[offset].study_datetime == datetime(1986, 1, 15, 23, 15, tzinfo=UTC)  # its own offset wins
    assert refs[date_only].date_only and refs[date_only].study_datetime == datetime(1986, 1, 14, 23, 0, tzinfo=UTC)
    late = StudyWindow(datetime(1986, 1, 15, 22, 0, tzinfo=UTC), datetime(1986, 1, 15, 23, 30, tzinfo=UTC))
    assert {u for u, r in refs.items() if late.contains(r)} == {naive, offset, date_only}


def test_find_studies_follows_pages(orthanc_peer: OrthancPeer) -> None:
    uids = [generate_uid() for _ in range(5)]
    for uid in uids:
        store(orthanc_peer, ct_series(uid, n=1, study_date="19790101"))
    with DicomWebPacs(orthanc_peer.dicomweb_url, page_size=2, study_timezone=UTC) as small_pages:
        found = small_pages.find_studies(date(1979, 1, 1), date(1979, 1, 1))
        assert set(uids) <= {s.study_uid for s in found}
        assert len(found) == len({s.study_uid for s in found})
        some = next(iter(small_pages.list_series(uids[0])))
        assert small_pages._count_instances(uids[0], some.series_uid) == 1


def test_list_series_gives_every_series_a_reason(orthanc_peer: OrthancPeer, pacs: DicomWebPacs) -> None:
    study = generate_uid()
    good = ct_series(study, n=20)
    scout = ct_series(study, n=20, description="Scout", seed=3)
    short = ct_series(study, n=3, description="Head 5mm low dose", seed=4)
    sr = non_image(study, "SR", "1.2.840.10008.5.1.4.1.1.88.22", "Dose Report")
    pr = non_image(study, "PR", "1.2.840.10008.5.1.4.1.1.11.1", "Annotations")
    store(orthanc_peer, [*good, *scout, *short, sr, pr])

    series = pacs.list_series(study)
    assert len(series) == 5
    by_uid = {s.series_uid: s for s in series}
    head = by_uid[good[0].SeriesInstanceUID]
    assert (head.modality, head.n_instances, head.body_part, head.sop_class_uid) == ("CT", 20, "HEAD", CT_STORAGE)
    assert head.study_description == "CT HEAD W/O" and head.slice_thickness == 5.0
    assert head.orientation == (1.0, 0.0, 0.0, 0.0, 1.0, 0.0) and head.convolution_kernel == "H30s"

    chosen, decisions = choose(series, SeriesRules())
    assert chosen is not None and chosen.series.series_uid == good[0].SeriesInstanceUID
    reasons = {d.series.series_uid: (d.outcome, d.reason) for d in decisions}
    assert reasons[sr.SeriesInstanceUID][0] is Outcome.NOT_IMAGE
    assert "structured report" in reasons[sr.SeriesInstanceUID][1]
    assert "presentation state" in reasons[pr.SeriesInstanceUID][1]
    scout_outcome, scout_reason = reasons[scout[0].SeriesInstanceUID]
    assert scout_outcome is Outcome.NOT_IMAGE and "SCOUT" in scout_reason
    assert reasons[short[0].SeriesInstanceUID] == (Outcome.TOO_FEW_SLICES, "rejected: 3 instances < minimum 16")
    assert chosen.reason.startswith("eligible: CT, HEAD, 20 slices")


def test_unknown_study_is_empty_not_an_error(pacs: DicomWebPacs) -> None:
    assert pacs.get_study("1.2.3.4.5.6.7.8.9") is None
    assert pacs.list_series("1.2.3.4.5.6.7.8.9") == []
    with pytest.raises(DomainError) as err:
        pacs.retrieve_series("1.2.3.4.5.6.7.8.9", "1.2.3.4.5.6.7.8.9.1")
    assert err.value.outcome is Outcome.NO_ELIGIBLE_SERIES


def test_retrieve_series_orders_by_geometry_with_hounsfield_units(orthanc_peer: OrthancPeer,
                                                                   pacs: DicomWebPacs) -> None:
    study = generate_uid()
    series = ct_series(study, n=20)
    store(orthanc_peer, series)
    modality, slices = pacs.retrieve_series(study, series[0].SeriesInstanceUID)
    assert modality == "CT" and len(slices) == 20
    z = [s.position[2] for s in slices]
    assert z == sorted(z) == [Z0_MM + SLICE_GAP_MM * k for k in range(20)]
    for k, s in enumerate(slices):
        np.testing.assert_array_equal(s.pixels, stored_values(k, 64).astype(np.float32) - 1024)
    volume = stack_slices(slices[::-1])  # stack_slices orders the same way whatever it is given
    np.testing.assert_array_equal(volume.voxels, np.stack([s.pixels for s in slices]))
    assert volume.spacing == (SLICE_GAP_MM, 0.5, 0.5)
    assert volume_tensor(volume, modality).shape[0] == 1


@pytest.mark.parametrize("syntax", [RLELossless, JPEG2000Lossless])
def test_compressed_series_decodes_to_the_same_pixels(orthanc_peer: OrthancPeer, pacs: DicomWebPacs,
                                                      syntax: str) -> None:
    study = generate_uid()
    series = ct_series(study, n=4)
    for ds in series:
        ds.compress(syntax)
    store(orthanc_peer, series)
    _, slices = pacs.retrieve_series(study, series[0].SeriesInstanceUID)
    for k, s in enumerate(slices):
        np.testing.assert_array_equal(s.pixels, stored_values(k, 64).astype(np.float32) - 1024)


@pytest.mark.parametrize("syntax", [None, RLELossless, JPEG2000Lossless])
def test_block_means_as_the_engine_reads_give_the_tensor_of_the_stored_pixels(
    orthanc_peer: OrthancPeer, pacs: DicomWebPacs, syntax: str | None
) -> None:
    """reduce_planes (the engine's ingest): planes come as block means, and the model's tensor is the one the exact
    pixels give (native and compressed)."""
    study = generate_uid()
    series = ct_series(study, n=20)
    if syntax is not None:
        for ds in series:
            ds.compress(syntax)
    store(orthanc_peer, series)
    uid = series[0].SeriesInstanceUID
    modality, exact = pacs.retrieve_series(study, uid)
    pacs.reduce_planes = True
    try:
        _, reduced = pacs.retrieve_series(study, uid)
    finally:
        pacs.reduce_planes = False
    assert reduced[0].pixels.shape == (9, 9) and reduced[0].plane_centre is not None  # 0.5 mm pixels, 7 x 7 blocks
    reference = volume_tensor(stack_slices(exact), modality)
    assert np.abs(series_tensor(reduced, modality) - reference).max() < 1e-4


def test_corrupt_pixel_data_names_the_instance(orthanc_peer: OrthancPeer, pacs: DicomWebPacs) -> None:
    study = generate_uid()
    series = ct_series(study, n=4)
    bad = series[2]
    bad.compress(RLELossless)
    frame = next(generate_frames(bad.PixelData, number_of_frames=1))
    bad.PixelData = encapsulate([frame[: len(frame) // 3]])
    store(orthanc_peer, series)
    with pytest.raises(DomainError) as err:
        pacs.retrieve_series(study, bad.SeriesInstanceUID)
    assert err.value.outcome is Outcome.CORRUPT_PIXEL_DATA
    assert bad.SOPInstanceUID in err.value.message
    assert "SW-TEST-1" not in err.value.message and "Synthetic" not in err.value.message  # no PHI


def test_pacs_down_is_pacs_unavailable() -> None:
    down = DicomWebPacs(f"http://127.0.0.1:{free_port()}/dicom-web", timeout=2.0)
    for call in (
        lambda: down.find_studies(date(2024, 1, 1), date(2024, 1, 2)),
        lambda: down.get_study("1.2.3"),
        lambda: down.list_series("1.2.3"),
        lambda: down.retrieve_series("1.2.3", "1.2.3.4"),
    ):
        with pytest.raises(DomainError) as err:
            call()
        assert err.value.outcome is Outcome.PACS_UNAVAILABLE and err.value.retryable
        assert "unreachable" in err.value.message


def test_consecutive_retrievals_survive_orthanc_closing_connections(orthanc_peer: OrthancPeer,
                                                                    pacs: DicomWebPacs) -> None:
    study = generate_uid()
    series = ct_series(study, n=3)
    store(orthanc_peer, series)
    for _ in range(4):  # Orthanc closes the connection after each WADO-RS answer; the pool must cope
        assert len(pacs.retrieve_series(study, series[0].SeriesInstanceUID)[1]) == 3
        assert pacs.get_study(study) is not None


def enhanced_ct(study_uid: str, n_frames: int = 20, size: int = 32) -> Dataset:
    """One Enhanced CT instance holding a whole volume; frames stored bottom-up, geometry per frame."""
    ds = ct_series(study_uid, n=1, size=size)[0]
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2.1"
    for keyword in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "RescaleSlope",
                    "RescaleIntercept", "InstanceNumber"):
        delattr(ds, keyword)
    ds.NumberOfFrames = n_frames
    ds.PixelData = np.stack([stored_values(k, size) for k in range(n_frames)]).tobytes()
    shared, measures, orientation, rescale = Dataset(), Dataset(), Dataset(), Dataset()
    measures.PixelSpacing, measures.SliceThickness = [0.5, 0.5], SLICE_GAP_MM
    orientation.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    rescale.RescaleSlope, rescale.RescaleIntercept, rescale.RescaleType = 1, -1024, "HU"
    shared.PixelMeasuresSequence, shared.PlaneOrientationSequence = [measures], [orientation]
    shared.PixelValueTransformationSequence = [rescale]
    ds.SharedFunctionalGroupsSequence = [shared]
    frames = []
    for k in range(n_frames):
        item, position = Dataset(), Dataset()
        position.ImagePositionPatient = [-8.0, -8.0, Z0_MM + SLICE_GAP_MM * k]
        item.PlanePositionSequence = [position]
        frames.append(item)
    ds.PerFrameFunctionalGroupsSequence = frames
    return ds


def test_enhanced_multiframe_ct_is_selected_and_retrieved(orthanc_peer: OrthancPeer, pacs: DicomWebPacs) -> None:
    study = generate_uid()
    instance = enhanced_ct(study)
    store(orthanc_peer, [instance])
    (series,) = pacs.list_series(study)
    assert series.n_instances == 1 and series.frames_per_instance == 20 and series.n_slices == 20
    chosen, _ = choose([series], SeriesRules())
    assert chosen is not None and "20 slices" in chosen.reason
    modality, slices = pacs.retrieve_series(study, series.series_uid)
    assert modality == "CT" and len(slices) == 20
    for k, s in enumerate(slices):
        assert s.position[2] == Z0_MM + SLICE_GAP_MM * k
        np.testing.assert_array_equal(s.pixels, stored_values(k, 32).astype(np.float32) - 1024)
