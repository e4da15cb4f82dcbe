"""DICOM -> Slice decoding: transfer syntaxes, HU, MONOCHROME1, geometry and corrupt data.

Uses pydicom's shipped real test files, plus compressed copies made by real encoders (dcmtk's dcmcjpeg,
dcmcjpls, dcmcrle and OpenJPEG through pydicom), each compared with the uncompressed original.
"""

from __future__ import annotations

import copy
import io
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate, generate_frames
from pydicom.uid import (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    RLELossless,
    generate_uid,
)

from integration.adapters.dicom_decode import decode_dataset, decode_file, decode_part10
from integration.domain.types import DomainError, Outcome


def _path(name: str) -> str:
    path = get_testdata_file(name)
    assert path is not None, f"pydicom test file {name} missing"
    return str(path)


def _bytes(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _reference_hu(path: str) -> np.ndarray:
    ds = pydicom.dcmread(path)
    return ds.pixel_array.astype(np.float64) * float(ds.get("RescaleSlope", 1)) + float(ds.get("RescaleIntercept", 0))


def test_ct_small_is_hounsfield_units_with_geometry() -> None:
    decoded = decode_file(_path("CT_small.dcm"))
    assert decoded.modality == "CT" and len(decoded.slices) == 1
    s = decoded.slices[0]
    assert s.pixels.dtype == np.float32 and s.pixels.shape == (128, 128)
    np.testing.assert_array_equal(s.pixels, _reference_hu(_path("CT_small.dcm")))
    assert s.pixels.min() < -800  # intercept -1024 applied: air is strongly negative
    ds = pydicom.dcmread(_path("CT_small.dcm"))
    assert s.position == tuple(float(v) for v in ds.ImagePositionPatient)
    assert s.orientation == tuple(float(v) for v in ds.ImageOrientationPatient)
    assert s.pixel_spacing == tuple(float(v) for v in ds.PixelSpacing)


@pytest.mark.parametrize(
    "name",
    [
        "MR_small_RLE.dcm",
        "MR_small_jp2klossless.dcm",
        "MR_small_jpeg_ls_lossless.dcm",
        "MR_small_implicit.dcm",
        "MR_small_bigendian.dcm",
        "MR_small_expb.dcm",
    ],
)
def test_every_mr_small_variant_decodes_to_the_uncompressed_pixels(name: str) -> None:
    reference = decode_file(_path("MR_small.dcm")).slices[0]
    variant = decode_file(_path(name)).slices[0]
    np.testing.assert_array_equal(variant.pixels, reference.pixels)
    assert variant.position == reference.position


@pytest.mark.parametrize(
    ("tool", "args", "tolerance"),
    [
        ("dcmcjpeg", ["+e1"], 0.0),  # JPEG lossless SV1 (1.2.840.10008.1.2.4.70)
        ("dcmcjpeg", ["+el", "+sv", "6"], 0.0),  # JPEG lossless process 14
        ("dcmcjpls", [], 0.0),  # JPEG-LS lossless
        ("dcmcrle", [], 0.0),  # RLE lossless
        ("dcmcjpeg", ["+ee"], 40.0),  # JPEG extended (lossy, 12 bit): close, not equal
    ],
)
def test_ct_compressed_by_dcmtk_decodes_like_the_original(tmp_path: Path, tool: str, args: list[str],
                                                          tolerance: float) -> None:
    source = _path("CT_small.dcm")
    target = tmp_path / "compressed.dcm"
    subprocess.run([tool, *args, source, str(target)], check=True, capture_output=True)
    assert pydicom.dcmread(target).file_meta.TransferSyntaxUID.is_compressed
    original = decode_file(source).slices[0].pixels
    decoded = decode_file(target).slices[0].pixels
    assert np.abs(decoded - original).max() <= tolerance
    if tolerance:
        assert np.abs(decoded - original).mean() < 5.0


def test_ct_jpeg2000_by_openjpeg_decodes_like_the_original() -> None:
    ds = pydicom.dcmread(_path("CT_small.dcm"))
    ds.compress(JPEG2000Lossless)
    decoded = decode_part10(_bytes(ds)).slices[0].pixels
    np.testing.assert_array_equal(decoded, decode_file(_path("CT_small.dcm")).slices[0].pixels)


def test_shipped_jpeg2000_ct_matches_pydicom() -> None:
    for name in ("693_J2KI.dcm", "J2K_pixelrep_mismatch.dcm"):
        np.testing.assert_allclose(decode_file(_path(name)).slices[0].pixels, _reference_hu(_path(name)))


def test_fast_path_equals_pydicom_path() -> None:
    """The in-place uncompressed reader and pydicom's pixel_array give identical slices."""
    for name in ("CT_small.dcm", "MR_small.dcm", "MR_small_implicit.dcm"):
        fast = decode_file(_path(name)).slices[0]
        slow = decode_dataset(pydicom.dcmread(_path(name))).slices[0]
        np.testing.assert_array_equal(fast.pixels, slow.pixels)


def _synthetic_ct(rows: int = 8, cols: int = 8, *, bits_stored: int = 16, signed: bool = True,
                  syntax: str = ExplicitVRLittleEndian) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = syntax
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "CT"
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, bits_stored, bits_stored - 1
    ds.PixelRepresentation = 1 if signed else 0
    ds.ImagePositionPatient = [-10.0, -20.0, 30.0]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing = [0.5, 0.75]
    ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
    values = (np.arange(rows * cols).reshape(rows, cols) * 10).astype(np.int16 if signed else np.uint16)
    ds.PixelData = values.tobytes()
    return ds


def test_bits_above_bits_stored_are_ignored() -> None:
    ds = _synthetic_ct(bits_stored=12, signed=True)
    stored = np.frombuffer(ds.PixelData, dtype="<i2").copy()
    stored[:4] = [-5, -2048, 2047, 100]
    garbage = stored.view("<u2") & 0x0FFF | 0xA000  # high 4 bits hold overlay garbage
    ds.PixelData = garbage.astype("<u2").tobytes()
    pixels = decode_part10(_bytes(ds)).slices[0].pixels.ravel()
    np.testing.assert_array_equal(pixels[:4], np.array([-5, -2048, 2047, 100]) - 1024)
    assert decode_dataset(pydicom.dcmread(io.BytesIO(_bytes(ds)))).slices[0].pixels.ravel()[1] == -2048 - 1024


def test_unsigned_bits_stored_are_masked() -> None:
    ds = _synthetic_ct(bits_stored=12, signed=False)
    stored = np.frombuffer(ds.PixelData, dtype="<u2") | 0xF000
    ds.PixelData = stored.astype("<u2").tobytes()
    pixels = decode_part10(_bytes(ds)).slices[0].pixels.ravel()
    assert pixels.max() <= 4095 - 1024 and pixels[1] == 10 - 1024


def test_monochrome1_mr_is_inverted_but_ct_keeps_hounsfield_units() -> None:
    mr = pydicom.dcmread(_path("MR_small.dcm"))
    mr2 = decode_part10(_bytes(mr)).slices[0].pixels
    mr.PhotometricInterpretation = "MONOCHROME1"
    mr1 = decode_part10(_bytes(mr)).slices[0].pixels
    lo, hi = -(1 << (int(mr.BitsStored) - 1)), (1 << (int(mr.BitsStored) - 1)) - 1
    np.testing.assert_array_equal(mr1, (lo + hi) - mr2)
    assert np.corrcoef(mr1.ravel(), mr2.ravel())[0, 1] < -0.99

    ct = _synthetic_ct()
    ct.PhotometricInterpretation = "MONOCHROME1"
    np.testing.assert_array_equal(decode_part10(_bytes(ct)).slices[0].pixels,
                                  decode_part10(_bytes(_synthetic_ct())).slices[0].pixels)


@pytest.mark.parametrize("missing", ["ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing"])
def test_missing_geometry_is_inconsistent_geometry(missing: str) -> None:
    ds = _synthetic_ct()
    delattr(ds, missing)
    with pytest.raises(DomainError) as err:
        decode_part10(_bytes(ds))
    assert err.value.outcome is Outcome.INCONSISTENT_GEOMETRY
    assert missing in err.value.message and ds.SOPInstanceUID in err.value.message


def test_truncated_pixel_data_is_corrupt() -> None:
    ds = _synthetic_ct()
    ds.PixelData = ds.PixelData[:50]
    with pytest.raises(DomainError) as err:
        decode_part10(_bytes(ds))
    assert err.value.outcome is Outcome.CORRUPT_PIXEL_DATA and ds.SOPInstanceUID in err.value.message


@pytest.mark.parametrize("syntax", [RLELossless, JPEG2000Lossless])
@pytest.mark.parametrize("damage", ["truncated", "garbage header"])
def test_damaged_compressed_frames_are_corrupt(syntax: str, damage: str) -> None:
    ds = pydicom.dcmread(_path("CT_small.dcm"))
    ds.compress(syntax)
    frame = bytearray(next(generate_frames(ds.PixelData, number_of_frames=1)))
    if damage == "truncated":
        frame = frame[: len(frame) // 3]
    else:
        frame[4:60] = b"\x07" * 56  # the RLE segment table / the J2K SIZ marker segment
    ds.PixelData = encapsulate([bytes(frame)])
    with pytest.raises(DomainError) as err:
        decode_part10(_bytes(ds))
    assert err.value.outcome is Outcome.CORRUPT_PIXEL_DATA
    assert ds.SOPInstanceUID in err.value.message


def test_unknown_compressed_syntax_is_unsupported() -> None:
    ds = pydicom.dcmread(_path("CT_small.dcm"))
    ds.compress(RLELossless)
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"  # MPEG2: no image decoder exists
    with pytest.raises(DomainError) as err:
        decode_part10(_bytes(ds))
    assert err.value.outcome is Outcome.UNSUPPORTED_TRANSFER_SYNTAX and "MPEG2" in err.value.message


def test_not_dicom_and_colour_images_are_named_errors() -> None:
    with pytest.raises(DomainError) as err:
        decode_part10(b"this is not a DICOM object at all" * 10)
    assert err.value.outcome is Outcome.CORRUPT_PIXEL_DATA
    with pytest.raises(DomainError) as err:
        decode_file(_path("SC_rgb_rle.dcm"))
    assert err.value.outcome is Outcome.NOT_IMAGE and "grayscale" in err.value.message


def test_implicit_vr_fast_path() -> None:
    ds = _synthetic_ct(syntax=ImplicitVRLittleEndian)
    np.testing.assert_array_equal(decode_part10(_bytes(ds)).slices[0].pixels,
                                  decode_part10(_bytes(_synthetic_ct())).slices[0].pixels)


def _enhanced_ct(n_frames: int = 4) -> Dataset:
    ds = _synthetic_ct(rows=6, cols=5)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2.1"
    for keyword in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "RescaleSlope",
                    "RescaleIntercept"):
        delattr(ds, keyword)
    ds.NumberOfFrames = n_frames
    frames = np.arange(n_frames * 30, dtype=np.int16).reshape(n_frames, 6, 5)
    ds.PixelData = frames.tobytes()
    shared = Dataset()
    measures, orientation = Dataset(), Dataset()
    measures.PixelSpacing, measures.SliceThickness = [0.8, 0.9], 2.0
    orientation.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    shared.PixelMeasuresSequence = [measures]
    shared.PlaneOrientationSequence = [orientation]
    ds.SharedFunctionalGroupsSequence = [shared]
    per_frame = []
    for k in range(n_frames):
        item, pos, rescale = Dataset(), Dataset(), Dataset()
        pos.ImagePositionPatient = [0.0, 0.0, 2.0 * (n_frames - k)]  # frames stored top to bottom
        rescale.RescaleSlope, rescale.RescaleIntercept = 1, -1000 - k  # per-frame rescale
        item.PlanePositionSequence = [pos]
        item.PixelValueTransformationSequence = [rescale]
        per_frame.append(item)
    ds.PerFrameFunctionalGroupsSequence = per_frame
    return ds


def test_enhanced_multiframe_ct_gives_one_slice_per_frame() -> None:
    ds = _enhanced_ct()
    for decoded in (decode_part10(_bytes(ds)), decode_dataset(copy.deepcopy(ds))):
        assert len(decoded.slices) == 4
        for k, s in enumerate(decoded.slices):
            assert s.position == (0.0, 0.0, 2.0 * (4 - k))
            assert s.pixel_spacing == (0.8, 0.9) and s.orientation == (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
            np.testing.assert_array_equal(s.pixels, np.arange(k * 30, (k + 1) * 30).reshape(6, 5) - 1000 - k)


def test_multiframe_without_functional_groups_is_inconsistent_geometry() -> None:
    ds = _enhanced_ct()
    del ds.PerFrameFunctionalGroupsSequence
    with pytest.raises(DomainError) as err:
        decode_part10(_bytes(ds))
    assert err.value.outcome is Outcome.INCONSISTENT_GEOMETRY and "per-frame" in err.value.message
