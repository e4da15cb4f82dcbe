"""PHI stays in: after the whole flow (a real Celery worker, the real Orthanc and FHIR sandbox) no log line, no
failure record and no audit entry names a patient, an MRN or a birth date, and what the engine wrote is private.

The cohort's identities are known and distinctive (drawn fresh per run), so a leak cannot hide behind common
words: two patients are matched and scored (one with an implausible heart rate, a recorded failure), one study
is held because its patient is not in the EHR (an unmatched_patient failure, retried while the test runs).
"""

from __future__ import annotations

import json
import secrets
import stat
import string
import time
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import text

from sandbox.cohort import post_transaction, stow
from tests.e2e.conftest import MRN_SYSTEM, risk_assessments, wait_for

SEED = 41


@dataclass(frozen=True)
class Identity:
    mrn: str
    given: str
    family: str
    birth: datetime

    def needles(self) -> dict[str, str]:
        """Every form the identity takes in DICOM (PN ``Family^Given``, DA ``YYYYMMDD``) and FHIR (ISO date)."""
        return {"mrn": self.mrn, "given name": self.given, "family name": self.family,
                "DICOM name": f"{self.family}^{self.given}", "birth date (FHIR)": f"{self.birth:%Y-%m-%d}",
                "birth date (DICOM)": f"{self.birth:%Y%m%d}"}


def _letters(n: int) -> str:
    return "".join(secrets.choice(string.ascii_lowercase) for _ in range(n))


def _implausible_heart_rate(patient_id: str, when: datetime) -> dict[str, Any]:
    return {
        "resourceType": "Observation", "status": "final",
        "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category",
                                  "code": "vital-signs"}]}],
        "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]},
        "subject": {"reference": f"Patient/{patient_id}"},
        "effectiveDateTime": when.isoformat(timespec="seconds"),
        "valueQuantity": {"value": 900, "unit": "/min", "system": "http://unitsofmeasure.org", "code": "/min"},
    }


def _load(tmp_path: Path, fhir_base_url: str, dicomweb_url: str, window_end: datetime) -> tuple[list[Identity], str]:
    """Three synthetic patients under fresh identities; the last one's Patient is never created.
    Returns the identities and the held study's UID."""
    import pydicom

    import synth

    identities: list[Identity] = []
    held_uid = ""
    with httpx.Client(timeout=120) as client:
        for i, patient in enumerate(synth.iter_cohort(3, SEED)):
            tag = _letters(6)
            patient = replace(patient, mrn=f"PHI{tag.upper()}{i}", given_name=f"Zephyrine{tag}",
                              family_name=f"Quillfeather{tag}")
            birth = patient.birth_date(window_end)
            identities.append(Identity(patient.mrn, patient.given_name, patient.family_name,
                                       datetime(birth.year, birth.month, birth.day)))
            if i < 2:
                resources = synth.fhir_resources(patient, identifier_system=MRN_SYSTEM, window_end=window_end)
                post_transaction(fhir_base_url, synth.transaction_bundle(resources), client=client)
            if i == 1:
                found = client.get(f"{fhir_base_url}/Patient", params={"identifier": f"{MRN_SYSTEM}|{patient.mrn}"})
                pid = found.raise_for_status().json()["entry"][0]["resource"]["id"]
                client.post(f"{fhir_base_url}/Observation", json=_implausible_heart_rate(pid, window_end - timedelta(
                    hours=2)), headers={"Content-Type": "application/fhir+json"}).raise_for_status()
            files = synth.write_dicom(patient, tmp_path / f"dicom{i}", window_end=window_end)
            assert pydicom.dcmread(files[0], stop_before_pixels=True).PatientID == patient.mrn
            stow(dicomweb_url, files, client=client)
            if i == 2:
                held_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    return identities, held_uid


def _hits(where: str, text_: str, identities: list[Identity]) -> list[str]:
    low = text_.lower()
    return [f"{where}: patient {n}'s {kind}" for n, ident in enumerate(identities)
            for kind, needle in ident.needles().items() if needle.lower() in low]


def _rows(store: Any, table: str) -> str:
    """Every column of every row (text, timestamps, the details JSON) as one text."""
    with store.engine.connect() as conn:
        rows = conn.execute(text(f"SELECT * FROM {table}")).mappings().all()  # noqa: S608 - fixed table names
    return "\n".join(json.dumps({k: str(v) for k, v in row.items()}) for row in rows)


def _failures(store: Any) -> list[dict[str, Any]]:
    with store.engine.connect() as conn:
        return [dict(r) for r in conn.execute(text("SELECT outcome, stage FROM failures")).mappings().all()]


@pytest.mark.peers
@pytest.mark.slow
def test_no_name_mrn_or_birth_date_in_logs_failures_or_audit_and_data_files_are_private(
    start_worker: Any, store: Any, engine_env: dict[str, str], fresh_fhir_peer: Any, fresh_orthanc_peer: Any,
    tmp_path: Path,
) -> None:
    window_end = datetime.now(UTC).replace(microsecond=0)
    identities, held_uid = _load(tmp_path, fresh_fhir_peer.base_url, fresh_orthanc_peer.dicomweb_url, window_end)
    worker = start_worker()
    wait_for(lambda: len(risk_assessments(fresh_fhir_peer.base_url)) >= 2, 240, "two RiskAssessments", worker)
    wait_for(lambda: (s := store.get_study(held_uid)) is not None and s.status == "held" and s.attempts >= 2, 120,
             "the unmatched study held and retried", worker)
    wait_for(lambda: {"implausible_value", "unmatched_patient"} <= {f["outcome"] for f in _failures(store)}, 60,
             "the implausible heart rate and the unmatched patient recorded as failures", worker)
    time.sleep(3)  # a few more detect/sweep/poll cycles write their log lines
    worker.stop()

    data = Path(engine_env["STROKEWATCH_DATA_DIR"])
    logs = sorted({*data.rglob("*.log"), *tmp_path.glob("worker*.log")})
    assert any(p.name.startswith("worker") for p in logs) and all(p.stat().st_size > 0 for p in logs)
    hits: list[str] = []
    for log in logs:
        hits += _hits(str(log.relative_to(tmp_path)), log.read_text(errors="replace"), identities)
    hits += _hits("failures table", _rows(store, "failures"), identities)
    audit = data / "audit" / "audit.log"  # written by the API when patient data is read; covered by *.log too
    if audit.exists():
        hits += _hits("audit log", audit.read_text(errors="replace"), identities)
    assert hits == [], "PHI found:\n" + "\n".join(hits)

    # The search does find PHI where the engine must keep it: the PatientID it matches patients by.
    assert _hits("studies table", _rows(store, "studies"), identities)

    # Everything the engine wrote under its data dir is its user's alone: folders 0700, files 0600. Except Celery
    # beat's schedule (task names and run times, no PHI): dbm rewrites it with the mode of the worker's umask, and
    # this worker runs with the default one (`strokewatch run` starts it with 077); it lies in the 0700 data dir.
    loose = [f"{p.relative_to(data)}: {stat.S_IMODE(p.lstat().st_mode):o}"
             for p in (data, *data.rglob("*")) if not p.is_symlink() and not p.name.startswith("celerybeat-schedule")
             and stat.S_IMODE(p.lstat().st_mode) & 0o077]
    assert loose == [], "readable by others:\n" + "\n".join(loose)
    assert stat.S_IMODE((data / "pseudonym.key").stat().st_mode) == 0o600
    assert any((data / "volumes").glob("*.npy")) and (data / "strokewatch.db").exists()
