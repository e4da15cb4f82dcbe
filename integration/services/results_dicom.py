"""The DICOM objects the engine writes back to the PACS, built with highdicom from the source series:

- a Comprehensive 3D SR (TID 1500 Measurement Report) in a new series of the source study: the probability as a
  measurement, the band and each driver as coded qualitative evaluations, the model (name and version) as the
  device observer and the algorithm identification, the model card's "not for diagnostic use" statement as a
  comment, the source instances as evidence, and the SR it replaces (if any) in the Predecessor Documents Sequence;
- a heat-map series of Secondary Capture images, one per source slice: the slice with the model's attribution map
  blended over it and a legend strip below (burned-in), each referencing its source image.

UIDs are derived (``domain.results``): the SR's from the assessment's identifier, the heat-map's from the source series
and the model version; writing them again writes the same instances.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime

import highdicom as hd
import numpy as np
from pydicom import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import UID
from pydicom.valuerep import DA, TM

from inference.preprocess import PreprocessError, Slice, series_tensor
from integration.domain.results import CODING_SCHEME, HeatmapUids, ReportFacts, ReportUids, derived_uid
from integration.domain.types import DomainError, Outcome
from integration.services.heatmap import HeatMap, SliceGeometry, grid_centre, render_overlay, sample_slice

SR_SERIES_NUMBER = 9901
HEATMAP_SERIES_NUMBER = 9902
#: CT brain window for the heat-map's grey background (HU: centre 40, width 80).
CT_BRAIN_WINDOW = (0.0, 80.0)
#: Patient and General Study attributes of type 2 (required, may be empty) that highdicom copies from the source
#: into the SR and the SC: a source that left one out (it happens) still gets its results.
TYPE2_STUDY_ATTRIBUTES = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                          "ReferringPhysicianName", "StudyID", "AccessionNumber")
_PROCEDURES = {
    "CT": hd.sr.CodedConcept("24725-4", "LN", "CT Head"),
    "MR": hd.sr.CodedConcept("24590-2", "LN", "MR Brain"),
}


@dataclass(frozen=True)
class SourceSeries:
    """The source series, ordered along the slice normal: datasets, pixels in physical units, geometry."""

    datasets: list[Dataset]
    pixels: list[np.ndarray]
    geometry: list[SliceGeometry]
    modality: str

    def image_tensor(self) -> np.ndarray:
        """The contract's ``image`` (1, D, H, W), built as the engine's ingest builds it."""
        slices = [Slice(p, g.position, g.orientation, g.pixel_spacing)
                  for p, g in zip(self.pixels, self.geometry, strict=True)]
        try:
            return series_tensor(slices, self.modality)
        except PreprocessError as err:
            raise DomainError(Outcome.INCONSISTENT_GEOMETRY, f"source series: {err}") from err


def source_series(datasets: Sequence[Dataset]) -> SourceSeries:
    """Decode and order the source instances (single-frame CT/MR images with the Image Plane module)."""
    images = [ds for ds in datasets if "PixelData" in ds and "ImagePositionPatient" in ds]
    if len(images) < 2:
        raise DomainError(Outcome.NO_ELIGIBLE_SERIES, "the source series has fewer than two positioned images")
    if any(int(ds.get("NumberOfFrames", 1) or 1) > 1 for ds in images):
        raise DomainError(Outcome.NO_ELIGIBLE_SERIES, "multi-frame source series: no heat-map series is written")
    geometry = [
        SliceGeometry(
            tuple(float(v) for v in ds.ImagePositionPatient),  # type: ignore[arg-type]
            tuple(float(v) for v in ds.ImageOrientationPatient),  # type: ignore[arg-type]
            (float(ds.PixelSpacing[0]), float(ds.PixelSpacing[1])),
            int(ds.Rows),
            int(ds.Columns),
        )
        for ds in images
    ]
    first = geometry[0]
    orient = np.asarray(first.orientation)
    normal = np.cross(orient[:3], orient[3:])
    order = np.argsort([float(np.dot(g.position, normal)) for g in geometry], kind="stable")
    pixels = []
    for i in order:
        ds = images[int(i)]
        slope, intercept = float(ds.get("RescaleSlope", 1) or 1), float(ds.get("RescaleIntercept", 0) or 0)
        pixels.append(ds.pixel_array.astype(np.float32) * slope + intercept)
        del ds.PixelData  # decoded: the stored bytes are not needed again (the SR and SC take attributes, not pixels)
    for ds in images:
        for keyword in TYPE2_STUDY_ATTRIBUTES:  # type 2 in the modules the SR and the SC copy: present, maybe empty
            if keyword not in ds:
                setattr(ds, keyword, "")
    modality = str(images[0].get("Modality", "CT"))
    return SourceSeries([images[int(i)] for i in order], pixels, [geometry[int(i)] for i in order], modality)


def heatmap_images(
    source: SourceSeries, heat: HeatMap, uids: HeatmapUids, *, description: str, note: str, manufacturer: str
) -> Iterator[Dataset]:
    """One RGB Secondary Capture per source slice: the slice, the map blended over it, the legend below. Made one
    at a time, so a caller that stores them in batches never holds the whole series."""
    centre = grid_centre(source.geometry)
    window = CT_BRAIN_WINDOW if source.modality == "CT" else None
    for k, (ds, pixels) in enumerate(zip(source.datasets, source.pixels, strict=True)):
        on_slice = sample_slice(heat.values, centre, source.geometry[k])
        rgb = render_overlay(pixels, on_slice, vmax=heat.vmax, label=heat.label, window=window, note=note)
        image = hd.sc.SCImage.from_ref_dataset(
            ref_dataset=ds,
            pixel_array=rgb,
            photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
            bits_allocated=8,
            coordinate_system=hd.CoordinateSystemNames.PATIENT,
            series_instance_uid=uids.series,
            series_number=HEATMAP_SERIES_NUMBER,
            sop_instance_uid=uids.instance(k),
            instance_number=k + 1,
            manufacturer=manufacturer,
            patient_orientation=patient_orientation(source.geometry[k]),
            transfer_syntax_uid="1.2.840.10008.1.2.1",
        )
        image.SeriesDescription = description
        image.BurnedInAnnotation = "YES"  # the legend and the statement are part of the pixels
        # an unpaired part: no Laterality needed (General Series, type 2C); the source's own term when it has one
        image.BodyPartExamined = str(ds.get("BodyPartExamined") or "") or "HEAD"
        image.ImageType = ["DERIVED", "SECONDARY"]
        image.DerivationDescription = f"StrokeWatch attribution map ({heat.method}) blended over the source image"
        ref = Dataset()
        ref.ReferencedSOPClassUID = ds.SOPClassUID
        ref.ReferencedSOPInstanceUID = ds.SOPInstanceUID
        image.SourceImageSequence = [ref]
        yield image


def patient_orientation(g: SliceGeometry) -> tuple[str, str]:
    """PS3.3 C.7.6.1.1.1: the patient direction of the rows and of the columns, by the dominant axis of each."""
    letters = (("R", "L"), ("A", "P"), ("F", "H"))  # LPS: -x right, +x left; -y anterior, +y posterior; +z head

    def letter(direction: Sequence[float]) -> str:
        axis = int(np.argmax(np.abs(direction)))
        return letters[axis][1 if direction[axis] > 0 else 0]

    return letter(g.orientation[:3]), letter(g.orientation[3:])


def measurement_report(
    facts: ReportFacts,
    source: SourceSeries,
    uids: ReportUids,
    *,
    description: str,
    manufacturer: str,
    previous: Dataset | None = None,
    now: datetime | None = None,
) -> hd.sr.Comprehensive3DSR:
    """The TID 1500 Measurement Report for one assessment, in a Comprehensive 3D SR of the source study."""
    model = f"{facts.model_name} {facts.model_version}"
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=derived_uid("strokewatch", "device", facts.model_name, facts.model_version),
            name="StrokeWatch",
            manufacturer_name=manufacturer,
            model_name=model[:64],
        ),
    )
    algorithm = hd.sr.AlgorithmIdentification(name=facts.model_name, version=facts.model_version)
    probability = hd.sr.Measurement(
        name=_code("stroke-risk", f"Probability of stroke within {facts.horizon_days} days"),
        value=round(float(facts.probability), 6),
        unit=hd.sr.CodedConcept("1", "UCUM", "no units"),
        algorithm_id=algorithm,
    )
    evaluations = [hd.sr.QualitativeEvaluation(_code("risk-band", "Risk band"),
                                                _code(f"band-{facts.band}", f"{facts.band} risk"))]
    evaluations += [
        hd.sr.QualitativeEvaluation(_code("risk-driver", "Risk driver"), _code(f"drv-{d.code}"[:16], d.phrase[:64]))
        for d in facts.drivers
    ]
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=derived_uid("strokewatch", "tracking", facts.assessment_identifier),
            identifier=f"StrokeWatch {facts.assessment_identifier}"[:64],
        ),
        algorithm_id=algorithm,
        measurements=[probability],
        qualitative_evaluations=evaluations,
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=_PROCEDURES.get(source.modality, _PROCEDURES["CT"]),
        imaging_measurements=[group],
    )
    root = report[0]
    statement = facts.disclaimer + ("" if facts.trained else " Untrained network: scores carry no meaning.")
    root.ContentSequence.append(
        hd.sr.TextContentItem(
            name=codes.DCM.Comment,
            value=statement[:1024],
            relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
        )
    )
    sr = hd.sr.Comprehensive3DSR(
        evidence=source.datasets,
        content=root,
        series_instance_uid=uids.sr_series,
        series_number=SR_SERIES_NUMBER,
        sop_instance_uid=uids.sr_instance,
        instance_number=1,
        manufacturer=manufacturer,
        is_complete=True,
        is_final=False,  # no clinician verified it
        previous_versions=[previous] if previous is not None else None,
    )
    sr.SeriesDescription = description
    scheme = Dataset()  # our private coding scheme, declared (PS3.3 C.12.1.1.2)
    scheme.CodingSchemeDesignator = CODING_SCHEME
    scheme.CodingSchemeName = "StrokeWatch local codes"
    scheme.CodingSchemeResponsibleOrganization = manufacturer
    sr.CodingSchemeIdentificationSequence = [scheme]
    if now is not None:  # the same content written again on a retry differs only here
        sr.ContentDate, sr.ContentTime = DA(now.strftime("%Y%m%d")), TM(now.strftime("%H%M%S"))
    return sr


def predecessor(study_uid: str, series_uid: str, sop_instance_uid: str, sop_class_uid: str) -> Dataset:
    """What highdicom needs of a previous SR to list it in the Predecessor Documents Sequence."""
    ds = Dataset()
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.SOPInstanceUID = sop_instance_uid
    ds.SOPClassUID = UID(sop_class_uid)
    return ds


def _code(value: str, meaning: str | None = None) -> hd.sr.CodedConcept:
    return hd.sr.CodedConcept(value[:16], CODING_SCHEME, (meaning or value)[:64])
