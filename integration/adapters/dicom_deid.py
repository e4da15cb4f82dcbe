"""DICOM PS3.15 Annex E, the Basic Application Level Confidentiality Profile, on pydicom data sets, with the
Retain Longitudinal Temporal Information with Modified Dates Option and the Retain Patient Characteristics Option.

How Table E.1-1 is applied (its actions: D dummy, Z empty, X remove, K keep, C clean, U new UID):

- The attributes the table names are handled by action below (``EMPTIED``, ``REMOVED``, ``KEPT``), in the data
  set and in every sequence item at any depth.
- U: every UI value that is not a UID defined by the standard (``1.2.840.10008.*``: SOP classes, transfer syntaxes,
  coding schemes) is replaced by the keyed UID of ``DeidKey.uid``: instance, series, study, frame of reference and
  every reference to them change together, deterministically.
- Dates (the Modified Dates option, C on every DA and DT): moved back by the patient's keyed shift in whole days,
  so intervals and times of day are kept; a date that cannot be read is removed. TM values stay (a whole-day shift
  leaves them true). LongitudinalTemporalInformationModified is MODIFIED. TimezoneOffsetFromUTC is kept: the FHIR
  times keep their offsets, and study and vital-sign times must stay comparable (it names a region, not a person).
- Private attributes: removed (no Retain Safe Private option), as are curves (50xx) and overlays (60xx), which can
  carry burned-in text of their own.
- Beyond the table, as a safety net for attributes it does not name: person names (PN) are removed, free text
  (LO, SH, LT, ST, UT, UC, UR, AE) is removed unless it is one of the coded or technical attributes in
  ``SAFE_TEXT``, and binary values outside the pixel and LUT groups are removed. What remains is numbers, code
  strings, geometry and pixels.
- Pixel data: copied byte for byte (encapsulated or native). Instances whose BurnedInAnnotation is YES are refused
  (no Clean Pixel Data option); the export takes CT and MR image storage only (no secondary captures, SR, PDFs).
"""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path

from pydicom import Dataset, dcmread
from pydicom.datadict import tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.dataset import FileMetaDataset
from pydicom.filewriter import dcmwrite
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.tag import BaseTag
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID

from integration.domain.deid import DeidKey, PatientContext, shift_dicom_date
from integration.domain.types import DomainError, Outcome

#: Image storage the export takes: CT, Enhanced CT, MR, Enhanced MR.
EXPORTED_SOP_CLASSES = frozenset({"1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.2.1",
                                  "1.2.840.10008.5.1.4.1.1.4", "1.2.840.10008.5.1.4.1.1.4.1"})
DICOM_ROOT = "1.2.840.10008."

#: Table E.1-1 attributes given a zero-length value (Z; Type 2 in the IODs, so they stay present). PatientID and
#: PatientName then get the pseudonym (a dummy, D), PatientBirthDate stays empty (the age is kept instead).
EMPTIED = ("AccessionNumber", "PatientBirthDate", "PatientID", "PatientName", "ReferringPhysicianName", "StudyID",
           "FillerOrderNumberImagingServiceRequest", "PlacerOrderNumberImagingServiceRequest", "ContentCreatorName",
           "ContrastBolusAgent", "VerifyingObserverIdentificationCodeSequence")

#: Table E.1-1 attributes removed (X, and X/Z, X/D where the IOD allows removal). Text ones would go by the safety
#: net too; they are listed so that the table's intent is visible and does not hang on the net.
REMOVED = (
    "AcquisitionComments", "AcquisitionContextSequence", "AcquisitionDeviceProcessingDescription",
    "AcquisitionProtocolDescription", "ActualHumanPerformersSequence", "AdditionalPatientHistory", "AdmissionID",
    "AdmittingDate", "AdmittingDiagnosesCodeSequence", "AdmittingDiagnosesDescription", "AdmittingTime",
    "Allergies", "Arbitrary", "AuthorObserverSequence", "BranchOfService", "CassetteID",
    "CommentsOnThePerformedProcedureStep", "ConfidentialityConstraintOnPatientDataDescription",
    "ConsultingPhysicianName", "ConsultingPhysicianIdentificationSequence", "ContentSequence",
    "ContributionDescription", "CountryOfResidence", "CurrentPatientLocation", "CustodialOrganizationSequence",
    "DataSetTrailingPadding", "DerivationDescription", "DetectorID", "DeviceDescription", "DeviceSerialNumber",
    "DigitalSignaturesSequence", "DischargeDiagnosisDescription", "DistributionAddress", "DistributionName",
    "EthnicGroup", "FrameComments", "GantryID", "GeneratorID", "GraphicAnnotationSequence", "HumanPerformerName",
    "HumanPerformerOrganization", "IconImageSequence", "IdentifyingComments", "ImageComments",
    "ImagePresentationComments", "ImagingServiceRequestComments", "Impressions", "InstitutionAddress",
    "InstitutionCodeSequence", "InstitutionName", "InstitutionalDepartmentName", "InsurancePlanIdentification",
    "IntendedRecipientsOfResultsIdentificationSequence", "InterpretationApproverSequence", "InterpretationAuthor",
    "InterpretationDiagnosisDescription", "InterpretationIDIssuer", "InterpretationRecorder", "InterpretationText",
    "InterpretationTranscriber", "IssuerOfAdmissionID", "IssuerOfPatientID", "IssuerOfPatientIDQualifiersSequence",
    "IssuerOfServiceEpisodeID", "LastMenstrualDate", "MedicalAlerts", "MedicalRecordLocator", "MilitaryRank",
    "ModifiedAttributesSequence", "ModifiedImageDescription", "ModifyingDeviceID", "ModifyingDeviceManufacturer",
    "NameOfPhysiciansReadingStudy", "NamesOfIntendedRecipientsOfResults", "Occupation",
    "OperatorIdentificationSequence", "OperatorsName", "OrderCallbackPhoneNumber", "OrderEnteredBy",
    "OrderEntererLocation", "OriginalAttributesSequence", "OtherPatientIDsSequence", "OtherPatientNames",
    "ParticipantSequence", "PatientAddress", "PatientBirthName", "PatientBirthTime", "PatientComments",
    "PatientInstitutionResidence", "PatientInsurancePlanCodeSequence", "PatientMotherBirthName",
    "PatientPrimaryLanguageCodeSequence", "PatientPrimaryLanguageModifierCodeSequence", "PatientReligiousPreference",
    "PatientState", "PatientTelecomInformation", "PatientTelephoneNumbers", "PatientTransportArrangements",
    "PerformedLocation", "PerformedProcedureStepDescription", "PerformedProcedureStepID",
    "PerformedStationAETitle", "PerformedStationGeographicLocationCodeSequence", "PerformedStationName",
    "PerformedStationNameCodeSequence", "PerformingPhysicianIdentificationSequence", "PerformingPhysicianName",
    "PersonAddress", "PersonTelecomInformation", "PersonTelephoneNumbers", "PhysicianApprovingInterpretation",
    "PhysiciansOfRecord", "PhysiciansOfRecordIdentificationSequence", "PhysiciansReadingStudyIdentificationSequence",
    "PlateID", "PreMedication", "ProtocolName", "ReasonForStudy", "ReasonForTheImagingServiceRequest",
    "ReferencedDigitalSignatureSequence", "ReferencedPatientAliasSequence", "ReferencedPatientSequence",
    "ReferencedSOPInstanceMACSequence", "ReferringPhysicianAddress", "ReferringPhysicianIdentificationSequence",
    "ReferringPhysicianTelephoneNumbers", "RegionOfResidence", "RequestAttributesSequence", "RequestedContrastAgent",
    "RequestedProcedureComments", "RequestedProcedureDescription", "RequestedProcedureID",
    "RequestedProcedureLocation", "RequestingPhysician", "RequestingService", "ResponsibleOrganization",
    "ResponsiblePerson", "ResultsComments", "ResultsDistributionListSequence", "ResultsIDIssuer", "ReviewerName",
    "ScheduledHumanPerformersSequence", "ScheduledPatientInstitutionResidence",
    "ScheduledPerformingPhysicianIdentificationSequence", "ScheduledPerformingPhysicianName",
    "ScheduledProcedureStepDescription", "ScheduledProcedureStepLocation", "ScheduledStationAETitle",
    "ScheduledStationGeographicLocationCodeSequence", "ScheduledStationName", "ScheduledStationNameCodeSequence",
    "ScheduledStudyLocation", "ScheduledStudyLocationAETitle", "SeriesDescription", "ServiceEpisodeDescription",
    "ServiceEpisodeID", "SourceApplicationEntityTitle", "SpecialNeeds", "StationName", "StudyComments",
    "StudyDescription", "StudyIDIssuer", "TextComments", "TextString", "TopicAuthor", "TopicKeywords",
    "TopicSubject", "TopicTitle", "VerifyingObserverName", "VerifyingObserverSequence", "VerifyingOrganization",
    "VisitComments", "ReferencedPerformedProcedureStepSequence", "ReferencedStudySequence",
    "RequestedProcedureCodeSequence", "ProcedureCodeSequence", "PerformedProcedureCodeSequence",
    "ReferencedImageSequence",
)

#: The Retain Patient Characteristics Option keeps these (X in the basic profile). Free-text characteristics
#: (additional history, allergies, occupation, ethnic group) are not kept.
KEPT = ("PatientSex", "PatientAge", "PatientSize", "PatientWeight", "PregnancyStatus", "SmokingStatus",
        "PatientSexNeutered")

#: Text attributes the safety net keeps: codes, equipment type and technique; none names a person, place or date.
SAFE_TEXT = frozenset({
    "CodeValue", "CodingSchemeDesignator", "CodingSchemeVersion", "CodeMeaning", "LongCodeValue", "URNCodeValue",
    "ContextIdentifier", "MappingResource", "Manufacturer", "ManufacturerModelName", "ConvolutionKernel",
    "RescaleType", "SequenceName", "ReceiveCoilName", "TransmitCoilName", "ImagedNucleus", "FilterType",
    "WindowCenterWidthExplanation", "TimezoneOffsetFromUTC", "StackID", "DeidentificationMethod",
    "ContrastBolusRoute", "PixelSpacingCalibrationDescription",
})

#: CID 7050 (De-identification Method): what was applied, in DeidentificationMethodCodeSequence.
METHOD_CODES = (("113100", "Basic Application Confidentiality Profile"),
                ("113107", "Retain Longitudinal Temporal Information Modified Dates Option"),
                ("113108", "Retain Patient Characteristics Option"))
METHOD_TEXT = ("PS3.15 E.1-1 Basic Profile", "Retain Longitudinal Modified Dates", "Retain Patient Characteristics")

_TEXT_VRS = frozenset({"PN", "LO", "SH", "LT", "ST", "UT", "UC", "UR", "AE"})
_BINARY_VRS = frozenset({"OB", "OW", "OF", "OD", "OL", "OV", "UN", "OB or OW", "US or OW"})


def _tags(keywords: tuple[str, ...] | frozenset[str]) -> frozenset[BaseTag]:
    tags = {tag_for_keyword(k) for k in keywords}
    unknown = [k for k in keywords if tag_for_keyword(k) is None]
    if unknown:  # a typo would silently keep an attribute: fail at import instead
        raise RuntimeError(f"not DICOM keywords: {unknown}")
    return frozenset(BaseTag(t) for t in tags if t is not None)


_EMPTIED, _REMOVED, _KEPT, _SAFE_TEXT = _tags(EMPTIED), _tags(REMOVED), _tags(KEPT), _tags(SAFE_TEXT)


class BurnedInAnnotation(DomainError):
    def __init__(self) -> None:
        super().__init__(Outcome.NO_ELIGIBLE_SERIES, "BurnedInAnnotation is YES: the pixels may carry identifying "
                                                      "text, and this export does not clean pixel data")


def exportable(ds: Dataset) -> str | None:
    """Why an instance is not exported (None: it is). Checks the SOP class and the burned-in annotation flag."""
    sop_class = str(ds.get("SOPClassUID", ""))
    if sop_class not in EXPORTED_SOP_CLASSES:
        return f"SOP class {sop_class or '?'} is not CT or MR image storage"
    if str(ds.get("BurnedInAnnotation", "")).strip().upper() == "YES":
        return "BurnedInAnnotation is YES (pixel data is not cleaned)"
    return None


def deidentify(ds: Dataset, patient: PatientContext, key: DeidKey) -> Dataset:
    """The data set de-identified in place (and returned), pixel data untouched; its file meta rebuilt."""
    reason = exportable(ds)
    if reason is not None:
        raise DomainError(Outcome.NO_ELIGIBLE_SERIES, reason)
    _clean(ds, patient.shift_days, key.uid)
    ds.PatientID = patient.pseudonym
    ds.PatientName = patient.pseudonym
    ds.PatientIdentityRemoved = "YES"
    ds.LongitudinalTemporalInformationModified = "MODIFIED"
    ds.DeidentificationMethod = list(METHOD_TEXT)
    codes = []
    for value, meaning in METHOD_CODES:
        item = Dataset()
        item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, "DCM", meaning
        codes.append(item)
    ds.DeidentificationMethodCodeSequence = Sequence(codes)
    syntax = ds.file_meta.TransferSyntaxUID if hasattr(ds, "file_meta") and "TransferSyntaxUID" in ds.file_meta \
        else None
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    if syntax is not None:
        meta.TransferSyntaxUID = syntax
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.file_meta = meta
    ds.preamble = b"\x00" * 128  # a preamble can hold anything (a TIFF header, text): zeros
    return ds


def _clean(ds: Dataset, shift_days: int, new_uid: Callable[[str], str]) -> None:
    for tag in list(ds.keys()):
        elem = ds[tag]
        action = _action(elem)
        if action == "remove":
            del ds[tag]
        elif action == "empty":
            elem.value = [] if elem.VR == "SQ" else ""
        elif action == "recurse":
            for item in elem.value:
                _clean(item, shift_days, new_uid)
        elif action == "uid":
            elem.value = _mapped(elem.value, new_uid)
        elif action == "date":
            shifted = _shifted(elem, shift_days)
            if shifted is None:
                del ds[tag]
            else:
                elem.value = shifted


def _action(elem: DataElement) -> str:
    tag, vr = elem.tag, elem.VR
    if tag.is_private or tag.group in (0x0002,) or 0x5000 <= tag.group <= 0x50FF or 0x6000 <= tag.group <= 0x60FF:
        return "remove"
    if tag in _KEPT:
        return "keep"
    if tag in _REMOVED:
        return "remove"
    if tag in _EMPTIED:
        return "empty"
    if vr == "SQ":
        return "recurse"
    if vr == "UI":
        return "uid"
    if vr in ("DA", "DT"):
        return "date"
    if vr in _TEXT_VRS:
        return "keep" if tag in _SAFE_TEXT and vr != "PN" else "remove"
    if vr in _BINARY_VRS:
        return "keep" if tag.group in (0x0028, 0x7FE0) else "remove"
    return "keep"  # numbers, code strings (CS), ages (AS), tags (AT), times (TM)


def _mapped(value: object, new_uid: Callable[[str], str]) -> object:
    def one(uid: str) -> str:
        uid = str(uid).strip("\x00 ")
        return uid if not uid or uid.startswith(DICOM_ROOT) else new_uid(uid)

    if isinstance(value, (list, tuple, MultiValue)):
        return [one(v) for v in value]
    return one(str(value)) if value is not None else value


def _shifted(elem: DataElement, days: int) -> object | None:
    values = list(elem.value) if elem.VM > 1 else [elem.value]
    out = []
    for v in values:
        text = str(v) if v is not None else ""
        if not text.strip():
            out.append("")
            continue
        if elem.VR == "DA" and len(text.strip()) == 10:  # ACR-NEMA "YYYY.MM.DD" reads too
            text = text.replace(".", "")
        shifted = shift_dicom_date(text, days)
        if shifted is None:
            return None
        out.append(shifted)
    return out if elem.VM > 1 else out[0]


def encode(ds: Dataset) -> bytes:
    """The de-identified data set as a DICOM Part 10 file."""
    buffer = io.BytesIO()
    dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


def read(path: Path) -> Dataset:
    return dcmread(path)
