"""`strokewatch deid export` against the real Orthanc and FHIR sandbox: synthetic patients under fresh, distinctive
identities are loaded, the engine's record names their studies and assessments, and the command exports them.

Then every byte of the export (the raw files, every DICOM element at every depth, the NDJSON) is searched for every
original name, MRN, birth date (YYYYMMDD and YYYY-MM-DD), UID and FHIR id: 0 hits. Pseudonyms are stable for one
key and unrelated for another; intervals between dates survive the shift; the DICOM decodes through the engine's
decoder to the same pixels; the same patient links across DICOM and FHIR.
"""

from __future__ import annotations

import json
import os
import secrets
import string
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pydicom
import pytest
from fhir.resources.R4B.observation import Observation
from fhir.resources.R4B.patient import Patient
from fhir.resources.R4B.riskassessment import RiskAssessment
from typer.testing import CliRunner

from integration.adapters.db.session import make_engine, upgrade
from integration.adapters.db.store import SqlStore
from integration.adapters.dicom_decode import decode_file
from integration.adapters.dicomweb import DicomWebPacs
from integration.domain.assessment import AssessmentFacts, build_risk_assessment
from integration.domain.deid import DeidKey
from integration.domain.policy import RiskPolicy
from integration.domain.records import NewAssessment
from integration.domain.types import StudyRef
from integration.entrypoints.cli import app
from sandbox.cohort import post_transaction, stow

pytestmark = [pytest.mark.peers, pytest.mark.slow]

MRN_SYSTEM = "urn:oid:1.2.36.146.595.217.0.1"
SEED = 2020
KEY_A, KEY_B = secrets.token_hex(32), secrets.token_hex(32)


@dataclass
class Loaded:
    mrn: str
    given: str
    family: str
    birth: datetime
    fhir_id: str
    study_uid: str
    files: list[Path]
    observation_ids: list[str]
    observation_times: list[datetime]

    def needles(self) -> dict[str, str]:
        return {"mrn": self.mrn, "given": self.given, "family": self.family,
                "DICOM name": f"{self.family}^{self.given}",
                "birth YYYY-MM-DD": f"{self.birth:%Y-%m-%d}", "birth YYYYMMDD": f"{self.birth:%Y%m%d}",
                "Patient id": self.fhir_id}


def _letters(n: int) -> str:
    return "".join(secrets.choice(string.ascii_lowercase) for _ in range(n))


def _load(tmp: Path, fhir_url: str, dicomweb_url: str, store: SqlStore, now: datetime) -> list[Loaded]:
    """Three patients. 0 and 1: studies matched by the engine, assessments recorded; 0 and 2: a RiskAssessment in
    the EHR (2's study is known only from it)."""
    import synth

    loaded: list[Loaded] = []
    with httpx.Client(timeout=120) as client:
        for i, patient in enumerate(synth.iter_cohort(3, SEED)):
            tag = _letters(6)
            patient = replace(patient, mrn=f"DEID{tag.upper()}{i}", given_name=f"Oriel{tag}",
                              family_name=f"Thistlewaite{tag}")
            window_end = now - timedelta(hours=i + 1)
            birth = patient.birth_date(window_end)
            post_transaction(fhir_url, synth.transaction_bundle(
                synth.fhir_resources(patient, identifier_system=MRN_SYSTEM, window_end=window_end)), client=client)
            fhir_id = client.get(f"{fhir_url}/Patient", params={"identifier": f"{MRN_SYSTEM}|{patient.mrn}"}
                                 ).raise_for_status().json()["entry"][0]["resource"]["id"]
            bundle = client.get(f"{fhir_url}/Observation", params={"subject": f"Patient/{fhir_id}", "_count": "500"})
            found = [e["resource"] for e in bundle.raise_for_status().json().get("entry", [])]
            obs_ids = [o["id"] for o in found]
            times = sorted(datetime.fromisoformat(o["effectiveDateTime"]) for o in found if "effectiveDateTime" in o)
            files = synth.write_dicom(patient, tmp / f"dicom{i}", window_end=window_end)
            stow(dicomweb_url, files, client=client)
            head = pydicom.dcmread(files[0], stop_before_pixels=True)
            study_uid = str(head.StudyInstanceUID)
            loaded.append(Loaded(patient.mrn, patient.given_name, patient.family_name,
                                 datetime(birth.year, birth.month, birth.day), fhir_id, study_uid, files, obs_ids,
                                 times))
            if i in (0, 1):
                store.add_study(StudyRef(study_uid, patient.mrn, str(head.IssuerOfPatientID), window_end), "test", now)
                store.set_study_ready(study_uid, fhir_id)
            if i in (0, 2):
                facts = AssessmentFacts("urn:strokewatch:risk-assessment", f"ident-{tag}", fhir_id, window_end, 0.42,
                                        "v-test", True, "onnxruntime", study_uid, patient.modality, obs_ids[:3])
                resource = build_risk_assessment(facts, RiskPolicy())
                client.post(f"{fhir_url}/RiskAssessment", json=resource,
                            headers={"Content-Type": "application/fhir+json"}).raise_for_status()
            if i in (0, 1):
                store.add_assessment(NewAssessment(f"ident-{tag}", fhir_id, study_uid, window_end, "v-test", "onnx",
                                                   True, 0.42, "high", "fp", 3, {}))
    return loaded


@pytest.fixture()
def world(tmp_path: Path, fresh_orthanc_peer: Any, fresh_fhir_peer: Any,
          monkeypatch: pytest.MonkeyPatch) -> tuple[list[Loaded], Path]:
    data = tmp_path / "data"
    data.mkdir()
    url = f"sqlite:///{data / 'strokewatch.db'}"
    upgrade(url)
    store = SqlStore(make_engine(url))
    loaded = _load(tmp_path, fresh_fhir_peer.base_url, fresh_orthanc_peer.dicomweb_url, store,
                   datetime.now(UTC).replace(microsecond=0))
    store.engine.dispose()
    for name in [k for k in os.environ if k.startswith("STROKEWATCH_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("STROKEWATCH_DATA_DIR", str(data))
    monkeypatch.setenv("STROKEWATCH_PACS__DICOMWEB_URL", fresh_orthanc_peer.dicomweb_url)
    monkeypatch.setenv("STROKEWATCH_EHR__BASE_URL", fresh_fhir_peer.base_url)
    monkeypatch.setenv("STROKEWATCH_EHR__PATIENT_IDENTIFIER_SYSTEM", MRN_SYSTEM)
    selection = tmp_path / "patients.txt"
    selection.write_text(f"# research set\nPatient/{loaded[0].fhir_id}\n{MRN_SYSTEM}|{loaded[1].mrn}\n"
                         f"{loaded[2].mrn}\n\n{MRN_SYSTEM}|NO-SUCH-MRN\n")
    return loaded, selection


def _run(tmp: Path, key: str | None, *args: str) -> Any:
    secrets_dir = tmp / f"secrets-{secrets.token_hex(3)}"
    secrets_dir.mkdir()
    if key is not None:
        (secrets_dir / "privacy__deid_key").write_text(key + "\n")
    os.environ["STROKEWATCH_SECRETS_DIR"] = str(secrets_dir)
    try:
        return CliRunner().invoke(app, ["deid", "export", *args])
    finally:
        del os.environ["STROKEWATCH_SECRETS_DIR"]


def _export(tmp: Path, key: str, name: str, *args: str) -> Path:
    result = _run(tmp, key, "--out", str(tmp / name), *args)
    assert result.exit_code == 0, result.output
    return tmp / name


def _ndjson(out: Path, kind: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "fhir" / f"{kind}.ndjson").read_text().splitlines()]


def _original_uids(loaded: list[Loaded]) -> set[str]:
    uids: set[str] = set()
    for p in loaded:
        for f in p.files:
            for elem in pydicom.dcmread(f).iterall():
                if elem.VR == "UI" and elem.value and not str(elem.value).startswith("1.2.840.10008."):
                    uids.add(str(elem.value))
    return uids


def test_export_names_no_one_links_dicom_and_fhir_and_is_stable(
    tmp_path: Path, world: tuple[list[Loaded], Path], caplog: pytest.LogCaptureFixture, fresh_orthanc_peer: Any,
) -> None:
    loaded, selection = world
    caplog.set_level("DEBUG")
    out = _export(tmp_path, KEY_A, "export-a", "--patients-from", str(selection))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] is True and manifest["counts"]["patients"] == 3
    assert manifest["counts"]["studies"] == 3
    assert [s["what"] for s in manifest["skipped"]] == ["selection line 6"]  # the unknown MRN, by line only
    dicom_files = sorted(out.glob("dicom/**/*.dcm"))
    assert len(dicom_files) == sum(len(p.files) for p in loaded)

    # -- 0 hits: raw bytes of every file, every DICOM element at every depth, the NDJSON
    needles = {f"patient {n} {kind}": v for n, p in enumerate(loaded) for kind, v in p.needles().items()}
    needles |= {f"UID {u}": u for u in _original_uids(loaded)}
    needles |= {f"Observation id {o}": o for p in loaded for o in p.observation_ids}
    hits = []
    for path in out.rglob("*"):
        if path.is_file():
            raw = path.read_bytes().lower()
            hits += [f"{path.name}: {what}" for what, v in needles.items() if v.lower().encode() in raw]
    for path in dicom_files:
        for elem in pydicom.dcmread(path).iterall():
            if elem.tag != 0x7FE00010:
                text = str(elem.value).lower()
                hits += [f"{path.name} {elem.keyword}: {what}" for what, v in needles.items() if v.lower() in text]
    assert hits == [], hits[:20]
    assert len(needles) > 3 * 7 + 100  # names, MRNs, birth dates, ids, and every original UID were looked for
    logged = caplog.text.lower()
    assert [w for w, v in needles.items() if not w.startswith("UID") and v.lower() in logged] == []
    assert KEY_A not in caplog.text and KEY_A not in json.dumps(manifest)

    # -- the same patient links across DICOM and FHIR
    patients = {p["id"]: p for p in _ndjson(out, "Patient")}
    assert len(patients) == 3
    dicom_by_patient: dict[str, set[str]] = {}
    for path in dicom_files:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        assert ds.PatientIdentityRemoved == "YES" and ds.PatientID in patients and str(ds.PatientName) == ds.PatientID
        dicom_by_patient.setdefault(ds.PatientID, set()).add(str(ds.StudyInstanceUID))
    assert set(dicom_by_patient) == set(patients) and all(len(v) == 1 for v in dicom_by_patient.values())
    observations = _ndjson(out, "Observation")
    assert {o["subject"]["reference"] for o in observations} == {f"Patient/{pid}" for pid in patients}
    obs_ids = {o["id"] for o in observations}
    assessments = _ndjson(out, "RiskAssessment")
    assert len(assessments) == 2
    for ra in assessments:
        pid = ra["subject"]["reference"].removeprefix("Patient/")
        study = [b for b in ra["basis"] if b.get("type") == "ImagingStudy"]
        assert study and study[0]["identifier"]["value"].removeprefix("urn:oid:") in dicom_by_patient[pid]
        assert [b for b in ra["basis"] if "Observation/" in b.get("reference", "")]
        assert all(b["reference"].removeprefix("Observation/") in obs_ids for b in ra["basis"] if "reference" in b)

    # -- intervals survive the shift: study time vs every vital sign and the assessment, and the age
    for n, original in enumerate(loaded):
        first = pydicom.dcmread(original.files[0], stop_before_pixels=True)
        pid = next(pid for pid in dicom_by_patient if _study_of(out, pid, first) is not None)
        exported = _study_of(out, pid, first)
        assert exported is not None
        shift = _study_dt(first) - _study_dt(exported)
        assert shift.days >= 365 and shift == timedelta(days=shift.days), f"patient {n}: not a whole-day shift"
        assert exported.StudyTime == first.StudyTime and exported.PatientAge == first.PatientAge
        assert patients[pid]["birthDate"] == f"{original.birth - shift:%Y-%m-%d}"
        originals = original.observation_times
        shifted = sorted(datetime.fromisoformat(o["effectiveDateTime"]) for o in observations
                         if o["subject"]["reference"] == f"Patient/{pid}" and "effectiveDateTime" in o)
        assert shifted and shifted == [t - shift for t in originals]

    # -- pixels: the engine's decoder reads the same image from the original and the export
    by_sop = {}
    for path in dicom_files:
        by_sop[str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)] = path
    for original in loaded:
        for path in original.files[:5]:
            sop = str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)
            a, b = decode_file(path), decode_file(by_sop[_uid_a(sop)])
            assert len(a.slices) == len(b.slices) == 1
            assert np.array_equal(a.slices[0].pixels, b.slices[0].pixels)
            assert a.slices[0].position == b.slices[0].position

    # -- it loads at another centre: valid FHIR R4 resources; DICOM a PACS accepts and the engine's adapter reads back
    for kind, model in (("Patient", Patient), ("Observation", Observation), ("RiskAssessment", RiskAssessment)):
        for resource in _ndjson(out, kind):
            model.model_validate(resource)
    pid = sorted(dicom_by_patient)[0]
    (new_study,) = dicom_by_patient[pid]
    files = sorted(out.glob(f"dicom/{pid}/{new_study}/*/*.dcm"))
    assert stow(fresh_orthanc_peer.dicomweb_url, files) == len(files)
    with DicomWebPacs(fresh_orthanc_peer.dicomweb_url) as pacs:
        biggest = max(pacs.list_series(new_study), key=lambda ref: ref.n_instances)
        modality, slices = pacs.retrieve_series(new_study, biggest.series_uid)
    assert modality == "CT" and len(slices) == biggest.n_instances == len(list(out.glob(f"dicom/{pid}/{new_study}/"
                                                                                        f"{biggest.series_uid}/*.dcm")))

    # -- stable for the same key, unrelated for another
    again = _export(tmp_path, KEY_A, "export-a2", "--patients-from", str(selection))
    for path in out.rglob("*"):
        if path.is_file() and path.name != "manifest.json":
            assert (again / path.relative_to(out)).read_bytes() == path.read_bytes(), path
    other = _export(tmp_path, KEY_B, "export-b", "--patients-from", str(selection))
    other_ids = {p["id"] for p in _ndjson(other, "Patient")}
    assert len(other_ids) == 3 and not other_ids & set(patients)
    other_uids = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in other.glob("dicom/**/*.dcm")}
    assert not other_uids & set(by_sop)
    assert json.loads((other / "manifest.json").read_text())["key_id"] != manifest["key_id"]

    # -- --all-assessed: the patients the engine scored (0 and 1), with the same pseudonyms as before
    assessed = _export(tmp_path, KEY_A, "export-assessed", "--all-assessed")
    assert {p["id"] for p in _ndjson(assessed, "Patient")} == {_pid(loaded[0]), _pid(loaded[1])}


def _uid_a(original_uid: str) -> str:
    return DeidKey(KEY_A.encode()).uid(original_uid)


def _pid(original: Loaded) -> str:
    return DeidKey(KEY_A.encode()).patient(original.fhir_id)


def _study_of(out: Path, pid: str, original: pydicom.Dataset) -> pydicom.Dataset | None:
    uid = _uid_a(str(original.SOPInstanceUID))
    found = list(out.glob(f"dicom/{pid}/*/*/{uid}.dcm"))
    return pydicom.dcmread(found[0], stop_before_pixels=True) if found else None


def _study_dt(ds: pydicom.Dataset) -> datetime:
    return datetime.strptime(f"{ds.StudyDate}{ds.StudyTime[:6]}", "%Y%m%d%H%M%S")


def test_a_missing_or_placeholder_key_stops_before_anything_is_written(
    tmp_path: Path, world: tuple[list[Loaded], Path], monkeypatch: pytest.MonkeyPatch,
) -> None:
    _, selection = world
    missing = _run(tmp_path, None, "--out", str(tmp_path / "x"), "--patients-from", str(selection))
    assert missing.exit_code == 1 and "no de-identification key" in missing.output
    assert "STROKEWATCH_PRIVACY__DEID_KEY" in missing.output
    placeholder = _run(tmp_path, "changeme", "--out", str(tmp_path / "x"), "--patients-from", str(selection))
    assert placeholder.exit_code == 1 and "placeholder" in placeholder.output and "changeme" not in placeholder.output
    assert not (tmp_path / "x").exists() and not list(tmp_path.glob(".x.partial-*"))
    both = _run(tmp_path, KEY_A, "--out", str(tmp_path / "x"), "--all-assessed", "--patients-from", str(selection))
    assert both.exit_code == 2 and not (tmp_path / "x").exists()
    monkeypatch.setenv("STROKEWATCH_DATA_DIR", str(tmp_path / "no-engine-here"))  # no database: said, not a traceback
    no_db = _run(tmp_path, KEY_A, "--out", str(tmp_path / "x"), "--all-assessed")
    assert no_db.exit_code == 1 and "cannot read the engine's database" in no_db.output, no_db.output
    assert not (tmp_path / "x").exists() and not list(tmp_path.glob(".x.partial-*"))
