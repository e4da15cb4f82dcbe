"""The use cases end to end over the in-memory fakes of every port (tests/unit/fakes.py)."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest

from integration.domain.types import DomainError, Outcome, PatientInfo, SeriesRef, StudyRef
from integration.services.assess import assess_patients, publish
from integration.services.context import Services
from integration.services.studies import ingest_study, register_study, release_held_studies
from integration.services.vitals import sync_vitals
from tests.unit.fakes import NOW, SERIES, STUDY, FakeClock, FakeEhr, FakeModel, FakePacs, FakeStore, obs


@pytest.fixture()
def svc(tmp_path: Path) -> Services:
    model = FakeModel()
    clock = FakeClock()
    s = Services(store=FakeStore(clock), pacs=FakePacs(), ehr=FakeEhr(), model=lambda: model,
                 volumes_dir=tmp_path / "volumes", clock=clock)
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
    written = svc.ehr.created[f"RiskAssessment|{svc.assessment_identifier_system}|{second}"][1]  # type: ignore[attr-defined]
    assert {"reference": f"RiskAssessment/{old_fhir}", "type": "RiskAssessment", "display": "superseded assessment",
            "identifier": {"system": svc.assessment_identifier_system, "value": first}} in written["basis"]
    assert written == new.resource  # built once, when scored; written as recorded
    assert written["performer"]["reference"].startswith("Device/")


def test_superseding_an_unpublished_assessment_links_it_by_identifier(svc: Services) -> None:
    register_study(svc, STUDY)
    ingest_study(svc, STUDY)
    sync_vitals(svc, "pat-1")
    first = assess_patients(svc, ["pat-1"])[0].identifier  # scored, not yet written to the EHR
    svc.ehr.observations.append(obs("o4", "8867-4", 120, "/min", NOW - timedelta(minutes=30)))  # type: ignore[attr-defined]
    sync_vitals(svc, "pat-1")
    second = assess_patients(svc, ["pat-1"])[0].identifier
    link = svc.store.get_assessment(second).resource["basis"][-1]
    assert link == {"type": "RiskAssessment", "display": "superseded assessment",
                    "identifier": {"system": svc.assessment_identifier_system, "value": first}}


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


@pytest.mark.parametrize("uid", ["../../etc/passwd", "1.2.3?x=y", "1.2.03", "1." + "2" * 70])
def test_a_study_uid_that_is_not_a_dicom_uid_never_reaches_the_pacs_or_a_file_name(svc: Services, uid: str) -> None:
    calls: list[str] = []
    svc.pacs.get_study = lambda u: calls.append(u)  # type: ignore[method-assign]
    svc.pacs.list_series = lambda u: calls.append(u) or []  # type: ignore[method-assign]
    assert register_study(svc, uid) is False
    svc.store.add_study(StudyRef(uid, "MRN1", None, NOW), "qido", NOW)  # as if a peer had announced it
    res = ingest_study(svc, uid)
    assert (res.status, res.outcome) == ("failed", Outcome.INVALID_UID.value)
    assert "not a DICOM UID" in (res.reason or "")
    assert calls == [] and svc.pacs.retrievals == 0  # type: ignore[attr-defined]
    assert not svc.volumes_dir.exists() or not any(svc.volumes_dir.iterdir())


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
