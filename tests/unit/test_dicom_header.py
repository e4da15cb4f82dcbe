"""The decoder's hand-read header (``dicom_header``) agrees with pydicom wherever it answers, and leaves every
unusual object to pydicom (so hostile input keeps the checks and messages it always had)."""

from __future__ import annotations

import copy
import io
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid

from integration.adapters import dicom_header
from integration.adapters.dicom_decode import _file_meta, decode_dataset, decode_part10
from integration.adapters.dicom_header import WANTED, read_native_header


def _bytes(ds: Dataset, implicit: bool = False) -> bytes:
    ds = copy.deepcopy(ds)
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _ct(rows: int = 6, cols: int = 5) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.PatientID = "CT", "MRN-1"
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.RescaleSlope, ds.RescaleIntercept = "1.5", "-1024"
    ds.ImagePositionPatient = [-12.5, 3, "4.25e1"]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing = [0.5, "0.75"]
    ds.PixelData = np.arange(rows * cols, dtype=np.uint16).tobytes()
    # what real CT headers carry before the pixels: nested sequences of undefined length and private elements
    ref = Dataset()
    ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID = "1.2.840.10008.5.1.4.1.1.2", generate_uid()
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = "T-A0100", "SRT", "Brain"
    ref.PurposeOfReferenceCodeSequence = Sequence([code])
    ds.ReferencedImageSequence = Sequence([ref, copy.deepcopy(ref)])
    ds.ReferencedPerformedProcedureStepSequence = Sequence([copy.deepcopy(ref)])  # this one of defined lengths
    _undefined_lengths(ds)
    ds.ReferencedPerformedProcedureStepSequence.is_undefined_length = False
    ds.ReferencedPerformedProcedureStepSequence[0].is_undefined_length_sequence_item = False
    ds.add_new(0x00091010, "LO", "private value")
    ds.add_new(0x00191001, "UN", b"\x01\x02\x03\x04")
    return ds


def _undefined_lengths(ds: Dataset) -> Dataset:
    """Sequences and their items written with undefined lengths and delimiters, as most modalities write them
    (pydicom writes defined lengths unless told)."""
    for element in ds:
        if element.VR == "SQ":
            element.is_undefined_length = True
            for item in element.value:
                item.is_undefined_length_sequence_item = True
                _undefined_lengths(item)
    return ds


def _pydicom_values(blob: bytes) -> dict[str, Any]:
    ds = pydicom.dcmread(io.BytesIO(blob), stop_before_pixels=True, force=True)
    out: dict[str, Any] = {}
    for keyword, _vr in WANTED.values():
        if keyword in ds:
            value = ds[keyword].value
            out[keyword] = [float(v) for v in value] if isinstance(value, list | pydicom.multival.MultiValue) else value
    return out


def _read(blob: bytes) -> dicom_header.NativeHeader | None:
    syntax, meta_end = _file_meta(memoryview(blob))
    found = read_native_header(memoryview(blob), meta_end, explicit=syntax == ExplicitVRLittleEndian)
    return None if found is None else found[0]


def _testdata(name: str) -> bytes:
    path = get_testdata_file(name)
    assert path is not None
    with open(path, "rb") as f:
        return f.read()


@pytest.mark.parametrize("source", ["synthetic-explicit", "synthetic-implicit", "CT_small.dcm", "MR_small.dcm",
                                    "MR_small_implicit.dcm"])
def test_hand_read_values_equal_pydicoms(source: str) -> None:
    synthetic = source.startswith("synthetic")
    blob = _bytes(_ct(), implicit=source.endswith("implicit")) if synthetic else _testdata(source)
    if synthetic:  # the reader meets both kinds of sequence
        assert blob.count(b"\xfe\xff\xdd\xe0") >= 3 and blob.count(b"\xfe\xff\x0d\xe0") >= 4
    header = _read(blob)
    assert header is not None, "the fast path should answer for a plain little-endian image"
    expected = _pydicom_values(blob)
    got = {keyword: header.get(keyword) for keyword, _vr in WANTED.values() if keyword in header}
    assert got.keys() == expected.keys()
    for keyword, value in expected.items():
        if isinstance(value, list):
            assert got[keyword] == pytest.approx(value), keyword
        elif isinstance(value, float):
            assert float(got[keyword]) == pytest.approx(value), keyword
        else:
            assert str(got[keyword]) == str(value), keyword


@pytest.mark.parametrize("implicit", [False, True])
def test_fast_path_decodes_exactly_as_pydicom(implicit: bool) -> None:
    blob = _bytes(_ct(), implicit=implicit)
    fast = decode_part10(blob)
    slow = decode_dataset(pydicom.dcmread(io.BytesIO(blob)))
    assert fast.sop_instance_uid == slow.sop_instance_uid and fast.modality == slow.modality
    np.testing.assert_array_equal(fast.slices[0].pixels, slow.slices[0].pixels)
    assert fast.slices[0].position == slow.slices[0].position
    assert fast.slices[0].pixel_spacing == slow.slices[0].pixel_spacing
    assert fast.slices[0].pixels[0, 1] == pytest.approx(1 * 1.5 - 1024)


def _with(change: str) -> Dataset:
    ds = _ct()
    if change == "empty slope":
        ds.RescaleSlope = ""
    elif change == "multi-valued modality":
        ds.Modality = ["CT", "MR"]
    elif change == "underscored number":
        ds["RescaleIntercept"].value = "1_024"
    elif change == "wrong VR":
        del ds.Rows
        ds.add_new(0x00280010, "UL", 6)
    elif change == "not a UID":
        ds.SOPInstanceUID = "1.2.abc"
    elif change == "padded string":
        ds.Modality = " CT"
    elif change == "enhanced multi-frame":
        ds.SharedFunctionalGroupsSequence = Sequence([Dataset()])
    elif change == "float pixel data":
        del ds.PixelData
        ds.FloatPixelData = np.zeros(30, dtype=np.float32).tobytes()
    elif change == "no pixel data":
        del ds.PixelData
    elif change == "deep nesting":
        inner = Dataset()
        inner.CodeValue = "x"
        for _ in range(dicom_header.MAX_DEPTH + 2):
            outer = Dataset()
            outer.ConceptNameCodeSequence = Sequence([inner])
            inner = outer
        ds.ContentSequence = Sequence([inner])
        _undefined_lengths(ds)
    return ds


@pytest.mark.parametrize("change", ["empty slope", "multi-valued modality", "underscored number", "wrong VR",
                                    "not a UID", "padded string", "enhanced multi-frame", "float pixel data",
                                    "no pixel data", "deep nesting"])
def test_unusual_objects_are_left_to_pydicom(change: str) -> None:
    assert _read(_bytes(_with(change))) is None


def test_truncated_headers_are_left_to_pydicom() -> None:
    blob = _bytes(_ct())
    pixel_at = blob.index(b"\xe0\x7f\x10\x00")
    for cut in range(140, pixel_at, 7):
        assert _read(blob[:cut]) is None


def test_implicit_data_under_an_explicit_syntax_is_left_to_pydicom() -> None:
    implicit = _bytes(_ct(), implicit=True)
    syntax, meta_end = _file_meta(memoryview(implicit))
    assert syntax == ImplicitVRLittleEndian
    assert read_native_header(memoryview(implicit), meta_end, explicit=True) is None


def test_clean_unused_bits_are_not_copied_and_dirty_ones_are_masked() -> None:
    ds = _ct()
    clean = decode_part10(_bytes(ds)).slices[0].pixels
    values = np.arange(30, dtype=np.uint16)
    values[3] |= 0xF000  # an overlay bit above BitsStored 12
    ds.PixelData = values.tobytes()
    dirty = decode_part10(_bytes(ds)).slices[0].pixels
    np.testing.assert_array_equal(dirty, clean)
