"""The sandbox Orthanc (Debian Orthanc 1.10 + DICOMweb plugin) as OrthancPeer starts it, and the detached sandbox."""

from __future__ import annotations

import io
import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE

from integration.entrypoints.processes import sandbox_env
from sandbox import OrthancPeer, free_port, orthanc_config, start_detached, status, stop

pytestmark = pytest.mark.peers

REPO = Path(__file__).resolve().parents[2]
VERIFICATION = "1.2.840.10008.1.1"  # SOP class of C-ECHO


def ct_slice(patient_id: str, study_uid: str, series_uid: str, number: int = 1) -> Dataset:
    """A small, valid CT image: 16x16 int16 pixels in HU, explicit VR little endian."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.PatientID = patient_id
    ds.PatientName = "Test^Stroke"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyDate = "20240301"
    ds.StudyTime = "101500"
    ds.AccessionNumber = "ACC1"
    ds.Modality = "CT"
    ds.SeriesDescription = "Head non-contrast"
    ds.BodyPartExamined = "HEAD"
    ds.SeriesNumber = 1
    ds.InstanceNumber = number
    ds.ImagePositionPatient = [0.0, 0.0, float(number) * 5.0]
    ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    ds.PixelSpacing = [0.5, 0.5]
    ds.SliceThickness = 5.0
    ds.Rows = ds.Columns = 16
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.RescaleIntercept = -1024
    ds.RescaleSlope = 1
    ds.PixelData = (np.arange(256, dtype=np.int16).reshape(16, 16) + 1000).tobytes()
    return ds


def dicom_bytes(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


def stow(client: httpx.Client, dicomweb_url: str, *datasets: Dataset) -> httpx.Response:
    boundary = uuid.uuid4().hex
    body = b"".join(
        f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + dicom_bytes(ds) + b"\r\n"
        for ds in datasets
    ) + f"--{boundary}--\r\n".encode()
    content_type = f'multipart/related; type="application/dicom"; boundary={boundary}'
    return client.post(f"{dicomweb_url}/studies", content=body,
                       headers={"Content-Type": content_type, "Accept": "application/dicom+json"})


@pytest.fixture
def pacs(fresh_orthanc_peer: OrthancPeer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=fresh_orthanc_peer.url, timeout=30) as client:
        yield client


def test_system_answers_with_configured_aet_and_dicomweb(fresh_orthanc_peer: OrthancPeer, pacs: httpx.Client) -> None:
    system = pacs.get("/system").json()
    assert system["DicomAet"] == fresh_orthanc_peer.aet == "ORTHANC"
    assert system["DicomPort"] == fresh_orthanc_peer.dicom_port
    assert system["HttpPort"] == int(fresh_orthanc_peer.url.rsplit(":", 1)[1])
    assert "dicom-web" in pacs.get("/plugins").json()
    assert fresh_orthanc_peer.dicomweb_url == f"{fresh_orthanc_peer.url}/dicom-web"
    assert pacs.get("/dicom-web/studies").status_code in (200, 204)


def test_stow_then_qido_finds_the_study_and_changes_record_it(
    fresh_orthanc_peer: OrthancPeer, pacs: httpx.Client
) -> None:
    study_uid, series_uid = generate_uid(), generate_uid()
    slices = [ct_slice("SW-0001", study_uid, series_uid, n) for n in (1, 2)]
    stored = stow(pacs, fresh_orthanc_peer.dicomweb_url, *slices)
    assert stored.status_code == 200, stored.text
    assert not stored.json().get("00081198", {}).get("Value")  # FailedSOPSequence: empty
    assert len(stored.json()["00081199"]["Value"]) == 2  # ReferencedSOPSequence

    studies = pacs.get("/dicom-web/studies", params={"PatientID": "SW-0001"}).json()
    assert [s["0020000D"]["Value"][0] for s in studies] == [study_uid]
    series = pacs.get(f"/dicom-web/studies/{study_uid}/series", params={"Modality": "CT"}).json()
    assert series[0]["0020000E"]["Value"][0] == series_uid
    assert series[0]["00201209"]["Value"][0] == 2  # NumberOfSeriesRelatedInstances
    assert pacs.get("/dicom-web/studies", params={"PatientID": "SOMEONE-ELSE"}).status_code in (200, 204)

    metadata = pacs.get(f"/dicom-web/studies/{study_uid}/series/{series_uid}/metadata").json()
    assert sorted(m["00200013"]["Value"][0] for m in metadata) == [1, 2]  # InstanceNumber

    # NewInstance at once; StableStudy once the study has been quiet for StableAge (1 s here).
    deadline = time.monotonic() + 15
    while True:
        changes = pacs.get("/changes", params={"since": 0, "limit": 100}).json()
        kinds = [c["ChangeType"] for c in changes["Changes"]]
        if "StableStudy" in kinds or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert kinds.count("NewInstance") == 2
    assert "StableStudy" in kinds
    stable = next(c for c in changes["Changes"] if c["ChangeType"] == "StableStudy")
    assert pacs.get(f"/studies/{stable['ID']}").json()["MainDicomTags"]["StudyInstanceUID"] == study_uid


def test_reset_empties_storage_and_changes(fresh_orthanc_peer: OrthancPeer, pacs: httpx.Client) -> None:
    stow(pacs, fresh_orthanc_peer.dicomweb_url, ct_slice("SW-0002", generate_uid(), generate_uid()))
    assert len(pacs.get("/patients").json()) == 1
    fresh_orthanc_peer.reset()
    assert pacs.get("/patients").json() == []
    assert pacs.get("/changes").json()["Changes"] == []


def test_dicom_port_answers_c_echo(orthanc_peer: OrthancPeer) -> None:
    ae = AE(ae_title="STROKEWATCH")
    ae.add_requested_context(VERIFICATION)
    assoc = ae.associate("127.0.0.1", orthanc_peer.dicom_port, ae_title=orthanc_peer.aet)
    assert assoc.is_established
    try:
        assert assoc.send_c_echo().Status == 0x0000
    finally:
        assoc.release()


def test_users_and_modalities_are_configured(tmp_path: Path) -> None:
    engine_port = free_port()
    modalities = {"STROKEWATCH": ("STROKEWATCH", "127.0.0.1", engine_port)}
    with OrthancPeer(tmp_path, aet="SANDBOXPACS", modalities=modalities, users={"radiology": "secret"}) as peer:
        assert httpx.get(f"{peer.url}/system").status_code == 401
        system = httpx.get(f"{peer.url}/system", auth=("radiology", "secret"))
        assert system.status_code == 200 and system.json()["DicomAet"] == "SANDBOXPACS"
        known = httpx.get(f"{peer.url}/modalities", params={"expand": ""}, auth=("radiology", "secret")).json()
        assert known["STROKEWATCH"]["AET"] == "STROKEWATCH" and known["STROKEWATCH"]["Port"] == engine_port
    assert not _answers(peer.url)  # stopped on leaving the context


def _answers(url: str) -> bool:
    try:
        httpx.get(f"{url}/system", timeout=1)
        return True
    except httpx.TransportError:
        return False


def test_committed_config_matches_the_generator() -> None:
    committed: dict[str, Any] = json.loads((REPO / "deploy/orthanc/orthanc.json").read_text())
    assert committed == orthanc_config(Path("orthanc-storage"))


def test_detached_sandbox_up_status_down(tmp_path: Path) -> None:
    state_dir = tmp_path / "sandbox"
    assert status(state_dir) is None
    info = start_detached(state_dir)
    try:
        current = status(state_dir)
        assert current is not None and current.healthy
        assert httpx.get(f"{info.fhir_base_url}/metadata").json()["fhirVersion"] == "4.0.1"
        assert httpx.get(f"{info.orthanc_url}/system").json()["DicomPort"] == info.orthanc_dicom_port
        assert info.dicomweb_url == f"{info.orthanc_url}/dicom-web"
        assert start_detached(state_dir) == info  # already up: the same sandbox, not a second one
        # The engine learns the sandbox's URLs from engine.env, without importing the sandbox.
        env = sandbox_env(state_dir)
        assert env["STROKEWATCH_PACS__DICOMWEB_URL"] == info.dicomweb_url
        assert env["STROKEWATCH_EHR__BASE_URL"] == info.fhir_base_url and env["STROKEWATCH_SANDBOX"] == "true"
    finally:
        assert stop(state_dir)
    assert status(state_dir) is None
    assert sandbox_env(state_dir) == {}  # gone with the sandbox
    assert not _answers(info.orthanc_url)
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{info.fhir_base_url}/metadata", timeout=2)
    assert not stop(state_dir)
