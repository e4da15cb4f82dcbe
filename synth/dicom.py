"""Write a synthetic patient's head study as a real DICOM series (CT Image Storage or MR Image Storage).

Axial slices of 256x256 at 0.9 mm, 5 mm apart (32-36 slices, ~4-5 MB), explicit VR little endian.
Geometry is consistent (ImagePositionPatient along the normal of ImageOrientationPatient, PixelSpacing,
SliceThickness, SpacingBetweenSlices, SliceLocation). CT stores HU + 1024 as 12-bit unsigned with
RescaleIntercept -1024. UIDs come from ``pydicom.uid.generate_uid`` with entropy from (seed, index), so
re-generation gives the same UIDs. For some patients InstanceNumber runs against the slice position or
is shuffled: readers must order by geometry, never by instance number or file name. Most CT studies also
hold a lateral scout (series 1, ImageType ORIGINAL/PRIMARY/LOCALIZER, one projection image), as scanners
send them: series selection must skip it.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, MRImageStorage, generate_uid

from synth.patient import SynthPatient

ISSUER_OF_PATIENT_ID = "STROKEWATCH-SYNTH"
#: The study is acquired this long before the window end (the assessment follows the scan).
STUDY_LEAD = timedelta(minutes=20)


def _uid(patient: SynthPatient, *what: str) -> str:
    site = [] if patient.site is None else [f"site:{patient.site}"]  # a site's patients get their own UIDs
    return generate_uid(entropy_srcs=["strokewatch-synth", str(patient.seed), str(patient.index), *site, *what])


def study_uid(patient: SynthPatient) -> str:
    return _uid(patient, "study")


def _instance_numbers(patient: SynthPatient, n: int) -> list[int]:
    order = np.arange(1, n + 1)
    if patient.instance_order == "descending":
        order = order[::-1]
    elif patient.instance_order == "shuffled":
        order = np.random.default_rng([patient.seed, patient.index, 0xD1C0, *patient.stream_suffix]).permutation(order)
    return [int(x) for x in order]


def _base_dataset(patient: SynthPatient, window_end: datetime) -> Dataset:
    local = timezone(timedelta(minutes=patient.vitals.utc_offset_minutes))
    when = (window_end - STUDY_LEAD).astimezone(local)
    offset = patient.vitals.utc_offset_minutes
    ct = patient.modality == "CT"
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = CTImageStorage if ct else MRImageStorage
    ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = when.strftime("%Y%m%d")
    ds.StudyTime = ds.SeriesTime = ds.AcquisitionTime = ds.ContentTime = when.strftime("%H%M%S")
    ds.TimezoneOffsetFromUTC = f"{'+' if offset >= 0 else '-'}{abs(offset) // 60:02d}{abs(offset) % 60:02d}"
    code = patient.mrn[2:4] if patient.site else ""  # the site's code, as in its MRNs
    ds.AccessionNumber = f"A{code}{patient.seed % 1000:03d}{patient.index:07d}"
    ds.Modality = patient.modality
    ds.Manufacturer = "StrokeWatch synthetic"
    ds.InstitutionName = "Synthetic General Hospital"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "CT HEAD WO CONTRAST" if ct else "MR BRAIN WO CONTRAST"
    ds.SeriesDescription = "AX BRAIN 5mm" if ct else "AX T2 FLAIR 5mm"
    ds.PatientName = f"{patient.family_name}^{patient.given_name}"
    ds.PatientID = patient.mrn
    ds.IssuerOfPatientID = ISSUER_OF_PATIENT_ID
    ds.PatientBirthDate = patient.birth_date(window_end).strftime("%Y%m%d")
    ds.PatientSex = "M" if patient.sex == "male" else "F"
    ds.PatientAge = f"{int(patient.age_years):03d}Y"
    ds.BodyPartExamined = "HEAD" if ct else "BRAIN"
    ds.SliceThickness = "5"
    ds.SpacingBetweenSlices = "5"
    ds.PatientPosition = "HFS"
    if ct:
        ds.KVP = "120"
        ds.ConvolutionKernel = "H30s"
        ds.RescaleIntercept = "-1024"
        ds.RescaleSlope = "1"
        ds.RescaleType = "HU"
        ds.WindowCenter = "40"
        ds.WindowWidth = "80"
    else:
        ds.ScanningSequence = ["SE", "IR"]
        ds.SequenceVariant = ["SK", "SP"]
        ds.MRAcquisitionType = "2D"
        ds.RepetitionTime = "9000"
        ds.EchoTime = "95"
        ds.InversionTime = "2500"
        ds.MagneticFieldStrength = "1.5"
    ds.StudyInstanceUID = study_uid(patient)
    ds.SeriesInstanceUID = _uid(patient, "series", patient.modality)
    ds.FrameOfReferenceUID = _uid(patient, "frame")
    ds.PositionReferenceIndicator = ""
    ds.StudyID = "1"
    ds.SeriesNumber = 2
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    return ds


def _save(ds: Dataset, out_dir: Path) -> Path:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    path = out_dir / f"{ds.SOPInstanceUID}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def _localizer(patient: SynthPatient, base: Dataset, hu: np.ndarray, origin: np.ndarray, pixel_mm: float) -> Dataset:
    """A lateral scout: the mean attenuation through the head along x, as a sagittal projection image."""
    mu = np.clip(hu + 1000.0, 0, None).mean(axis=2)  # (slices, rows): attenuation along the beam (x)
    image = mu[::-1] / max(float(mu.max()), 1.0) * 3000.0  # top row = most superior slice
    ds = base.copy()
    ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    ds.SeriesInstanceUID = _uid(patient, "series", "localizer")
    ds.SOPInstanceUID = _uid(patient, "localizer", "0")
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.SeriesDescription = "Topogram 0.6 T20s"
    ds.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]  # rows run posterior, columns run inferior
    top = origin + np.array([(hu.shape[2] - 1) / 2 * pixel_mm, 0.0, (hu.shape[0] - 1) * 5.0])  # mid-sagittal
    ds.ImagePositionPatient = [f"{v:.3f}" for v in top]
    ds.PixelSpacing = ["5", f"{pixel_mm:g}"]
    del ds.SliceThickness, ds.SpacingBetweenSlices, ds.ConvolutionKernel
    stored = np.clip(np.rint(image), 0, 4095).astype(np.uint16)
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = "0", "1", "US"
    ds.Rows, ds.Columns = stored.shape
    ds.PixelData = stored.tobytes()
    return ds


def write_dicom(patient: SynthPatient, out_dir: Path, *, window_end: datetime | None = None) -> list[Path]:
    """Render the patient's study and write one file per image under ``out_dir``; returns the paths.

    Study date/time is ``window_end`` (default: the patient's) minus ``STUDY_LEAD``, in the recording
    site's local time with TimezoneOffsetFromUTC; PatientBirthDate keeps the age exact at ``window_end``.
    """
    window_end = window_end or patient.window_end
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    acq = patient.acquisition(for_arrays=False)
    volume = patient.render_image(acq)
    if patient.modality == "CT":
        stored = np.clip(np.rint(volume.voxels + 1024.0), 0, 4095).astype(np.uint16)
    else:
        stored = np.clip(np.rint(volume.voxels), 0, 4095).astype(np.uint16)
    base = _base_dataset(patient, window_end)
    numbers = _instance_numbers(patient, stored.shape[0])
    paths: list[Path] = []
    for k in range(stored.shape[0]):
        ds = base.copy()
        sop_uid = _uid(patient, "instance", str(k))
        position = volume.origin + k * volume.spacing[0] * volume.normal
        ds.SOPInstanceUID = sop_uid
        ds.InstanceNumber = numbers[k]
        ds.ImagePositionPatient = [f"{v:.3f}" for v in position]
        ds.SliceLocation = f"{position[2]:.3f}"
        ds.PixelSpacing = [f"{volume.spacing[1]:g}", f"{volume.spacing[2]:g}"]
        ds.Rows, ds.Columns = stored.shape[1], stored.shape[2]
        ds.PixelData = stored[k].tobytes()
        paths.append(_save(ds, out_dir))
    if patient.modality == "CT" and patient.has_scout:
        paths.append(_save(_localizer(patient, base, volume.voxels, volume.origin, volume.spacing[2]), out_dir))
    return paths
