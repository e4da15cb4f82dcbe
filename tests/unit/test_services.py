"""The use cases end to end over small fakes of the ports (PACS, EHR, model) and a real SQLite store."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from inference.preprocess import Slice
from inference.runtime import ModelInputs, ModelUnavailableError, Prediction
from integration.adapters.db.session import make_engine, upgrade
from integration.adapters.db.store import SqlStore
from integration.domain.types import DomainError, Outcome, PatientInfo, SeriesRef, StudyRef
from integration.services.assess import assess_patients, publish
from integration.services.context import Services
from integration.services.studies import ingest_study, register_study, release_held_studies
from integration.services.vitals import sync_vitals

NOW = datetime(2026, 11, 20, 12, 0, tzinfo=UTC)
STUDY = "1.2.826.0.1.3680043.8.498.1"
SERIES = "1.2.826.0.1.3680043.8.498.1.1"


class FakeClock:
    def __init__(self) -> None:
        self.t = NOW

    def now(self) -> datetime:
        return self.t


def ct_slices(n: int = 24) -> list[Slice]:
    rng = np.random.default_rng(0)
    out = []
    for k in rng.permutation(n):  # file order is not geometry order
        px = np.full((64, 64), 30.0, dtype=np.float32)
        px[20:40, 20:40] = 60.0
        out.append(Slice(px, (-110.0, -110.0, 5.0 * float(k)), (1, 0, 0, 0, 1, 0), (3.5, 3.5)))
    return out


class FakePacs:
    def __init__(self) -> None:
        self.series = [SeriesRef(STUDY, SERIES, "CT", 24, body_part="HEAD", series_description="AX BRAIN 5mm",
                                 study_description="CT HEAD WO", sop_class_uid="1.2.840.10008.5.1.4.1.1.2")]
        self.down = False
        self.retrievals = 0

    def find_studies(self, first: date, last: date) -> list[StudyRef]:
        return [StudyRef(STUDY, "MRN1", None, NOW)]

    def get_study(self, uid: str) -> StudyRef | None:
        return StudyRef(STUDY, "MRN1", None, NOW - timedelta(hours=1)) if uid == STUDY else None

    def list_series(self, uid: str) -> list[SeriesRef]:
        if self.down:
            raise DomainError(Outcome.PACS_UNAVAILABLE, "connection refused")
        return self.series

    def retrieve_series(self, study_uid: str, series_uid: str) -> tuple[str, list[Slice]]:
        self.retrievals += 1
        return "CT", ct_slices()


def obs(oid: str, code: str, value: float, unit: str, when: datetime) -> dict[str, Any]:
    return {
        "resourceType": "Observation", "id": oid, "status": "final",
        "meta": {"lastUpdated": NOW.isoformat()},
        "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category",
                                  "code": "vital-signs"}]}],
        "code": {"coding": [{"system": "http://loinc.org", "code": code}]},
        "subject": {"reference": "Patient/pat-1"},
        "effectiveDateTime": when.isoformat(),
        "valueQuantity": {"value": value, "unit": unit, "system": "http://unitsofmeasure.org", "code": unit},
    }


class FakeEhr:
    def __init__(self) -> None:
        self.patients: dict[str, PatientInfo] = {"MRN1": PatientInfo("pat-1", "1950-03-04", "female")}
        self.observations = [
            obs("o1", "8867-4", 80, "/min", NOW - timedelta(hours=30)),
            obs("o2", "8480-6", 150, "mm[Hg]", NOW - timedelta(hours=20)),
            obs("o3", "8310-5", 98.6, "[degF]", NOW - timedelta(hours=10)),
        ]
        self.created: dict[str, tuple[str, dict[str, Any]]] = {}
        self.fail_create: DomainError | None = None

    def find_patient(self, system: str | None, value: str) -> PatientInfo | None:
        return self.patients.get(value)

    def patients_updated_since(self, since: datetime) -> list[PatientInfo]:
        return [PatientInfo(p.fhir_id, p.birth_date, p.gender, (("", mrn),)) for mrn, p in self.patients.items()]

    def search_observations(self, patient_id: str, codes: Sequence[str], since: datetime | None,
                            updated_since: datetime | None) -> list[dict[str, Any]]:
        return list(self.observations)

    def conditional_create(self, resource: dict[str, Any], system: str, value: str) -> tuple[str, bool]:
        if self.fail_create is not None:
            raise self.fail_create
        key = f"{resource['resourceType']}|{system}|{value}"
        if key in self.created:
            return self.created[key][0], False
        fid = f"{resource['resourceType'].lower()}-{len(self.created) + 1}"
        self.created[key] = (fid, resource)
        return fid, True

    def update(self, resource: dict[str, Any]) -> None:
        raise AssertionError("not used")

    def search(self, resource_type: str, params: dict[str, str]) -> list[dict[str, Any]]:
        return []

    def assessments(self) -> list[dict[str, Any]]:
        return [r for k, (_, r) in self.created.items() if k.startswith("RiskAssessment|")]


class FakeModel:
    model_version = "9.9.9"
    trained = True
    runtime_name = "fake"

    def __init__(self) -> None:
        self.calls: list[int] = []
        self.down = False

    def predict(self, batch: Sequence[ModelInputs]) -> list[Prediction]:
        if self.down:
            raise ModelUnavailableError("triton is down")
        self.calls.append(len(batch))
        return [Prediction(0.1 + 0.5 * float(b.image_present[0]) * 0.5 + 0.01 * float(b.vitals_mask.sum()), 0.0,
                           self.model_version, "fake") for b in batch]


@pytest.fixture()
def svc(tmp_path: Path) -> Services:
    url = f"sqlite:///{tmp_path / 'sw.db'}"
    upgrade(url)
    model = FakeModel()
    s = Services(store=SqlStore(make_engine(url)), pacs=FakePacs(), ehr=FakeEhr(), model=lambda: model,
                 volumes_dir=tmp_path / "volumes", clock=FakeClock())
    s.enqueued = []  # type: ignore[attr-defined]
    s.enqueue = lambda stage, ids: s.enqueued.append((stage, list(ids)))  # type: ignore[attr-defined]
    return s


def run_flow(svc: Services) -> list[str]:
    assert register_study(svc, STUDY)
    assert ingest_study(svc, STUDY).status == "ready"
    sync_vitals(svc, "pat-1")
    results = assess_patients(svc, ["pat-1"])
    ids = [r.identifier for r in results if r.identifier]
    for ident in ids:
        publish(svc, ident)
    return ids


def test_full_flow_writes_one_assessment_with_inputs(svc: Services) -> None:
    ids = run_flow(svc)
    assert len(ids) == 1
    ras = svc.ehr.assessments()  # type: ignore[attr-defined]
    assert len(ras) == 1
    ra = ras[0]
    assert ra["subject"] == {"reference": "Patient/pat-1"}
    assert sorted(b["reference"] for b in ra["basis"] if "reference" in b) == [
        "Observation/o1", "Observation/o2", "Observation/o3"]
    assert ra["performer"]["reference"].startswith("Device/")
    row = svc.store.get_assessment(ids[0])
    assert row.status == "published" and row.fhir_id and row.n_vitals == 3
    # window end is the latest input: the study (1 h ago) is later than the last vital (10 h ago)
    assert row.window_end == NOW - timedelta(hours=1)


def test_rerun_and_resent_study_do_not_duplicate(svc: Services) -> None:
    run_flow(svc)
    # the same study announced again, a replayed ingest, a replayed assess: nothing new is written
    register_study(svc, STUDY)
    assert ingest_study(svc, STUDY).status == "skipped"
    svc.store.mark_needs_assessment("pat-1")
    results = assess_patients(svc, ["pat-1"])
    assert [r.status for r in results] == ["unchanged"]
    assert len(svc.ehr.assessments()) == 1  # type: ignore[attr-defined]


def test_new_vitals_give_a_new_assessment_linked_to_the_old(svc: Services) -> None:
    first = run_flow(svc)[0]
    svc.ehr.observations.append(obs("o4", "8867-4", 120, "/min", NOW - timedelta(minutes=30)))  # type: ignore[attr-defined]
    sync_vitals(svc, "pat-1")
    second = [r.identifier for r in assess_patients(svc, ["pat-1"])][0]
    assert second and second != first
    assert publish(svc, second) == "published"
    new = svc.store.get_assessment(second)
    assert new.supersedes_identifier == first
    assert svc.store.get_assessment(first).superseded
    old_fhir = svc.store.get_assessment(first).fhir_id
    assert {"reference": f"RiskAssessment/{old_fhir}", "display": "superseded assessment"} in \
        svc.ehr.created[f"RiskAssessment|{svc.assessment_identifier_system}|{second}"][1]["basis"]  # type: ignore[attr-defined]


def test_unmatched_patient_is_held_then_retried_when_the_patient_appears(svc: Services) -> None:
    svc.ehr.patients.clear()  # type: ignore[attr-defined]
    register_study(svc, STUDY)
    res = ingest_study(svc, STUDY)
    assert (res.status, res.outcome) == ("held", Outcome.UNMATCHED_PATIENT.value)
    row = svc.store.get_study(STUDY)
    assert row.next_attempt_at > NOW and row.volume_path  # the volume is kept; only matching is retried
    svc.ehr.patients["MRN1"] = PatientInfo("pat-1", None, None)  # type: ignore[attr-defined]
    svc.clock.t = row.next_attempt_at + timedelta(seconds=1)  # type: ignore[attr-defined]
    assert STUDY in svc.store.studies_due(svc.clock.now())
    retrievals = svc.pacs.retrievals  # type: ignore[attr-defined]
    assert ingest_study(svc, STUDY).status == "ready"
    assert svc.pacs.retrievals == retrievals  # type: ignore[attr-defined]


def test_held_study_is_released_as_soon_as_the_ehr_poll_sees_its_patient(svc: Services) -> None:
    assert release_held_studies(svc) == []  # nothing held: the EHR is not asked
    svc.ehr.patients.clear()  # type: ignore[attr-defined]
    register_study(svc, STUDY)
    assert ingest_study(svc, STUDY).status == "held"
    assert release_held_studies(svc) == []  # still no Patient
    assert svc.store.get_study(STUDY).status == "held"
    svc.ehr.patients["OTHER"] = PatientInfo("pat-9", None, None)  # type: ignore[attr-defined]
    assert release_held_studies(svc) == []  # someone else's Patient
    svc.ehr.patients["mrn1"] = PatientInfo("pat-1", None, None)  # type: ignore[attr-defined]  # case differs
    assert release_held_studies(svc) == [STUDY]  # long before the held study's own timer
    row = svc.store.get_study(STUDY)
    assert row.status == "retry" and row.next_attempt_at is None
    assert ("ingest", [STUDY]) in svc.enqueued  # type: ignore[attr-defined]
    assert release_held_studies(svc) == []  # released once


def test_non_brain_series_is_recorded_with_reason(svc: Services) -> None:
    svc.pacs.series = [SeriesRef(STUDY, SERIES, "SR", 1, sop_class_uid="1.2.840.10008.5.1.4.1.1.88.22")]  # type: ignore[attr-defined]
    register_study(svc, STUDY)
    res = ingest_study(svc, STUDY)
    assert res.status == "failed" and res.outcome == Outcome.NO_ELIGIBLE_SERIES.value
    assert "not a CT/MR image" in (res.reason or "")


def test_pacs_down_is_retried_later_not_lost(svc: Services) -> None:
    register_study(svc, STUDY)
    svc.pacs.down = True  # type: ignore[attr-defined]
    res = ingest_study(svc, STUDY)
    assert (res.status, res.outcome) == ("retry", Outcome.PACS_UNAVAILABLE.value)
    svc.pacs.down = False  # type: ignore[attr-defined]
    svc.clock.t = svc.store.get_study(STUDY).next_attempt_at  # type: ignore[attr-defined]
    assert ingest_study(svc, STUDY).status == "ready"


def test_model_down_defers_assessment_then_scores_once(svc: Services) -> None:
    register_study(svc, STUDY)
    ingest_study(svc, STUDY)
    sync_vitals(svc, "pat-1")
    model = svc.model()
    model.down = True  # type: ignore[attr-defined]
    assert [r.status for r in assess_patients(svc, ["pat-1"])] == ["retry"]
    model.down = False  # type: ignore[attr-defined]
    assert svc.store.patients_due(svc.clock.now(), 10) == []  # backing off
    svc.clock.t += timedelta(minutes=5)  # type: ignore[attr-defined]
    assert svc.store.patients_due(svc.clock.now(), 10) == ["pat-1"]
    assert [r.status for r in assess_patients(svc, ["pat-1"])] == ["scored"]


def test_ehr_rejection_is_recorded_and_not_retried(svc: Services) -> None:
    register_study(svc, STUDY)
    ingest_study(svc, STUDY)
    sync_vitals(svc, "pat-1")
    ident = assess_patients(svc, ["pat-1"])[0].identifier
    svc.ehr.fail_create = DomainError(Outcome.EHR_REJECTED, "400: invalid resource")  # type: ignore[attr-defined]
    assert publish(svc, ident) == "failed"
    assert svc.store.assessments_due(svc.clock.now() + timedelta(days=1)) == []
    assert svc.store.counts()["open_failures"] == {"ehr_rejected": 1}


def test_ehr_unavailable_publish_is_retried(svc: Services) -> None:
    register_study(svc, STUDY)
    ingest_study(svc, STUDY)
    sync_vitals(svc, "pat-1")
    ident = assess_patients(svc, ["pat-1"])[0].identifier
    svc.ehr.fail_create = DomainError(Outcome.EHR_UNAVAILABLE, "503", retry_after=30)  # type: ignore[attr-defined]
    assert publish(svc, ident) == "retry"
    assert svc.store.get_assessment(ident).next_attempt_at >= NOW + timedelta(seconds=30)
    svc.ehr.fail_create = None  # type: ignore[attr-defined]
    svc.clock.t += timedelta(seconds=31)  # type: ignore[attr-defined]
    assert svc.store.assessments_due(svc.clock.now()) == [ident]
    assert publish(svc, ident) == "published"


def test_no_vitals_policy_scores_image_only_or_records_insufficient_data(svc: Services) -> None:
    svc.ehr.observations.clear()  # type: ignore[attr-defined]
    register_study(svc, STUDY)
    ingest_study(svc, STUDY)
    sync_vitals(svc, "pat-1")
    assert [r.status for r in assess_patients(svc, ["pat-1"])] == ["scored"]

    from integration.domain.policy import RiskPolicy

    svc.policy = RiskPolicy(image_only_when_no_vitals=False)
    svc.store.mark_needs_assessment("pat-1")
    svc.clock.t += timedelta(days=1)  # type: ignore[attr-defined]
    res = assess_patients(svc, ["pat-1"])
    assert res[0].status == Outcome.INSUFFICIENT_DATA.value


def test_batch_of_patients_goes_to_the_model_in_one_call(svc: Services) -> None:
    for i in range(5):
        svc.store.upsert_patient(f"pat-{i}", None, None)
        svc.store.replace_vitals(f"pat-{i}", [], [])
    # patients with vitals only (no image) are scored on vitals
    from integration.domain.types import VitalValue

    for i in range(5):
        svc.store.replace_vitals(f"pat-{i}", [VitalValue("hr", 70.0 + i, NOW - timedelta(hours=2), f"o{i}")], [])
        svc.store.mark_needs_assessment(f"pat-{i}")
    results = assess_patients(svc, [f"pat-{i}" for i in range(5)])
    assert [r.status for r in results] == ["scored"] * 5
    calls = svc.model().calls  # type: ignore[attr-defined]
    assert calls[0] == 5  # the five patients in one call (then one batched call for their drivers)
    assert calls[1:] == [5]  # each has one vital sign observed and no image: one withheld variant each


def test_note_names_the_drivers_found_by_withholding_inputs(svc: Services) -> None:
    run_flow(svc)
    note = svc.ehr.assessments()[0]["note"][0]["text"]  # type: ignore[attr-defined]
    # the fake model gives +0.25 for an image and +0.01 per observed value: the image leads, vitals are tiny
    assert "Main drivers: brain imaging findings (+25 points)" in note


def test_drivers_text_orders_by_effect_and_skips_noise() -> None:
    from integration.domain.drivers import top_drivers

    out = top_drivers(0.40, {"image": 0.30, "sbp": 0.20, "hr": 0.395, "glucose": 0.45})
    assert out == ["systolic blood pressure history (+20 points)", "brain imaging findings (+10 points)",
                   "glucose history lowered it (-5 points)"]
