"""`strokewatch deid export`: a de-identified copy of chosen patients' images and records, for research and for
moving a validation set between centres.

For each patient: the Patient, the vital-sign Observations the engine reads (its LOINC catalogue) and the
RiskAssessments about the patient, from the EHR; the CT and MR image series of the studies the engine matched to
the patient and of those its RiskAssessments are based on, from the PACS. DICOM goes through PS3.15 Annex E
(``adapters.dicom_deid``), FHIR through ``domain.deid``, all keyed by the site key, so the same patient carries one
pseudonym in both halves. What could not be exported is listed in the manifest with a reason that names no one.
A failure of the PACS or the EHR stops the export and leaves nothing behind.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from integration.domain.deid import DeidKey, PatientContext, deid_observation, deid_patient, deid_risk_assessment
from integration.domain.types import DomainError
from integration.domain.vitals import vital_codes
from integration.ports import Clock, Ehr, ExportCatalogue, ExportTarget, Pacs, ResultsArchive

log = logging.getLogger(__name__)

FORMAT = "strokewatch-deid-export/1"
IMAGE_MODALITIES = frozenset({"CT", "MR"})
PROFILE = {
    "dicom": {
        "profile": "DICOM PS3.15 Annex E Basic Application Level Confidentiality Profile (Table E.1-1)",
        "options": ["Retain Longitudinal Temporal Information with Modified Dates Option",
                    "Retain Patient Characteristics Option"],
        "method_codes": ["DCM:113100", "DCM:113107", "DCM:113108"],
        "uids": "replaced by 2.25.<HMAC-SHA256 of the original, 128 bits>: consistent across instances and references",
        "dates": "every DA/DT moved back by the patient's keyed shift (whole days); times kept",
        "private_attributes": "removed",
        "burned_in_annotation": "instances marked BurnedInAnnotation=YES are not exported; CT/MR image storage only; "
                                "pixel data is not inspected or changed",
        "recognizable_visual_features": "not removed: a head CT/MR volume can be rendered to a face (no defacing)",
    },
    "fhir": {
        "patient": "id and identifier = the pseudonym (= DICOM PatientID); gender; birthDate shifted; all else removed",
        "observation": "coded content and values; times shifted; identifiers, narrative, notes, performer removed",
        "risk_assessment": "prediction, method, note; time shifted; basis rewritten to exported ids and UIDs",
    },
}


@dataclass(frozen=True)
class Selector:
    """One line of a ``--patients-from`` file: a FHIR Patient id (``Patient/<id>``) or an identifier
    (``system|value``, or a bare value matched in any system)."""

    line: int
    fhir_id: str | None = None
    system: str | None = None
    value: str | None = None


def parse_selection(lines: Iterable[str]) -> list[Selector]:
    """Selectors from a file's lines; blank lines and ``#`` comments are skipped."""
    selectors = []
    for number, raw in enumerate(lines, start=1):
        text = raw.strip()
        if not text or text.startswith("#"):
            continue
        if text.startswith("Patient/"):
            selectors.append(Selector(number, fhir_id=text.removeprefix("Patient/")))
        elif "|" in text:
            system, value = text.split("|", 1)
            selectors.append(Selector(number, system=system or None, value=value))
        else:
            selectors.append(Selector(number, value=text))
    return selectors


@dataclass
class ExportSources:
    ehr: Ehr
    pacs: Pacs
    archive: ResultsArchive
    catalogue: ExportCatalogue
    key: DeidKey
    clock: Clock


@dataclass
class ExportReport:
    path: str
    key_id: str
    patients: int = 0
    studies: int = 0
    series: int = 0
    instances: int = 0
    resources: dict[str, int] = field(default_factory=dict)
    skipped: list[dict[str, str]] = field(default_factory=list)


def export(src: ExportSources, target: ExportTarget, selection: Sequence[Selector] | None) -> ExportReport:
    """Export the selected patients (``None``: every patient the engine has scored) into ``target``. A DomainError
    from a peer aborts the target and propagates; items that cannot be exported are skipped with a reason."""
    try:
        report, manifest = _export(src, target, selection)
        report.path = target.commit(manifest)
    except BaseException:
        target.abort()
        raise
    return report


def _export(src: ExportSources, target: ExportTarget, selection: Sequence[Selector] | None,
            ) -> tuple[ExportReport, dict[str, Any]]:
    report = ExportReport(path="", key_id=src.key.key_id)
    patients: list[dict[str, Any]] = []
    for fhir_id in _resolve(src, selection, report):
        entry = _export_patient(src, target, fhir_id, report)
        if entry is not None:
            patients.append(entry)
    manifest = {
        "format": FORMAT,
        "created_at": src.clock.now().isoformat(timespec="seconds"),
        "key_id": report.key_id,
        "selection": "all assessed patients" if selection is None else "patients listed in a file",
        "deidentification": PROFILE,
        "counts": {"patients": report.patients, "studies": report.studies, "series": report.series,
                   "instances": report.instances, "resources": report.resources},
        "patients": patients,
        "skipped": report.skipped,
    }
    return report, manifest


def patient_of(ehr: Ehr, sel: Selector) -> str | None:
    """The FHIR id of the Patient a selection line names (None when the EHR has no Patient with that identifier)."""
    if sel.fhir_id is not None:
        return sel.fhir_id
    assert sel.value is not None
    info = ehr.find_patient(sel.system, sel.value)
    return info.fhir_id if info else None


def _resolve(src: ExportSources, selection: Sequence[Selector] | None, report: ExportReport) -> list[str]:
    if selection is None:
        return src.catalogue.assessed_patients()
    found: list[str] = []
    for sel in selection:
        fhir_id = patient_of(src.ehr, sel)
        if fhir_id is None:
            report.skipped.append({"what": f"selection line {sel.line}", "reason": "no Patient with that identifier"})
        elif fhir_id not in found:
            found.append(fhir_id)
    return found


def _export_patient(src: ExportSources, target: ExportTarget, fhir_id: str, report: ExportReport,
                    ) -> dict[str, Any] | None:
    ctx = PatientContext.of(src.key, fhir_id)
    patients = [p for p in src.ehr.search("Patient", {"_id": fhir_id}) if p.get("id") == fhir_id]
    if not patients:
        report.skipped.append({"what": f"patient {ctx.pseudonym}", "reason": "the Patient is not in the EHR"})
        return None
    patient = patients[0]
    observations = [o for o in src.ehr.search_observations(fhir_id, vital_codes(), None, None)
                    if o.get("resourceType") == "Observation" and o.get("id")]
    assessments = [r for r in src.ehr.search("RiskAssessment", {"subject": f"Patient/{fhir_id}"})
                   if r.get("resourceType") == "RiskAssessment" and r.get("id")]
    studies = _study_uids(src.catalogue.patient_studies(fhir_id), assessments)
    identifiers = {str(i.get("value", "")).casefold() for i in patient.get("identifier", []) if isinstance(i, dict)}
    exported_studies: dict[str, str] = {}
    study_entries = []
    for study_uid in studies:
        entry = _export_study(src, target, ctx, study_uid, identifiers, report)
        if entry is not None:
            exported_studies[study_uid] = entry["study_uid"]
            study_entries.append(entry)
    target.add_resource(deid_patient(patient, ctx))
    for obs in observations:
        target.add_resource(deid_observation(obs, ctx, src.key))
    exported_obs = {str(o["id"]) for o in observations}
    for ra in assessments:
        target.add_resource(deid_risk_assessment(ra, ctx, src.key, exported_obs, exported_studies.get))
    counts = {"Patient": 1, "Observation": len(observations), "RiskAssessment": len(assessments)}
    for kind, n in counts.items():
        report.resources[kind] = report.resources.get(kind, 0) + n
    report.patients += 1
    log.info("exported patient %s: %d studies, %d observations, %d risk assessments", ctx.pseudonym,
             len(study_entries), len(observations), len(assessments))
    return {"pseudonym": ctx.pseudonym, "studies": study_entries, "observations": len(observations),
            "risk_assessments": len(assessments)}


def _study_uids(matched: Iterable[str], assessments: Iterable[dict[str, Any]]) -> list[str]:
    """The engine's matched studies, then those the RiskAssessments name in ``basis``, each once."""
    uids = list(dict.fromkeys(matched))
    for ra in assessments:
        for item in ra.get("basis", []):
            ident = item.get("identifier") if isinstance(item, dict) else None
            if item.get("type") == "ImagingStudy" and isinstance(ident, dict):
                uid = str(ident.get("value", "")).removeprefix("urn:oid:")
                if uid and uid not in uids:
                    uids.append(uid)
    return uids


def _export_study(src: ExportSources, target: ExportTarget, ctx: PatientContext, study_uid: str,
                  identifiers: set[str], report: ExportReport) -> dict[str, Any] | None:
    new_study = src.key.uid(study_uid)
    if src.pacs.get_study(study_uid) is None:
        report.skipped.append({"what": f"study {new_study}", "reason": "not in the PACS"})
        return None
    series_entries = []
    for series in src.pacs.list_series(study_uid):
        new_series = src.key.uid(series.series_uid)
        if series.modality not in IMAGE_MODALITIES:
            report.skipped.append({"what": f"series {new_series}", "reason": f"modality {series.modality or '?'} "
                                   "(only CT and MR image series are exported)"})
            continue
        written = 0
        for ds in src.archive.source_instances(study_uid, series.series_uid):
            if str(ds.get("PatientID", "")).casefold() not in identifiers:
                report.skipped.append({"what": f"instance {src.key.uid(str(ds.get('SOPInstanceUID', '')))}",
                                       "reason": "its PatientID is none of the Patient's identifiers"})
                continue
            try:
                target.add_instance(ds, ctx)
            except DomainError as err:
                report.skipped.append({"what": f"instance {src.key.uid(str(ds.get('SOPInstanceUID', '')))}",
                                       "reason": err.message})
                continue
            written += 1
        if written:
            series_entries.append({"series_uid": new_series, "modality": series.modality, "instances": written})
            report.series += 1
            report.instances += written
    if not series_entries:
        return None
    report.studies += 1
    return {"study_uid": new_study, "series": series_entries}
