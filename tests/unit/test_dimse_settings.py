"""``pacs.kind = "dimse"``: its settings (defaults, environment names, what is refused), what doctor says from them, the
adapter bootstrap builds, and C-FIND answers read without pydicom's value conversion (no PHI in warnings or logs)."""

from __future__ import annotations

import io
import logging
import os
import struct
import warnings
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from pydantic import ValidationError
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom.dsutils import decode, encode

from integration.adapters.dimse import DimsePacs
from integration.adapters.dimse_query import Answer, query, series_ref, study_ref
from integration.adapters.dimse_session import part10_prefix
from integration.bootstrap import build_dimse_pacs
from integration.config import Settings
from integration.services.doctor.stated import check_settings

NODE = {"host": "pacs.example.org", "called_aet": "PACS1"}


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("STROKEWATCH_"):
            monkeypatch.delenv(name)


def dimse_settings(tmp_path: Path, **dimse: object) -> Settings:
    return Settings.model_validate({"data_dir": str(tmp_path), "pacs": {"kind": "dimse", "dimse": {**NODE, **dimse}}})


def test_defaults_are_c_get_from_strokewatch_to_port_104() -> None:
    dimse = Settings().pacs.dimse
    assert (dimse.retrieve, dimse.calling_aet, dimse.port, dimse.use_tls) == ("c-get", "STROKEWATCH", 104, False)
    assert (dimse.connect_timeout_s, dimse.acse_timeout_s, dimse.dimse_timeout_s, dimse.network_timeout_s) == (
        10.0, 30.0, 60.0, 60.0)
    assert dimse.host is None and dimse.called_aet is None and dimse.move_destination is None


def test_settings_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in {"KIND": "dimse", "DIMSE__HOST": "10.1.2.3", "DIMSE__PORT": "11112",
                        "DIMSE__CALLED_AET": " PACS1 ", "DIMSE__CALLING_AET": "AI_NODE", "DIMSE__RETRIEVE": "c-move",
                        "DIMSE__DIMSE_TIMEOUT_S": "5", "DIMSE__USE_TLS": "true",
                        "DIMSE__TLS__VERIFY": "false", "RETRIEVE_DEADLINE_S": "30"}.items():
        monkeypatch.setenv(f"STROKEWATCH_PACS__{name}", value)
    pacs = Settings().pacs
    assert (pacs.kind, pacs.dimse.host, pacs.dimse.port, pacs.dimse.called_aet) == ("dimse", "10.1.2.3", 11112, "PACS1")
    assert (pacs.dimse.calling_aet, pacs.dimse.retrieve, pacs.dimse.dimse_timeout_s) == ("AI_NODE", "c-move", 5.0)
    assert pacs.dimse.use_tls and not pacs.dimse.tls.verify and pacs.retrieve_deadline_s == 30.0


@pytest.mark.parametrize(("pacs", "named"), [
    ({"kind": "dimse"}, "STROKEWATCH_PACS__DIMSE__HOST and STROKEWATCH_PACS__DIMSE__CALLED_AET"),
    ({"kind": "dimse", "dimse": {"host": "x"}}, "STROKEWATCH_PACS__DIMSE__CALLED_AET"),
    ({"dimse": {"called_aet": "A_TITLE_LONGER_THAN_16"}}, "STROKEWATCH_PACS__DIMSE__CALLED_AET"),
    ({"dimse": {"calling_aet": "BACK\\SLASH"}}, "STROKEWATCH_PACS__DIMSE__CALLING_AET"),
    ({"dimse": {"retrieve": "c-store"}}, "retrieve"),
    ({"dimse": {"tls": {"verify": False}}}, "STROKEWATCH_PACS__DIMSE__USE_TLS"),
    ({"dimse": {"port": 0}}, "port"),
    ({"dimse": {"dimse_timeout_s": 0}}, "dimse_timeout_s"),
])
def test_mistakes_are_refused_naming_the_setting(pacs: dict[str, object], named: str) -> None:
    with pytest.raises(ValidationError) as err:
        Settings.model_validate({"pacs": pacs})
    assert named in str(err.value)


def test_doctor_needs_no_dicomweb_url_for_a_dimse_pacs(tmp_path: Path) -> None:
    settings = Settings.model_validate({"data_dir": str(tmp_path), "ehr": {"base_url": "http://ehr/fhir"},
                                        "pacs": {"kind": "dimse", "dimse": NODE}})
    assert check_settings(settings).ok
    generic = Settings.model_validate({"ehr": {"base_url": "http://ehr/fhir"}})
    assert "STROKEWATCH_PACS__DICOMWEB_URL" in check_settings(generic).detail


def test_bootstrap_builds_the_adapter_from_the_settings(tmp_path: Path) -> None:
    pacs = build_dimse_pacs(dimse_settings(tmp_path, port=4242, calling_aet="AI_NODE"))
    assert isinstance(pacs, DimsePacs) and pacs.retrieve == "c-get" and pacs.spool is None and pacs.tls is None
    assert pacs.where == "PACS PACS1@pacs.example.org:4242" and pacs.calling_aet == "AI_NODE"
    moving = build_dimse_pacs(dimse_settings(tmp_path, retrieve="c-move"))
    assert moving.move_destination == "STROKEWATCH" and moving.spool is not None  # our SCP's title, its spool
    assert any(note.warning and "STROKEWATCH_SCP__ENABLED" in note.detail for note in moving.notes)
    named = build_dimse_pacs(dimse_settings(tmp_path, retrieve="c-move", move_destination="AI_SCP"))
    assert named.move_destination == "AI_SCP"
    with pytest.raises(ValueError, match="C-MOVE"):
        DimsePacs("h", 104, "PACS1", retrieve="c-move")


def wire(ds: Dataset) -> Dataset:
    """A data set as a C-FIND answer arrives: encoded, then decoded by pynetdicom (raw elements)."""
    encoded = encode(ds, ImplicitVRLittleEndian.is_implicit_VR, ImplicitVRLittleEndian.is_little_endian)
    assert encoded is not None
    decoded = decode(io.BytesIO(encoded), True, True)
    assert decoded is not None
    return decoded


def test_answers_are_read_like_qido_without_pydicoms_value_checks(caplog: pytest.LogCaptureFixture) -> None:
    mrn = "PHI-" + "9" * 70  # longer than LO allows: pydicom's conversion would warn quoting it
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # building the test answer
        study = Dataset()
        study.SpecificCharacterSet = "ISO_IR 100"
        study.StudyInstanceUID, study.PatientID, study.IssuerOfPatientID = "1.2.3", mrn, "HOSP_A"
        study.StudyDate, study.StudyTime, study.TimezoneOffsetFromUTC = "20240229", "233000", "-0500"
        study.ModalitiesInStudy, study.StudyDescription = ["CT", "SR"], "Schädel nativ"
        answer = wire(study)
    caplog.set_level(logging.DEBUG)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ref = study_ref(Answer(answer), UTC)
    assert ref is not None and ref.patient_id == mrn and ref.issuer == "HOSP_A"
    assert ref.study_datetime == datetime(2024, 2, 29, 23, 30, tzinfo=timezone(-timedelta(hours=5)))
    assert ref.modalities == ("CT", "SR") and ref.description == "Schädel nativ" and not ref.date_only
    assert not caught and "PHI-" not in caplog.text


def test_series_and_instance_answers_fill_every_attribute_selection_reads() -> None:
    series, instance = Dataset(), Dataset()
    series.SeriesInstanceUID, series.Modality, series.SeriesDescription = "1.2.3.4", "CT", "Head 5mm"
    series.BodyPartExamined, series.NumberOfSeriesRelatedInstances = "HEAD", "32"
    instance.SOPClassUID, instance.ImageType = "1.2.840.10008.5.1.4.1.1.2", ["ORIGINAL", "PRIMARY", "AXIAL"]
    instance.SliceThickness, instance.ConvolutionKernel = "5.0", "H30s"
    instance.ImageOrientationPatient, instance.Rows, instance.Columns = [1, 0, 0, 0, 1, 0], 512, 512
    first = Answer(wire(instance))
    ref = series_ref("1.2.3", Answer(wire(series)), first, Answer(wire(series)).integer(
        "NumberOfSeriesRelatedInstances") or 0, "CT HEAD")
    assert (ref.modality, ref.n_instances, ref.body_part, ref.series_description) == ("CT", 32, "HEAD", "Head 5mm")
    assert (ref.sop_class_uid, ref.image_type, ref.slice_thickness) == (
        "1.2.840.10008.5.1.4.1.1.2", ("ORIGINAL", "PRIMARY", "AXIAL"), 5.0)
    assert (ref.convolution_kernel, ref.orientation, ref.rows, ref.columns) == (
        "H30s", (1.0, 0.0, 0.0, 0.0, 1.0, 0.0), 512, 512)
    assert ref.frames_per_instance == 1 and ref.study_description == "CT HEAD"
    bare = series_ref("1.2.3", Answer(wire(series)), None, 32, "")
    assert bare.rows is None and bare.orientation is None and bare.sop_class_uid == ""


def test_queries_ask_for_empty_return_keys_and_match_the_rest() -> None:
    ds = query("IMAGE", ("SOPInstanceUID", "Rows"), StudyInstanceUID="1.2.3", InstanceNumber="1")
    assert ds.QueryRetrieveLevel == "IMAGE" and ds.StudyInstanceUID == "1.2.3" and ds.InstanceNumber == 1
    assert ds.SOPInstanceUID in ("", None) and ds.Rows is None


def test_part10_prefix_makes_a_received_data_set_a_file_pydicom_reads() -> None:
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = "1.2.840.10008.5.1.4.1.1.2", "1.2.3.45", "CT"
    body = encode(ds, False, True)  # Explicit VR Little Endian, as received in a C-STORE
    assert body is not None
    read = dcmread(io.BytesIO(part10_prefix("1.2.840.10008.5.1.4.1.1.2", "1.2.3.45", ExplicitVRLittleEndian) + body))
    meta = read.file_meta
    assert (meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID) == ("1.2.840.10008.5.1.4.1.1.2", "1.2.3.45")
    assert meta.TransferSyntaxUID == ExplicitVRLittleEndian and read.Modality == "CT"
    other = part10_prefix("1.2.3", "1.2.3.4", "1.2.840.10008.1.2")  # odd-length UIDs: padded to even lengths
    assert struct.unpack("<I", other[140:144])[0] == len(other) - 144 and len(other) % 2 == 0
