"""`strokewatch training-set export`, against a real Orthanc and the FHIR sandbox: the engine ingests two synthetic
patients' studies and syncs their vitals; the export writes, for the patients of the site's outcomes file, exactly the
model inputs the engine scores them on (``assess.prepare``), with the outcomes, and no identifier."""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from inference import contract as C
from integration.bootstrap import bootstrap
from integration.config import Settings
from integration.domain.types import StudyRef
from integration.entrypoints.cli import app
from integration.services.assess import prepare
from integration.services.studies import ingest_study
from integration.services.training_set import parse_outcomes
from integration.services.vitals import sync_vitals
from sandbox import FhirPeer, OrthancPeer
from sandbox.cohort import load_cohort

pytestmark = pytest.mark.peers

MRN_SYSTEM = "urn:oid:1.2.36.146.595.217.0.1"


def test_the_export_holds_the_inputs_the_engine_scores_and_no_identifier(
    tmp_path: Path, orthanc_peer: OrthancPeer, fhir_peer: FhirPeer, monkeypatch: pytest.MonkeyPatch
) -> None:
    orthanc_peer.reset()
    fhir_peer.reset()
    now = datetime.now(UTC).replace(microsecond=0)
    loaded = load_cohort(2, 13, dicomweb_url=orthanc_peer.dicomweb_url, fhir_base_url=fhir_peer.base_url,
                         identifier_system=MRN_SYSTEM, window_end=now - timedelta(hours=2))
    data = tmp_path / "data"
    for name in [k for k in os.environ if k.startswith("STROKEWATCH_")]:
        monkeypatch.delenv(name)
    env = {"STROKEWATCH_SANDBOX": "true", "STROKEWATCH_DATA_DIR": str(data),
           "STROKEWATCH_PACS__DICOMWEB_URL": orthanc_peer.dicomweb_url, "STROKEWATCH_PACS__KIND": "generic",
           "STROKEWATCH_EHR__BASE_URL": fhir_peer.base_url, "STROKEWATCH_EHR__PATIENT_IDENTIFIER_SYSTEM": MRN_SYSTEM}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    engine = bootstrap(Settings())
    svc = engine.services
    fhir_ids = []
    try:
        for patient in loaded:
            svc.store.add_study(StudyRef(patient.study_uid, patient.mrn, None), "qido", svc.clock.now())
            ingested = ingest_study(svc, patient.study_uid)
            assert ingested.status == "ready" and ingested.patient_fhir_id, ingested
            sync_vitals(svc, ingested.patient_fhir_id)
            fhir_ids.append(ingested.patient_fhir_id)
        expected = [prepare(svc, fhir_id, "training-set").inputs for fhir_id in fhir_ids]
    finally:
        engine.close()

    outcomes = tmp_path / "outcomes.csv"
    outcomes.write_text(f"# the site's registry\nPatient/{fhir_ids[0]},1\n{MRN_SYSTEM}|{loaded[1].mrn},0\n"
                        f"{MRN_SYSTEM}|NO-SUCH-MRN,1\n")
    out = tmp_path / "site.npz"
    result = CliRunner().invoke(app, ["training-set", "export", "--outcomes", str(outcomes), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert '"patients": 2' in result.output and '"events": 1' in result.output
    assert "no Patient with that identifier" in result.output and "NO-SUCH-MRN" not in result.output

    with np.load(out, allow_pickle=False) as got:
        assert sorted(got.files) == sorted([*C.INPUT_NAMES, "outcome", "age_years", "male"])
        for row, inputs in enumerate(expected):  # exactly what the engine scores the patient on
            for name in C.INPUT_NAMES:
                np.testing.assert_array_equal(got[name][row], getattr(inputs, name), err_msg=name)
        assert got["outcome"].tolist() == [1.0, 0.0]
        assert (got["image_present"][:, 0] == 1.0).all()  # both studies' volumes came from the engine's store
        assert np.isfinite(got["age_years"]).all()
    raw = out.read_bytes()
    for needle in (*fhir_ids, *(p.mrn for p in loaded), *(p.study_uid for p in loaded)):
        assert needle.encode() not in raw

    again = CliRunner().invoke(app, ["training-set", "export", "--outcomes", str(outcomes), "--out", str(out)])
    assert again.exit_code == 2 and "exists" in again.output  # never overwritten


@pytest.mark.parametrize(
    ("text", "message"),
    [("Patient/a,2\n", "line 1: the outcome must be 0 or 1"), ("Patient/a\n", "line 1: expected"),
     ("# nothing\n", "no patient"), ("Patient/a,1\nPatient/a,0\n", "line 2: this patient is on an earlier line")],
)
def test_outcome_files_are_checked_line_by_line(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_outcomes(text.splitlines())


def test_outcome_lines_name_patients_as_the_selection_file_does() -> None:
    rows = parse_outcomes(["Patient/abc,1", "urn:mrn|M1,0", "M2 , 1"])
    got: list[Any] = [(r.selector.fhir_id, r.selector.system, r.selector.value, r.outcome) for r in rows]
    assert got == [("abc", None, None, 1), (None, "urn:mrn", "M1", 0), (None, None, "M2", 1)]
