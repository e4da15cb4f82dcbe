"""C-FIND identifiers (PS3.4 C.4.1, Study Root): the queries ``dimse.DimsePacs`` sends and its answers read back as
``StudyRef`` / ``SeriesRef``, with the same meaning as the DICOMweb adapter's QIDO-RS answers.

Answers are read from the raw elements as received (bytes decoded with the answer's Specific Character Set), never
through pydicom's value conversion: its validation warnings quote the offending value, and a PatientID or a
description is PHI that must not reach a log. A value that cannot be read is absent. No I/O here.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import tzinfo
from typing import Any

from pydicom.charset import convert_encodings, decode_bytes
from pydicom.datadict import tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from integration.adapters.dicomweb_parse import dicom_datetime
from integration.domain.studytime import localize
from integration.domain.types import SeriesRef, StudyRef

#: Return keys of each level (empty in the query: "send me this").
STUDY_KEYS = ("StudyInstanceUID", "StudyDate", "StudyTime", "TimezoneOffsetFromUTC", "ModalitiesInStudy",
              "StudyDescription", "PatientID", "IssuerOfPatientID")
SERIES_KEYS = ("StudyInstanceUID", "SeriesInstanceUID", "Modality", "SeriesDescription", "BodyPartExamined",
               "NumberOfSeriesRelatedInstances", "SOPClassUID", "StudyDescription")
INSTANCE_KEYS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID", "ImageType",
                 "SliceThickness", "ConvolutionKernel", "ImageOrientationPatient", "NumberOfFrames", "Rows", "Columns",
                 "Modality", "BodyPartExamined")
_BINARY_US = frozenset({"Rows", "Columns"})  # VR US: two binary bytes, not text


def query(level: str, keys: Iterable[str], **matching: str) -> Dataset:
    """A C-FIND (or C-GET/C-MOVE) identifier: ``keys`` asked for (universal matching), ``matching`` matched on."""
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    for keyword in keys:
        setattr(ds, keyword, None)  # an empty value, whatever the VR
    for keyword, value in matching.items():
        setattr(ds, keyword, value)
    return ds


class Answer:
    """One C-FIND match (a pending response's identifier), read without pydicom's value conversion."""

    def __init__(self, ds: Dataset, *, little_endian: bool = True) -> None:
        self._ds = ds
        self._byteorder: Any = "little" if little_endian else "big"
        charset = self._raw("SpecificCharacterSet")
        names = self._decode(charset, ["iso8859"]).split("\\") if charset is not None else [""]
        try:
            self._encodings = convert_encodings([n.strip() for n in names] or [""])
        except Exception:  # an unknown character set: ASCII-compatible default, as pydicom would fall back to
            self._encodings = ["iso8859"]

    def _raw(self, keyword: str) -> bytes | str | None:
        tag = tag_for_keyword(keyword)
        if tag is None or tag not in self._ds:
            return None
        element = self._ds.get_item(tag)
        value = element.value if element is not None else None
        if isinstance(element, RawDataElement):
            return bytes(value) if value else None
        if value is None or isinstance(value, bytes | str):
            return value or None
        return "\\".join(str(v) for v in value) if isinstance(value, list | tuple | MultiValue) else str(value)

    def _decode(self, value: bytes | str, encodings: list[str] | None = None) -> str:
        if isinstance(value, str):
            return value
        try:
            return decode_bytes(value, encodings or self._encodings, set())
        except Exception:  # undecodable bytes: as if absent
            return ""

    def text(self, keyword: str) -> str:
        raw = self._raw(keyword)
        return self._decode(raw).strip(" \x00") if raw is not None else ""

    def texts(self, keyword: str) -> tuple[str, ...]:
        return tuple(part.strip(" \x00") for part in self.text(keyword).split("\\") if part.strip(" \x00"))

    def integer(self, keyword: str) -> int | None:
        raw = self._raw(keyword)
        if raw is None:
            return None
        if keyword in _BINARY_US and isinstance(raw, bytes):
            return int.from_bytes(raw[:2], self._byteorder) if len(raw) == 2 else None
        try:
            return int(float(self._decode(raw).strip(" \x00").split("\\")[0]))
        except ValueError:
            return None

    def number(self, keyword: str) -> float | None:
        try:
            return float(self.texts(keyword)[0])
        except (IndexError, ValueError):
            return None

    def numbers(self, keyword: str, n: int) -> tuple[float, ...] | None:
        try:
            values = tuple(float(v) for v in self.texts(keyword))
        except ValueError:
            return None
        return values if len(values) == n else None


def study_ref(answer: Answer, zone: tzinfo) -> StudyRef | None:
    """A STUDY-level match as the DICOMweb adapter reads a QIDO-RS study; naive dates in ``zone``."""
    uid = answer.text("StudyInstanceUID")
    if not uid:
        return None
    study_time = answer.text("StudyTime")
    when = dicom_datetime(answer.text("StudyDate"), study_time, answer.text("TimezoneOffsetFromUTC"))
    if when is not None:
        when = localize(when, zone)
    return StudyRef(
        study_uid=uid,
        patient_id=answer.text("PatientID"),
        issuer=answer.text("IssuerOfPatientID") or None,
        study_datetime=when,
        modalities=answer.texts("ModalitiesInStudy"),
        description=answer.text("StudyDescription"),
        date_only=when is not None and not study_time,
    )


def series_ref(study_uid: str, series: Answer, instance: Answer | None, n_instances: int,
               study_description: str) -> SeriesRef:
    """A SERIES-level match and one IMAGE-level match of it, as the DICOMweb adapter reads them."""
    first = instance or Answer(Dataset())
    return SeriesRef(
        study_uid=study_uid,
        series_uid=series.text("SeriesInstanceUID"),
        modality=series.text("Modality") or first.text("Modality"),
        n_instances=n_instances,
        body_part=series.text("BodyPartExamined") or first.text("BodyPartExamined"),
        series_description=series.text("SeriesDescription"),
        study_description=series.text("StudyDescription") or study_description,
        sop_class_uid=first.text("SOPClassUID") or series.text("SOPClassUID"),
        image_type=first.texts("ImageType"),
        slice_thickness=first.number("SliceThickness"),
        convolution_kernel=first.text("ConvolutionKernel"),
        orientation=first.numbers("ImageOrientationPatient", 6),
        frames_per_instance=first.integer("NumberOfFrames") or 1,
        rows=first.integer("Rows"),
        columns=first.integer("Columns"),
    )
