"""A hostile DICOM corpus: objects and WADO-RS answers built to exhaust or mislead a DICOM reader.

Every case is generated here with pydicom (nothing is downloaded) and is cheap to build: the "bombs" declare
sizes they do not carry. Each names the outcome an ingest must record for it:

- JPEG 2000 and RLE frames whose header declares 65535 x 65535 pixels; a JPEG 2000 and a JPEG codestream that
  declare 65535 x 65535 inside a 64 x 64 header; NumberOfFrames 10^6 with 1 x 1 frames -> ``too_large`` /
  ``corrupt_pixel_data``, refused before a pixel is allocated;
- pixel data truncated, longer than declared, a transfer syntax that says JPEG 2000 over native pixels and one
  that says native over encapsulated ones, a deflated object that inflates to 640 MiB -> named outcomes;
- WADO-RS answers (served by a stub PACS): a part that is not DICOM, a text/html part, a part Content-Length of
  10^14, a header block of 64 KiB, no closing boundary, wrong (but harmless) part lengths, a series whose
  QIDO-RS answer declares 100,000 instances;
- a 2,000-instance series of 16 x 16 slices (within the default limit: it must be ingested);
- StudyInstanceUIDs with ``../`` and of 200 characters, a SeriesInstanceUID with ``../``.

Instance-level cases hide one hostile instance among 15 good slices, so series selection (16 slices at least)
picks the series and the hostile one is met while the series is read.

``python -m tests.hostile.corpus OUT_DIR`` writes the corpus as files (one folder per case: ``*.dcm``, or
``answer.multipart`` for the raw WADO-RS answers) with a ``manifest.json`` of names and expected outcomes.
"""

from __future__ import annotations

import json
import sys
import zlib
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Literal

import numpy as np
from pydicom import config
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate, generate_frames
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    RLELossless,
    generate_uid,
)

from integration.domain.types import Outcome

CT_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
BOUNDARY = b"hostile-boundary-7f3a"
SIZE = 16  # pixels per side of a good slice
PIXEL_MM = 14.0  # 16 x 14 mm = 224 mm: the contract's field of view
GAP_MM = 5.0
BOMB_SIDE = 65535
DEFLATED_BYTES = 640 << 20  # over the default part limit (512 MiB)

Via = Literal["orthanc", "stub"]


@dataclass
class Case:
    """One hostile input and the outcome its ingest must record (``None``: it must be ingested)."""

    name: str
    expected: Outcome | None
    study_uid: str
    patient_id: str
    series_uid: str = field(default_factory=generate_uid)
    #: Part 10 objects of the series (stored in Orthanc, or served one per part by the stub PACS).
    instances: list[bytes] = field(default_factory=list)
    #: A raw WADO-RS answer for the stub PACS (multipart/related with ``BOUNDARY``) instead of ``instances``.
    answer: bytes | None = None
    via: tuple[Via, ...] = ("orthanc", "stub")
    #: What the stub's QIDO-RS answer declares (None: the truth, from the good slices).
    declared_instances: int | None = None
    #: Detection cases: the UID itself is the hostile part; nothing is retrieved.
    detect_only: bool = False


# -- building blocks ------------------------------------------------------------------------------------------


def taken() -> datetime:
    """When the corpus' studies were taken: an hour ago (UTC), inside any detection window."""
    return datetime.now(UTC) - timedelta(hours=1)


def ct_slice(
    study_uid: str, series_uid: str, k: int, patient_id: str, *, size: int = SIZE, gap_mm: float = GAP_MM
) -> Dataset:
    """A good axial CT slice k of a head series (int16 ramp, HU = stored - 1024)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(CT_STORAGE)
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = CT_STORAGE, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
    ds.PatientID, ds.PatientName = patient_id, "Hostile^Synthetic"
    ds.StudyDate, ds.StudyTime, ds.StudyDescription = f"{taken():%Y%m%d}", f"{taken():%H%M%S}", "CT HEAD W/O"
    ds.Modality, ds.BodyPartExamined, ds.SeriesDescription = "CT", "HEAD", "Head 5mm"
    ds.SeriesNumber, ds.InstanceNumber = 2, k + 1
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.ConvolutionKernel, ds.SliceThickness = "H30s", gap_mm
    ds.Rows = ds.Columns = size
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.ImagePositionPatient = [-112.0, -112.0, -40.0 + gap_mm * k]
    ds.PixelSpacing = [PIXEL_MM * SIZE / size, PIXEL_MM * SIZE / size]
    ramp = np.add.outer(np.arange(size), np.arange(size)) % 200 + 1000 + k
    ds.PixelData = ramp.astype(np.int16).tobytes()
    return ds


def part10(ds: Dataset, syntax: str | None = None, *, encapsulated: bool = False) -> bytes:
    """A Part 10 file whose meta names ``syntax`` (default: the dataset's own), written element by element so
    that the meta can lie about the dataset's encoding (pydicom's writer would refuse to)."""
    meta = FileMetaDataset(ds.file_meta)
    if syntax is not None:
        meta.TransferSyntaxUID = UID(syntax)
    if encapsulated:
        ds["PixelData"].VR = "OB"
        ds["PixelData"].is_undefined_length = True
    body = DicomBytesIO()
    body.is_little_endian, body.is_implicit_VR = True, False
    write_dataset(body, ds)
    head = DicomBytesIO()
    head.is_little_endian, head.is_implicit_VR = True, False
    head.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(head, meta, enforce_standard=True)
    return head.getvalue() + body.getvalue()


def compressed(ds: Dataset, syntax: str) -> Dataset:
    ds.compress(syntax, encoding_plugin="pylibjpeg" if syntax == JPEG2000Lossless else "")
    return ds


def j2k_with_size(frame: bytes, rows: int, columns: int) -> bytes:
    """A JPEG 2000 codestream whose SIZ marker declares ``rows`` x ``columns`` (image offset 0)."""
    assert frame[:4] == b"\xff\x4f\xff\x51", "not a raw J2K codestream"
    patched = bytearray(frame)
    patched[8:24] = int(columns).to_bytes(4, "big") + int(rows).to_bytes(4, "big") + bytes(8)
    return bytes(patched)


def jpeg_declaring(rows: int, columns: int) -> bytes:
    """A baseline JPEG whose SOF0 declares ``rows`` x ``columns`` (one 8-bit component) and holds no scan."""
    sof = b"\xff\xc0\x00\x0b\x08" + rows.to_bytes(2, "big") + columns.to_bytes(2, "big") + b"\x01\x01\x11\x00"
    return b"\xff\xd8" + sof + b"\xff\xd9"


def deflated_bomb(ds: Dataset, inflated: int = DEFLATED_BYTES) -> bytes:
    """Deflated Explicit VR Little Endian whose dataset inflates to ``inflated`` bytes (mostly zeros in PixelData)
    from about 1/1000 of that on the wire."""
    header = DicomBytesIO()
    header.is_little_endian, header.is_implicit_VR = True, False
    del ds.PixelData
    write_dataset(header, ds)
    n = inflated - len(header.getvalue()) - 12
    element = b"\xe0\x7f\x10\x00OB\x00\x00" + n.to_bytes(4, "little")
    squeeze = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    out = [squeeze.compress(header.getvalue() + element)]
    zeros = bytes(1 << 20)
    for _ in range(n >> 20):
        out.append(squeeze.compress(zeros))
    out.append(squeeze.compress(bytes(n & ((1 << 20) - 1))))
    out.append(squeeze.flush())
    meta = FileMetaDataset(ds.file_meta)
    meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    head = DicomBytesIO()
    head.is_little_endian, head.is_implicit_VR = True, False
    head.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(head, meta, enforce_standard=True)
    return head.getvalue() + b"".join(out)


def multipart(
    parts: list[bytes],
    *,
    content_types: list[str] | None = None,
    lengths: list[int | None] | None = None,
    close: bool = True,
    extra_header: bytes = b"",
) -> bytes:
    """A multipart/related WADO-RS answer with ``BOUNDARY``: Content-Length per part as given (None: none)."""
    out = bytearray()
    for k, payload in enumerate(parts):
        headers = b"Content-Type: " + (content_types[k] if content_types else "application/dicom").encode() + b"\r\n"
        length = lengths[k] if lengths is not None else None
        if length is not None:
            headers += b"Content-Length: %d\r\n" % length
        out += b"--" + BOUNDARY + b"\r\n" + headers + extra_header + b"\r\n" + payload + b"\r\n"
    if close:
        out += b"--" + BOUNDARY + b"--\r\n"
    return bytes(out)


def good_series(study_uid: str, series_uid: str, patient_id: str, n: int = 15, *, first: int = 1) -> list[Dataset]:
    return [ct_slice(study_uid, series_uid, k, patient_id) for k in range(first, first + n)]


def _case(
    name: str,
    expected: Outcome | None,
    hostile: bytes | None,
    *,
    via: tuple[Via, ...] = ("orthanc", "stub"),
    good: int = 15,
) -> Case:
    study_uid, series_uid, patient_id = generate_uid(), generate_uid(), f"HOSTILE-{name}"
    instances = [part10(ds) for ds in good_series(study_uid, series_uid, patient_id, good)]
    if hostile is not None:
        instances.insert(0, hostile)  # first, so that a stub PACS serves it first
    return Case(name, expected, study_uid, patient_id, series_uid, instances, via=via)


# -- the corpus -----------------------------------------------------------------------------------------------


def instance_cases() -> list[Case]:
    """Series with one hostile instance among 15 good slices; each is stored in Orthanc and served by the stub."""
    cases: list[Case] = []

    def add(name: str, expected: Outcome, build: object, via: tuple[Via, ...] = ("orthanc", "stub")) -> None:
        case = _case(name, expected, None, via=via)
        # 64 x 64: OpenJPEG's default five decomposition levels need at least 32 pixels a side
        hostile = build(ct_slice(case.study_uid, case.series_uid, 0, case.patient_id, size=64))  # type: ignore[operator]
        case.instances.insert(0, hostile)
        cases.append(case)

    def j2k_bomb(ds: Dataset) -> bytes:
        frame = next(generate_frames(compressed(ds, JPEG2000Lossless).PixelData, number_of_frames=1))
        ds.PixelData = encapsulate([j2k_with_size(frame, BOMB_SIDE, BOMB_SIDE)])
        ds.Rows = ds.Columns = BOMB_SIDE
        return part10(ds)

    def j2k_codestream_bomb(ds: Dataset) -> bytes:
        frame = next(generate_frames(compressed(ds, JPEG2000Lossless).PixelData, number_of_frames=1))
        ds.PixelData = encapsulate([j2k_with_size(frame, BOMB_SIDE, BOMB_SIDE)])  # the header still says 64 x 64
        return part10(ds)

    def rle_bomb(ds: Dataset) -> bytes:
        compressed(ds, RLELossless)
        ds.Rows = ds.Columns = BOMB_SIDE
        return part10(ds)

    def jpeg_sof_bomb(ds: Dataset) -> bytes:
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
        ds.PixelData = encapsulate([jpeg_declaring(BOMB_SIDE, BOMB_SIDE)])
        return part10(ds, JPEGBaseline8Bit, encapsulated=True)

    def million_frames(ds: Dataset) -> bytes:
        ds.Rows = ds.Columns = 1
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
        ds.NumberOfFrames = 1_000_000
        ds.PixelData = bytes(1_000_000)
        return part10(ds)

    def truncated(ds: Dataset) -> bytes:
        ds.PixelData = ds.PixelData[:100]
        return part10(ds)

    def over_long(ds: Dataset) -> bytes:
        ds.PixelData = ds.PixelData * 4
        return part10(ds)

    def says_j2k_is_native(ds: Dataset) -> bytes:
        return part10(ds, JPEG2000Lossless)  # native pixels, defined length, meta says JPEG 2000

    def says_native_is_j2k(ds: Dataset) -> bytes:
        compressed(ds, JPEG2000Lossless)
        return part10(ds, ExplicitVRLittleEndian, encapsulated=True)  # fragments under a native syntax

    add("j2k_65535", Outcome.TOO_LARGE, j2k_bomb)
    add("j2k_codestream_65535", Outcome.CORRUPT_PIXEL_DATA, j2k_codestream_bomb)
    add("rle_65535", Outcome.TOO_LARGE, rle_bomb)
    add("jpeg_sof_65535", Outcome.CORRUPT_PIXEL_DATA, jpeg_sof_bomb)
    add("frames_1e6", Outcome.TOO_LARGE, million_frames)
    add("pixels_truncated", Outcome.CORRUPT_PIXEL_DATA, truncated)
    add("pixels_over_long", Outcome.CORRUPT_PIXEL_DATA, over_long)
    add("syntax_j2k_over_native", Outcome.CORRUPT_PIXEL_DATA, says_j2k_is_native, via=("stub",))  # Orthanc: 400
    add("syntax_native_over_j2k", Outcome.CORRUPT_PIXEL_DATA, says_native_is_j2k)
    add("deflate_640mib", Outcome.TOO_LARGE, deflated_bomb, via=("stub",))  # Orthanc would inflate it
    return cases


def answer_cases() -> list[Case]:
    """Raw WADO-RS answers, served by the stub PACS (Orthanc writes its own, well-formed ones)."""
    cases: list[Case] = []

    def add(name: str, expected: Outcome | None, build: object, **kwargs: object) -> None:
        case = _case(name, expected, None, via=("stub",), good=16)  # 16 good slices: the series is selected
        case.answer = build(case.instances)  # type: ignore[operator]
        for key, value in kwargs.items():
            setattr(case, key, value)
        cases.append(case)

    add(
        "part_not_dicom",
        Outcome.CORRUPT_PIXEL_DATA,
        lambda parts: multipart([b"this is not DICOM, but the part says it is" * 50, *parts]),
    )
    add(
        "part_text_html",
        Outcome.CORRUPT_PIXEL_DATA,
        lambda parts: multipart([b"<html>login</html>", *parts], content_types=["text/html"] * (len(parts) + 1)),
    )
    add(
        "part_length_1e14",
        Outcome.TOO_LARGE,
        lambda parts: multipart(parts, lengths=[10**14] + [None] * (len(parts) - 1)),
    )
    add(
        "part_header_64kib",
        Outcome.TOO_LARGE,
        lambda parts: multipart(parts, extra_header=b"X-Padding: " + b"a" * 65536 + b"\r\n"),
    )
    add("no_closing_boundary", Outcome.PACS_UNAVAILABLE, lambda parts: multipart(parts, close=False))
    # Wrong lengths within the limits are hints the delimiter overrules: the series is read correctly.
    add(
        "part_lengths_wrong",
        None,
        lambda parts: multipart(parts, lengths=[len(p) + (7 if k % 2 else -7) for k, p in enumerate(parts)]),
    )
    add("declares_100k_instances", Outcome.TOO_LARGE, lambda parts: multipart(parts), declared_instances=100_000)
    return cases


def uid_cases() -> list[Case]:
    """Hostile UIDs: study UIDs found by detection (QIDO-RS), a series UID met while a study is read."""
    with config.disable_value_validation():  # pydicom would warn about each UID it is asked to write
        return _uid_cases()


def _uid_cases() -> list[Case]:
    cases: list[Case] = []
    for name, uid in (("study_uid_dotdot", "1.2.826.0.1/../../../../tmp/escaped"), ("study_uid_200", "1." + "2" * 198)):
        patient_id = f"HOSTILE-{name}"
        series_uid = generate_uid()
        instances = [part10(ds) for ds in good_series(uid, series_uid, patient_id, 16, first=0)]
        cases.append(Case(name, Outcome.INVALID_UID, uid, patient_id, series_uid, instances, detect_only=True))
    study_uid, patient_id = generate_uid(), "HOSTILE-series_uid_dotdot"
    series_uid = UID("1.2.826.0.1/../../../../tmp/escaped")
    instances = [part10(ds) for ds in good_series(study_uid, series_uid, patient_id, 16, first=0)]
    cases.append(Case("series_uid_dotdot", Outcome.INVALID_UID, study_uid, patient_id, series_uid, instances))
    return cases


def large_series(n: int = 2000) -> Case:
    """``n`` 16 x 16 slices 0.08 mm apart (160 mm): a long series within the default limit, ingested."""
    study_uid, series_uid, patient_id = generate_uid(), generate_uid(), "HOSTILE-series_2000"
    gap = 160.0 / n
    instances = [part10(ct_slice(study_uid, series_uid, k, patient_id, gap_mm=gap)) for k in range(n)]
    return Case(f"series_{n}", None, study_uid, patient_id, series_uid, instances, via=("orthanc",))


def healthy() -> Case:
    """The control: 20 good slices, ingested last to show the worker survived everything before it."""
    study_uid, series_uid, patient_id = generate_uid(), generate_uid(), "HOSTILE-healthy"
    instances = [part10(ds) for ds in good_series(study_uid, series_uid, patient_id, 20, first=0)]
    return Case("healthy", None, study_uid, patient_id, series_uid, instances)


def corpus(*, large: int = 2000) -> list[Case]:
    """Every case once for each PACS it is meant for, with UIDs of its own (fresh each call), Orthanc's first;
    a healthy control last on each PACS."""
    cases: list[Case] = []
    for via in ("orthanc", "stub"):
        built = [*instance_cases(), *answer_cases(), *uid_cases()]
        if via == "orthanc":
            built.append(large_series(large))
        for case in [*built, healthy()]:
            if via in case.via:
                case.via = (via,)
                cases.append(case)
    return cases


def write(out: Path, cases: list[Case]) -> None:
    """The corpus as files: ``OUT/<pacs>/<case>/NNNN.dcm`` or ``.../answer.multipart``, and a manifest."""
    manifest = []
    for case in cases:
        folder = out / case.via[0] / case.name
        folder.mkdir(parents=True, exist_ok=True)
        if case.answer is not None:
            (folder / "answer.multipart").write_bytes(case.answer)
        else:
            for k, blob in enumerate(case.instances):
                (folder / f"{k:04d}.dcm").write_bytes(blob)
        manifest.append(
            {
                "name": case.name,
                "expected": case.expected.value if case.expected else None,
                "via": list(case.via),
                "study_uid": case.study_uid,
                "series_uid": case.series_uid,
            }
        )
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m tests.hostile.corpus OUT_DIR")
    write(Path(sys.argv[1]), corpus())
    print(f"wrote the hostile corpus to {sys.argv[1]}")
