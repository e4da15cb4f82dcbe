"""The de-identification rules on crafted inputs: PS3.15 Annex E actions on a data set with private tags, nested
sequences, overlays and references; the keyed pseudonyms and shifts; FHIR resources rebuilt from the allow-list;
the export directory that shows nothing until complete."""

from __future__ import annotations

import io
import json
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import UID, CTImageStorage, ExplicitVRLittleEndian, SecondaryCaptureImageStorage

from integration.adapters.deid_export import ExportDirectory, ExportDirectoryError
from integration.adapters.dicom_deid import deidentify, encode
from integration.domain.deid import (
    MAX_SHIFT_DAYS,
    MIN_SHIFT_DAYS,
    DeidKey,
    DeidKeyError,
    PatientContext,
    deid_observation,
    deid_patient,
    deid_risk_assessment,
    shift_dicom_date,
    shift_fhir_date,
)
from integration.domain.types import DomainError, Outcome, PatientInfo, SeriesRef, StudyRef
from integration.services.deid import ExportSources, export, parse_selection
from tests.unit.fakes import FakeClock

KEY = DeidKey(b"0f1e2d3c4b5a69788796a5b4c3d2e1f0-unit-test-key")
OTHER = DeidKey(b"a9b8c7d6e5f4a3b2c1d0e9f8a7b6c5d4-another-site")
STUDY, SERIES, SOP = "1.2.826.0.1.3680043.8.498.11", "1.2.826.0.1.3680043.8.498.12", "1.2.826.0.1.3680043.8.498.13"
OTHER_SOP, FRAME = "1.2.826.0.1.3680043.8.498.14", "1.2.826.0.1.3680043.8.498.15"
NAME, MRN, BIRTH = "Quillfeather^Zephyrine", "MRN-77123", "19480229"


def crafted() -> Dataset:
    """A CT instance carrying everything a de-identifier must deal with."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = CTImageStorage, UID(SOP)
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.SourceApplicationEntityTitle = "HOSPITAL_PACS"
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, SOP
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = STUDY, SERIES, FRAME
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientBirthTime = NAME, MRN, BIRTH, "0712"
    ds.IssuerOfPatientID, ds.OtherPatientNames = "GENERAL-HOSP", "Zephy^Q"
    ds.PatientSex, ds.PatientAge, ds.PatientWeight = "F", "076Y", "61.5"
    ds.StudyDate, ds.StudyTime, ds.SeriesDate = "20240301", "101500", "20240302"
    ds.AcquisitionDateTime = "20240301101700.123+0100"
    ds.AccessionNumber, ds.StudyID = "ACC99812", "4471"
    ds.InstitutionName, ds.InstitutionAddress = "St Elsewhere", "1 Hospital Road, Springfield"
    ds.ReferringPhysicianName, ds.OperatorsName = "Doctor^Who", "Tech^Nician"
    ds.StudyDescription, ds.SeriesDescription = f"CT HEAD for {MRN}", "AX 5mm"
    ds.StationName, ds.DeviceSerialNumber = "CT-ROOM-2", "SN12345"
    ds.Modality, ds.Manufacturer, ds.ConvolutionKernel, ds.BodyPartExamined = "CT", "Acme", "H30s", "HEAD"
    ds.ImageComments = f"patient {NAME} born {BIRTH}"
    ds.OtherPatientIDsSequence = Sequence([_item(PatientID="OLD-MRN-1")])
    ref = _item(ReferencedSOPClassUID=CTImageStorage, ReferencedSOPInstanceUID=OTHER_SOP)
    ref.ContentDate = "20240228"
    ref.ReviewerName = "Nested^Person"  # a person at depth 2
    ref.SourceImageSequence = Sequence([_item(ReferencedSOPClassUID=CTImageStorage, ReferencedSOPInstanceUID=SOP)])
    ds.ReferencedImageSequence = Sequence([ref.copy()])  # removed by the table (X)
    ds.SourceImageSequence = Sequence([ref])  # not named: recursed and cleaned
    ds.add_new(0x00091010, "LO", "private creator")
    ds.add_new(0x00091011, "LO", f"{NAME} {MRN}")
    ref.add_new(0x00291010, "LO", "ACME")
    ref.add_new(0x00291020, "OB", MRN.encode())  # private inside a sequence
    ds.add_new(0x60000010, "US", 4)
    ds.add_new(0x60003000, "OW", b"\x00\x01" * 8)  # overlay data
    ds.add_new(0x50000005, "US", 1)  # a retired curve
    ds.Rows = ds.Columns = 4
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.RescaleIntercept, ds.RescaleSlope = "-1024", "1"
    ds.ImagePositionPatient, ds.ImageOrientationPatient = [0, 0, 0], [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing = [0.5, 0.5]
    ds.PixelData = np.arange(16, dtype=np.uint16).tobytes()
    return ds


def _item(**values: str) -> Dataset:
    item = Dataset()
    for k, v in values.items():
        setattr(item, k, v)
    return item


def _all_elements(ds: Dataset) -> list[tuple[int, str, object]]:
    found = []
    for elem in ds.iterall():
        found.append((int(elem.tag), elem.VR, elem.value))
    return found


def test_the_profile_actions_on_a_crafted_dataset() -> None:
    ctx = PatientContext.of(KEY, "patient-1")
    original_pixels = crafted().PixelData
    ds = deidentify(crafted(), ctx, KEY)

    assert ds.PatientID == ctx.pseudonym and str(ds.PatientName) == ctx.pseudonym
    assert ds.PatientBirthDate == "" and "PatientBirthTime" not in ds and "IssuerOfPatientID" not in ds
    assert (ds.PatientSex, ds.PatientAge, float(ds.PatientWeight)) == ("F", "076Y", 61.5)  # Retain Characteristics
    assert ds.AccessionNumber == "" and ds.StudyID == "" and ds.ReferringPhysicianName == ""
    for gone in ("InstitutionName", "InstitutionAddress", "OperatorsName", "StudyDescription", "SeriesDescription",
                 "StationName", "DeviceSerialNumber", "ImageComments", "OtherPatientNames", "OtherPatientIDsSequence",
                 "ReferencedImageSequence"):
        assert gone not in ds, gone
    assert (ds.Manufacturer, ds.ConvolutionKernel, ds.BodyPartExamined) == ("Acme", "H30s", "HEAD")
    # private tags, overlays and curves, at every depth
    tags = [t for t, _, _ in _all_elements(ds)]
    assert not [t for t in tags if (t >> 16) % 2 == 1], "private tags left"
    assert not [t for t in tags if 0x5000 <= t >> 16 <= 0x60FF], "curve/overlay groups left"
    # dates moved back by the patient's shift, times kept
    days = ctx.shift_days
    assert MIN_SHIFT_DAYS <= days <= MAX_SHIFT_DAYS
    assert ds.StudyDate == shift_dicom_date("20240301", days) and ds.StudyTime == "101500"
    assert ds.AcquisitionDateTime == f"{shift_dicom_date('20240301', days)}101700.123+0100"
    assert (date(2024, 3, 2) - date(2024, 3, 1)).days == _days_between(ds.SeriesDate, ds.StudyDate)
    nested = ds.SourceImageSequence[0]
    assert nested.ContentDate == shift_dicom_date("20240228", days) and "ReviewerName" not in nested
    # UIDs: replaced, keyed, consistent with the references; standard UIDs kept
    assert ds.SOPInstanceUID == KEY.uid(SOP) and ds.StudyInstanceUID == KEY.uid(STUDY)
    assert ds.SeriesInstanceUID == KEY.uid(SERIES) and ds.FrameOfReferenceUID == KEY.uid(FRAME)
    assert nested.ReferencedSOPInstanceUID == KEY.uid(OTHER_SOP)
    assert nested.SourceImageSequence[0].ReferencedSOPInstanceUID == ds.SOPInstanceUID  # a reference to itself
    assert ds.SOPClassUID == CTImageStorage and nested.ReferencedSOPClassUID == CTImageStorage
    assert all(len(u) <= 64 and u.startswith("2.25.") for u in (ds.SOPInstanceUID, ds.StudyInstanceUID))
    assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    assert "SourceApplicationEntityTitle" not in ds.file_meta
    assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    # what was done, said in the data set
    assert ds.PatientIdentityRemoved == "YES" and ds.LongitudinalTemporalInformationModified == "MODIFIED"
    codes = {(c.CodeValue, c.CodingSchemeDesignator) for c in ds.DeidentificationMethodCodeSequence}
    assert codes == {("113100", "DCM"), ("113107", "DCM"), ("113108", "DCM")}
    assert ds.PixelData == original_pixels
    # and the file, byte for byte, names none of it
    raw = encode(ds)
    for needle in (NAME, "Quillfeather", "Zephyrine", MRN, "OLD-MRN-1", BIRTH, "1948-02-29", STUDY, SERIES, SOP,
                   OTHER_SOP, FRAME, "St Elsewhere", "Doctor", "Nested", "HOSPITAL_PACS", "20240301", "ACC99812"):
        assert needle.encode() not in raw, needle
    back = dcmread(io.BytesIO(raw))
    assert back.PixelData == original_pixels and back.PatientID == ctx.pseudonym


def _days_between(a: str, b: str) -> int:
    return (date(int(a[:4]), int(a[4:6]), int(a[6:8])) - date(int(b[:4]), int(b[4:6]), int(b[6:8]))).days


def test_instances_the_profile_cannot_make_safe_are_refused() -> None:
    ctx = PatientContext.of(KEY, "patient-1")
    burned = crafted()
    burned.BurnedInAnnotation = "YES"
    with pytest.raises(DomainError, match="BurnedInAnnotation"):
        deidentify(burned, ctx, KEY)
    capture = crafted()
    capture.SOPClassUID = SecondaryCaptureImageStorage
    with pytest.raises(DomainError, match="not CT or MR"):
        deidentify(capture, ctx, KEY)


def test_keys_pseudonyms_and_shifts() -> None:
    for bad in (b"changeme", b"x" * 40, b"short-but-random-1234"):
        with pytest.raises(DeidKeyError):
            DeidKey(bad)
    assert "0f1e" not in repr(KEY)
    same = DeidKey(b"0f1e2d3c4b5a69788796a5b4c3d2e1f0-unit-test-key")
    assert same.patient("p1") == KEY.patient("p1") and same.uid(SOP) == KEY.uid(SOP)
    assert same.shift_days("p1") == KEY.shift_days("p1") and same.key_id == KEY.key_id
    assert OTHER.patient("p1") != KEY.patient("p1") and OTHER.uid(SOP) != KEY.uid(SOP)
    assert OTHER.key_id != KEY.key_id and KEY.patient("p1") != KEY.patient("p2")
    assert shift_fhir_date("2024-03-01T10:15:00+01:00", 1) == "2024-02-29T10:15:00+01:00"
    assert shift_fhir_date("1948", 10) is None and shift_fhir_date("1948-02", 10) is None
    assert shift_dicom_date("20240301", 1) == "20240229" and shift_dicom_date("2024", 1) is None


def test_fhir_resources_keep_the_allowed_parts_and_link_by_pseudonym() -> None:
    ctx = PatientContext.of(KEY, "pat-9")
    patient = {"resourceType": "Patient", "id": "pat-9", "identifier": [{"system": "urn:mrn", "value": MRN}],
               "name": [{"family": "Quillfeather", "given": ["Zephyrine"]}], "telecom": [{"value": "555-0100"}],
               "address": [{"line": ["1 Road"]}], "gender": "female", "birthDate": "1948-02-29",
               "text": {"div": "<div>Zephyrine</div>"}, "meta": {"lastUpdated": "2024-03-01T00:00:00Z"}}
    out = deid_patient(patient, ctx)
    assert out == {"resourceType": "Patient", "id": ctx.pseudonym, "gender": "female",
                   "identifier": [{"system": "urn:strokewatch:deid:patient", "value": ctx.pseudonym}],
                   "birthDate": shift_fhir_date("1948-02-29", ctx.shift_days)}
    obs = {"resourceType": "Observation", "id": "obs-1", "status": "final", "identifier": [{"value": "x-" + MRN}],
           "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]},
           "subject": {"reference": "Patient/pat-9", "display": "Zephyrine"},
           "effectiveDateTime": "2024-03-01T08:00:00Z", "valueQuantity": {"value": 80, "unit": "/min"},
           "note": [{"text": "seen by Dr Who"}], "performer": [{"reference": "Practitioner/7"}],
           "component": [{"code": {"text": "x"}, "valueQuantity": {"value": 1}, "extension": [{"url": "u"}]}]}
    o = deid_observation(obs, ctx, KEY)
    assert o["subject"] == {"reference": f"Patient/{ctx.pseudonym}"} and o["id"] == KEY.resource_id("Observation",
                                                                                                       "obs-1")
    assert o["effectiveDateTime"] == shift_fhir_date("2024-03-01T08:00:00Z", ctx.shift_days)
    assert o["component"] == [{"code": {"text": "x"}, "valueQuantity": {"value": 1}}]
    assert not {"identifier", "note", "performer"} & set(o)
    ra = {"resourceType": "RiskAssessment", "id": "ra-1", "identifier": [{"system": "urn:sw", "value": "abc"}],
          "status": "final", "subject": {"reference": "Patient/pat-9"}, "occurrenceDateTime": "2024-03-01T09:00:00Z",
          "basis": [{"type": "ImagingStudy", "identifier": {"system": "urn:dicom:uid", "value": f"urn:oid:{STUDY}"}},
                    {"reference": "Observation/obs-1"}, {"reference": "Observation/not-exported"},
                    {"reference": "RiskAssessment/ra-0", "type": "RiskAssessment",
                     "identifier": {"system": "urn:sw", "value": "old"}}],
          "prediction": [{"probabilityDecimal": 0.4, "rationale": "because"}], "performer": {"reference": "Device/1"}}
    r = deid_risk_assessment(ra, ctx, KEY, {"obs-1"}, {STUDY: KEY.uid(STUDY)}.get)
    assert r["basis"][0]["identifier"]["value"] == f"urn:oid:{KEY.uid(STUDY)}"
    assert r["basis"][1] == {"reference": f"Observation/{o['id']}"} and len(r["basis"]) == 3
    assert r["basis"][2]["reference"] == f"RiskAssessment/{KEY.resource_id('RiskAssessment', 'ra-0')}"
    assert r["prediction"] == [{"probabilityDecimal": 0.4}] and "performer" not in r
    text = json.dumps([out, o, r])
    for needle in ("pat-9", MRN, "Quillfeather", "Zephyrine", "1948-02-29", "obs-1", "ra-1", STUDY, "Dr Who", "abc"):
        assert needle not in text, needle


def test_the_export_directory_shows_nothing_until_complete(tmp_path: Path) -> None:
    out = tmp_path / "export"
    ctx = PatientContext.of(KEY, "patient-1")
    target = ExportDirectory(out, KEY)
    target.add_instance(crafted(), ctx)
    target.add_resource({"resourceType": "Patient", "id": ctx.pseudonym})
    assert not out.exists()
    target.abort()
    assert not out.exists() and not list(tmp_path.iterdir())
    target = ExportDirectory(out, KEY)
    target.add_instance(crafted(), ctx)
    target.add_resource({"resourceType": "Patient", "id": ctx.pseudonym})
    assert target.commit({"format": "t"}) == str(out)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] is True and len(manifest["files"]) == 2
    assert [p.name for p in tmp_path.iterdir()] == ["export"]
    with pytest.raises(ExportDirectoryError, match="exists"):
        ExportDirectory(out, KEY)


# -- the export use case, on small fakes of its ports ---------------------------------------------------------


class _Ehr:
    def __init__(self, fail_on: str | None = None) -> None:
        self.fail_on = fail_on

    def find_patient(self, system: str | None, value: str) -> PatientInfo | None:
        return PatientInfo("pat-1", identifiers=(("urn:mrn", MRN),)) if value == MRN else None

    def search(self, resource_type: str, params: dict[str, str]) -> list[dict[str, Any]]:
        if resource_type == self.fail_on:
            raise DomainError(Outcome.EHR_UNAVAILABLE, "EHR answered 503")
        if resource_type == "Patient":
            return [{"resourceType": "Patient", "id": "pat-1", "identifier": [{"system": "urn:mrn", "value": MRN}],
                     "name": [{"family": "Quillfeather"}], "birthDate": "1948-02-29"}]
        return []

    def search_observations(self, patient_id: str, codes: Any, since: Any, updated_since: Any) -> list[dict[str, Any]]:
        return []


class _Pacs:
    def get_study(self, study_uid: str) -> StudyRef | None:
        return StudyRef(study_uid, MRN, None)

    def list_series(self, study_uid: str) -> list[SeriesRef]:
        return [SeriesRef(study_uid, SERIES, "CT", 2), SeriesRef(study_uid, "1.2.3.4", "SR", 1)]


class _Archive:
    def source_instances(self, study_uid: str, series_uid: str) -> list[Dataset]:
        stray = crafted()
        stray.PatientID, stray.SOPInstanceUID = "SOMEONE-ELSE", OTHER_SOP
        return [crafted(), stray]


class _Catalogue:
    def assessed_patients(self) -> list[str]:
        return ["pat-1"]

    def patient_studies(self, fhir_id: str) -> list[str]:
        return [STUDY]


def _sources(ehr: _Ehr) -> ExportSources:
    return ExportSources(ehr=ehr, pacs=_Pacs(), archive=_Archive(), catalogue=_Catalogue(),  # type: ignore[arg-type]
                         key=KEY, clock=FakeClock())


def test_the_export_skips_what_it_must_and_a_peer_failure_leaves_nothing(tmp_path: Path) -> None:
    out = tmp_path / "export"
    report = export(_sources(_Ehr()), ExportDirectory(out, KEY),
                    parse_selection([f"urn:mrn|{MRN}", "# a comment", "urn:mrn|UNKNOWN", "Patient/pat-1"]))
    assert (report.patients, report.studies, report.series, report.instances) == (1, 1, 1, 1)
    reasons = [s["reason"] for s in report.skipped]
    assert reasons[0] == "no Patient with that identifier" and report.skipped[0]["what"] == "selection line 3"
    assert any("modality SR" in r for r in reasons) and any("none of the Patient's identifiers" in r for r in reasons)
    assert len(list(out.glob("dicom/**/*.dcm"))) == 1
    assert MRN.encode() not in b"".join(p.read_bytes() for p in out.rglob("*") if p.is_file())
    assert export(_sources(_Ehr()), ExportDirectory(tmp_path / "all", KEY), None).patients == 1

    failing = tmp_path / "failing"
    with pytest.raises(DomainError, match="503"):
        export(_sources(_Ehr(fail_on="RiskAssessment")), ExportDirectory(failing, KEY), None)
    assert not failing.exists() and not list(tmp_path.glob(".failing.partial-*"))
