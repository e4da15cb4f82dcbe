"""Vitals read ahead of a pushed study's completion (services.vitals.prefetch_vitals), over the fakes of the ports:
the patient is matched and synced without being scored; the study's own sync, once it is ready, flags the scoring
and reads only what changed since."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest

from integration.domain.types import DomainError, Outcome, StudyRef
from integration.services.context import Services
from integration.services.studies import ingest_study, register_study
from integration.services.vitals import prefetch_vitals, sync_vitals
from tests.unit.fakes import NOW, STUDY, FakeClock, FakeEhr, FakeModel, FakePacs, FakeStore, obs


@pytest.fixture()
def svc(tmp_path: Path) -> Services:
    clock = FakeClock()
    model = FakeModel()
    s = Services(store=FakeStore(clock), pacs=FakePacs(), ehr=FakeEhr(), model=lambda: model,
                 volumes_dir=tmp_path / "volumes", clock=clock, spool=FakePacs())
    s.enqueued = []  # type: ignore[attr-defined]
    s.enqueue = lambda stage, ids: s.enqueued.append((stage, list(ids)))  # type: ignore[attr-defined]
    return s


def test_a_prefetch_syncs_the_patient_without_scoring_them(svc: Services) -> None:
    result = prefetch_vitals(svc, STUDY)
    assert result is not None and result.accepted == 3
    patient = svc.store.get_patient("pat-1")
    assert patient is not None and patient.vitals_synced_at is not None and not patient.needs_assessment
    assert len(svc.store.vitals_between("pat-1", NOW - timedelta(days=7), NOW)) == 3
    assert ("assess", ["pat-1"]) not in svc.enqueued  # type: ignore[attr-defined]


def test_once_the_study_is_ready_its_sync_flags_the_scoring(svc: Services) -> None:
    prefetch_vitals(svc, STUDY)
    assert register_study(svc, STUDY)
    assert ingest_study(svc, STUDY).status == "ready"
    result = sync_vitals(svc, "pat-1")
    assert result.changed == 0  # read ahead: nothing new since
    patient = svc.store.get_patient("pat-1")
    assert patient is not None and patient.needs_assessment
    assert ("assess", ["pat-1"]) in svc.enqueued  # type: ignore[attr-defined]


def test_a_patient_already_followed_is_flagged_when_the_prefetch_finds_new_values(svc: Services) -> None:
    assert register_study(svc, STUDY)
    assert ingest_study(svc, STUDY).status == "ready"
    sync_vitals(svc, "pat-1")
    svc.enqueued.clear()  # type: ignore[attr-defined]
    svc.store.release_patient("pat-1")
    svc.ehr.observations.append(obs("o4", "8867-4", 90, "/min", NOW - timedelta(hours=2)))  # type: ignore[attr-defined]
    second = "1.2.826.0.1.3680043.8.498.4242"  # the patient's next study, arriving

    class Arriving(FakePacs):
        def get_study(self, uid: str) -> StudyRef | None:
            return StudyRef(second, "MRN1", None, NOW) if uid == second else None

    svc.spool = Arriving()
    result = prefetch_vitals(svc, second)
    assert result is not None and result.changed == 1
    assert ("assess", ["pat-1"]) in svc.enqueued  # type: ignore[attr-defined]


def test_nothing_to_prefetch_is_no_error(svc: Services) -> None:
    assert prefetch_vitals(svc, "1.2.3.999") is None  # not in the spool
    assert prefetch_vitals(svc, "../etc") is None  # not a DICOM UID: never looked up
    svc.ehr.patients.clear()  # type: ignore[attr-defined]
    assert prefetch_vitals(svc, STUDY) is None  # no Patient yet: the ingest holds the study
    assert svc.store.get_patient("pat-1") is None


def test_an_ehr_failure_is_recorded_and_left_to_the_ingest(svc: Services) -> None:
    def down(*_: object) -> None:
        raise DomainError(Outcome.EHR_UNAVAILABLE, "connection refused")

    svc.ehr.search_observations = down  # type: ignore[method-assign]
    assert prefetch_vitals(svc, STUDY) is None
    patient = svc.store.get_patient("pat-1")
    assert patient is not None and patient.vitals_synced_at is None and patient.vitals_attempts == 1


def test_a_study_already_complete_is_left_to_its_ingest(svc: Services) -> None:
    assert register_study(svc, STUDY)  # complete before its prefetch ran (a backlog): one sync, the ingest's
    assert prefetch_vitals(svc, STUDY) is None
    assert svc.store.get_patient("pat-1") is None


def test_a_prefetch_landing_after_the_ingest_cannot_leave_the_study_unscored(svc: Services) -> None:
    """Seen in a 300-study backlog (5 lost): the prefetch read the patient before the study was ready, the ingest
    reset the sync, then the prefetch stored every value and stamped the sync; the ingest's own sync found nothing
    changed and no first sync, and nobody flagged the scoring. The ingest flags it now, and the sync scores it."""
    prefetch_vitals(svc, STUDY)
    assert register_study(svc, STUDY)
    assert ingest_study(svc, STUDY).status == "ready"
    svc.store.set_vitals_cursor("pat-1", NOW, NOW)  # the prefetch's stamp, landing after the ingest's reset
    svc.enqueued.clear()  # type: ignore[attr-defined]
    result = sync_vitals(svc, "pat-1")
    assert result.changed == 0
    assert ("assess", ["pat-1"]) in svc.enqueued  # type: ignore[attr-defined]
    assert svc.store.patients_due(NOW, 10) == ["pat-1"]
