"""DICOM push without the network: the completion rule (domain.push), the SCP's use cases (services.push) over an
in-memory spool and FakeStore, the ingest of a pushed study from the spool, and what retention removes."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import pytest

from inference.preprocess import Slice
from integration.domain.limits import ImageLimits
from integration.domain.push import (
    SCP_SOURCE,
    InstanceHeader,
    ReceivedInstance,
    SpooledStudy,
    StoreStatus,
    StudyArrivals,
)
from integration.domain.records import BuiltVolume, StudyStatus
from integration.domain.retention import spool_removable
from integration.domain.series import CT_IMAGE_STORAGE
from integration.domain.types import DomainError, Outcome, SeriesRef, StudyRef
from integration.services.context import Services
from integration.services.push import PushServices, association_closed, complete_due, receive_instance, recover
from integration.services.studies import ingest_study
from tests.unit.fakes import NOW, FakeClock, FakeEhr, FakeModel, FakePacs, FakeStore, ct_slices

STUDY = "1.2.826.0.1.3680043.8.498.77"
SERIES = "1.2.826.0.1.3680043.8.498.77.1"
QUIET = timedelta(seconds=10)
T0 = datetime(2026, 3, 29, 0, 30, tzinfo=UTC)  # any instant: the rule reads only the times it is given


# -- the completion rule ----------------------------------------------------------------------------------------


def test_a_released_association_completes_its_study_at_once() -> None:
    arrivals = StudyArrivals(QUIET)
    arrivals.arriving(STUDY, 1, "CT1", T0)
    assert arrivals.due(T0 + timedelta(hours=1)) == []  # open: never due, however long
    assert arrivals.association_closed(1, released=True, now=T0 + timedelta(seconds=1)) == [STUDY]
    assert arrivals.due(T0 + timedelta(seconds=1)) == [STUDY]
    assert arrivals.take_due(T0 + timedelta(seconds=1)) == [STUDY]
    assert arrivals.take_due(T0 + timedelta(seconds=1)) == []  # taken: a second caller does not complete it too
    arrivals.postpone(STUDY, T0 + timedelta(seconds=3))
    assert arrivals.take_due(T0 + timedelta(seconds=3)) == [STUDY]


def test_an_aborted_association_completes_its_study_after_the_quiet_period_from_the_last_instance() -> None:
    arrivals = StudyArrivals(QUIET)
    arrivals.arriving(STUDY, 1, "CT1", T0)
    arrivals.arriving(STUDY, 1, "CT1", T0 + timedelta(seconds=4))
    arrivals.association_closed(1, released=False, now=T0 + timedelta(seconds=5))
    assert arrivals.due(T0 + timedelta(seconds=13.9)) == []
    assert arrivals.due(T0 + timedelta(seconds=14)) == [STUDY]


def test_a_study_over_two_open_associations_waits_for_both_and_a_per_series_sender_for_the_quiet_period() -> None:
    arrivals = StudyArrivals(QUIET, frozenset({"PACS"}))
    arrivals.arriving(STUDY, 1, "CT1", T0)
    arrivals.arriving(STUDY, 2, "CT1", T0)
    assert arrivals.association_closed(1, released=True, now=T0) == []  # association 2 still brings instances
    assert arrivals.due(T0 + timedelta(minutes=5)) == []
    arrivals.association_closed(2, released=True, now=T0 + timedelta(seconds=1))
    assert arrivals.due(T0 + timedelta(seconds=1)) == [STUDY]

    other = "1.2.826.0.1.3680043.8.498.78"
    arrivals.arriving(other, 3, "PACS", T0)  # one association per series: its release says nothing
    arrivals.association_closed(3, released=True, now=T0 + timedelta(seconds=1))
    assert other not in arrivals.due(T0 + timedelta(seconds=9))
    arrivals.arriving(other, 4, "PACS", T0 + timedelta(seconds=3))  # the next series
    arrivals.association_closed(4, released=True, now=T0 + timedelta(seconds=4))
    assert other not in arrivals.due(T0 + timedelta(seconds=12.9))
    assert other in arrivals.due(T0 + timedelta(seconds=13))


def test_an_arrival_during_completion_keeps_the_study_pending_and_recovered_studies_wait_the_quiet_period() -> None:
    arrivals = StudyArrivals(QUIET)
    arrivals.arriving(STUDY, 1, "CT1", T0)
    arrivals.association_closed(1, released=True, now=T0)
    started = arrivals.generation(STUDY)
    arrivals.arriving(STUDY, 2, "CT1", T0 + timedelta(seconds=1))  # a late instance while it is registered
    assert not arrivals.completed(STUDY, started)
    assert arrivals.due(T0 + timedelta(hours=1)) == []  # association 2 is open
    arrivals.association_closed(2, released=True, now=T0 + timedelta(seconds=2))
    assert arrivals.completed(STUDY, arrivals.generation(STUDY))
    assert arrivals.pending() == []

    arrivals.recovered(STUDY, T0)
    assert arrivals.due(T0 + timedelta(seconds=9)) == []
    assert arrivals.due(T0 + timedelta(seconds=10)) == [STUDY]
    arrivals.postpone(STUDY, T0 + timedelta(seconds=30))
    assert arrivals.due(T0 + timedelta(seconds=29)) == []
    with pytest.raises(ValueError):
        StudyArrivals(timedelta(seconds=-1))


# -- receiving instances ----------------------------------------------------------------------------------------


class MemorySpool:
    """The Spool port in memory; ``declared`` is what each data set's header says (by the request's SOP UID)."""

    def __init__(self) -> None:
        self.declared: dict[str, InstanceHeader] = {}
        self.kept: dict[tuple[str, str, str], bytes] = {}
        self.complete: set[str] = set()
        self.free = 10 << 30
        self.fail_put: OSError | None = None
        self.series_refs: dict[str, list[SeriesRef]] = {}
        self.retrieved: list[str] = []

    def parse(self, received: ReceivedInstance) -> InstanceHeader:
        if received.sop_instance_uid not in self.declared:
            raise DomainError(Outcome.CORRUPT_PIXEL_DATA, "the data set cannot be read (EOFError)")
        return self.declared[received.sop_instance_uid]

    def contains(self, header: InstanceHeader) -> bool:
        return (header.study_uid, header.series_uid, header.sop_instance_uid) in self.kept

    def usage(self, study_uid: str, series_uid: str) -> tuple[int, int]:
        mine = [v for k, v in self.kept.items() if k[:2] == (study_uid, series_uid)]
        return len(mine), sum(len(v) for v in mine)

    def free_bytes(self) -> int:
        return self.free

    def reopen(self, study_uid: str) -> None:
        self.complete.discard(study_uid)

    def put(self, header: InstanceHeader, received: ReceivedInstance) -> bool:
        if self.fail_put is not None:
            raise self.fail_put
        key = (header.study_uid, header.series_uid, header.sop_instance_uid)
        new = key not in self.kept
        self.kept[key] = bytes(received.dataset)
        return new

    def study_ref(self, study_uid: str) -> StudyRef | None:
        if not any(k[0] == study_uid for k in self.kept):
            return None
        return StudyRef(study_uid, "MRN1", None, NOW - timedelta(minutes=5), ("CT",))

    def mark_complete(self, study_uid: str) -> None:
        self.complete.add(study_uid)

    def studies(self, *, pending_only: bool = False) -> list[SpooledStudy]:
        uids = sorted({k[0] for k in self.kept})
        found = [SpooledStudy(f"k{n}", uid, NOW - timedelta(minutes=1), uid in self.complete,
                              sum(1 for k in self.kept if k[0] == uid)) for n, uid in enumerate(uids)]
        return [s for s in found if not (pending_only and s.complete)]

    def remove(self, key: str, not_after: datetime, *, dry_run: bool = False) -> int:
        return 0

    def remove_partial(self, before: datetime, *, dry_run: bool = False) -> int:
        return 0

    # the Pacs side
    def find_studies(self, first: date, last: date) -> list[StudyRef]:
        return []

    def get_study(self, uid: str) -> StudyRef | None:
        return self.study_ref(uid)

    def list_series(self, uid: str) -> list[SeriesRef]:
        return self.series_refs.get(uid, [])

    def retrieve_series(self, study_uid: str, series_uid: str) -> tuple[str, list[Slice]]:
        self.retrieved.append(series_uid)
        return "CT", ct_slices()


@pytest.fixture
def spool() -> MemorySpool:
    return MemorySpool()


@pytest.fixture
def push(spool: MemorySpool) -> PushServices:
    clock = FakeClock(T0)
    queued: list[tuple[str, list[str]]] = []
    svc = PushServices(store=FakeStore(clock), spool=spool, arrivals=StudyArrivals(QUIET), clock=clock,
                       limits=ImageLimits(max_rows=512, max_columns=512, max_slices_per_series=6,
                                          max_series_bytes=10_000),
                       max_instance_bytes=2_000, min_free_bytes=1 << 20)
    svc.enqueue = lambda stage, ids: queued.append((stage, list(ids)))
    svc.queued = queued  # type: ignore[attr-defined]
    return svc


def instance(spool: MemorySpool, n: int, *, study: str = STUDY, size: int = 100, association: int = 1,
             sender: str = "CT1", **header: object) -> ReceivedInstance:
    sop = f"{SERIES}.{n}"
    declared = InstanceHeader(study, SERIES, sop, CT_IMAGE_STORAGE, 16, 16, 1)
    spool.declared[sop] = replace(declared, **header)  # type: ignore[arg-type]
    return ReceivedInstance(sender, association, CT_IMAGE_STORAGE, sop, "1.2.840.10008.1.2.1", b"x" * size)


def failures(push: PushServices) -> list[tuple[str, str, Outcome]]:
    return [(f.stage, f.subject, f.outcome) for f in push.store.failures]  # type: ignore[attr-defined]


def test_an_instance_is_kept_once_and_a_duplicate_is_acknowledged_without_a_second_arrival(
    push: PushServices, spool: MemorySpool
) -> None:
    first = receive_instance(push, instance(spool, 1))
    assert first.status is StoreStatus.SUCCESS and first.stored
    generation = push.arrivals.generation(STUDY)
    again = receive_instance(push, instance(spool, 1, association=2))
    assert again.status is StoreStatus.SUCCESS and not again.stored
    assert push.arrivals.generation(STUDY) == generation  # a duplicate does not reopen the study
    assert len(spool.kept) == 1


@pytest.mark.parametrize(
    ("change", "status", "outcome"),
    [
        ({"sop_instance_uid": "1.2.03"}, StoreStatus.CANNOT_UNDERSTAND, Outcome.INVALID_UID),
        ({"sop_class_uid": "1.2.840.10008.5.1.4.1.1.x"}, StoreStatus.CANNOT_UNDERSTAND, Outcome.INVALID_UID),
    ],
)
def test_a_request_whose_uids_are_not_uids_is_refused_with_cannot_understand(
    push: PushServices, spool: MemorySpool, change: dict[str, str], status: StoreStatus, outcome: Outcome
) -> None:
    received = replace(instance(spool, 1), **change)
    result = receive_instance(push, received)
    assert (result.status, result.stored) == (status, False)
    assert failures(push)[0][0] == "receive" and failures(push)[0][2] is outcome
    assert not spool.kept


@pytest.mark.parametrize(
    ("header", "status", "comment"),
    [
        ({"study_uid": "1.2.3.04"}, StoreStatus.CANNOT_UNDERSTAND, "StudyInstanceUID '1.2.3.04' is not a DICOM UID"),
        ({"series_uid": "x" * 80}, StoreStatus.CANNOT_UNDERSTAND, "SeriesInstanceUID"),
        ({"sop_instance_uid": f"{SERIES}.99"}, StoreStatus.DATASET_MISMATCH, "SOPInstanceUID differs"),
        ({"sop_class_uid": "1.2.840.10008.5.1.4.1.1.4"}, StoreStatus.DATASET_MISMATCH, "SOPClassUID differs"),
    ],
)
def test_a_data_set_whose_uids_are_wrong_is_refused_and_recorded(
    push: PushServices, spool: MemorySpool, header: dict[str, str], status: StoreStatus, comment: str
) -> None:
    result = receive_instance(push, instance(spool, 1, **header))
    assert result.status is status and result.comment.startswith(comment[:30]) and len(result.comment) <= 64
    assert not spool.kept and failures(push)[0][2] is Outcome.INVALID_UID


def test_limits_and_a_full_disk_refuse_with_out_of_resources(push: PushServices, spool: MemorySpool) -> None:
    assert receive_instance(push, instance(spool, 1, size=2_001)).comment == "instance too large"
    assert receive_instance(push, instance(spool, 2, rows=1024)).comment == "image too large"
    for n in range(3, 8):  # 5 x 1,900 bytes and 5 planes: within the series' 10,000 bytes and 6 planes
        assert receive_instance(push, instance(spool, n, size=1_900)).ok
    assert receive_instance(push, instance(spool, 8, size=1_900)).comment == "series too large"
    two_frames = receive_instance(push, instance(spool, 9, frames=2))
    assert (two_frames.status, two_frames.comment) == (StoreStatus.OUT_OF_RESOURCES, "series has too many images")
    spool.free = 1 << 19
    assert receive_instance(push, instance(spool, 10)).comment == "disk full"
    spool.free, spool.fail_put = 10 << 30, OSError(28, "No space left on device")
    refused = receive_instance(push, instance(spool, 11))
    assert (refused.status, refused.comment) == (StoreStatus.OUT_OF_RESOURCES, "spool cannot be written")
    assert {f[2] for f in failures(push)} == {Outcome.TOO_LARGE, Outcome.INTERNAL_ERROR}
    assert len(spool.kept) == 5


def test_unreadable_data_sets_and_failing_spools_are_refused_never_acknowledged(
    push: PushServices, spool: MemorySpool
) -> None:
    unreadable = ReceivedInstance("CT1", 1, CT_IMAGE_STORAGE, f"{SERIES}.5", "1.2.840.10008.1.2.1", b"junk")
    assert receive_instance(push, unreadable).status is StoreStatus.CANNOT_UNDERSTAND

    def crash(received: ReceivedInstance) -> InstanceHeader:
        raise KeyError("Doe^John")  # a library's message may quote PHI: never passed on

    spool.parse = crash  # type: ignore[method-assign]
    result = receive_instance(push, instance(spool, 1))
    assert result.status is StoreStatus.OUT_OF_RESOURCES and not spool.kept
    assert all("Doe" not in f.message for f in push.store.failures)  # type: ignore[attr-defined]


def test_other_sop_classes_are_acknowledged_without_being_kept_or_refused_when_configured(
    push: PushServices, spool: MemorySpool
) -> None:
    sr = replace(instance(spool, 1), sop_class_uid="1.2.840.10008.5.1.4.1.1.88.22")
    assert receive_instance(push, sr).ok and not spool.kept and push.arrivals.pending() == []
    push.accept_other_sop_classes = False
    assert receive_instance(push, sr).status is StoreStatus.DATASET_MISMATCH


def test_the_first_instance_of_a_study_queues_its_vitals_prefetch_once(push: PushServices, spool: MemorySpool) -> None:
    receive_instance(push, instance(spool, 0))
    receive_instance(push, instance(spool, 0))  # a duplicate
    receive_instance(push, instance(spool, 1, association=2))  # the same study on a second association
    assert push.queued == [("prefetch", [STUDY])]  # type: ignore[attr-defined]
    other = "1.2.826.0.1.3680043.8.498.79"
    push.prefetch_vitals = False
    receive_instance(push, instance(spool, 7, study=other, association=3))
    assert push.queued == [("prefetch", [STUDY])]  # type: ignore[attr-defined]


# -- completing studies -----------------------------------------------------------------------------------------


def test_a_complete_study_is_registered_once_from_the_spool_and_queued(push: PushServices, spool: MemorySpool) -> None:
    for n in range(3):
        receive_instance(push, instance(spool, n))
    assert complete_due(push) == []  # the association is open
    association_closed(push, 1, released=True)
    assert complete_due(push) == [STUDY]
    row = push.store.get_study(STUDY)
    assert row is not None and row.source == SCP_SOURCE and row.dicom_patient_id == "MRN1"
    assert push.queued == [("prefetch", [STUDY]), ("ingest", [STUDY])]  # type: ignore[attr-defined]
    assert STUDY in spool.complete and complete_due(push) == []
    assert recover(push) == []  # marked complete: nothing to do at the next start


def test_late_instances_reopen_a_registered_study_and_ingest_it_again(push: PushServices, spool: MemorySpool) -> None:
    receive_instance(push, instance(spool, 1))
    association_closed(push, 1, released=True)
    complete_due(push)
    push.store.set_study_volume(STUDY, BuiltVolume("/v/x.npy", "ab", SERIES, "CT"))
    push.store.claim_study(STUDY, T0)

    receive_instance(push, instance(spool, 2, association=2))
    assert STUDY not in spool.complete
    association_closed(push, 2, released=True)
    assert complete_due(push) == []  # being ingested: tried again later
    push.clock.t += timedelta(seconds=5)  # type: ignore[attr-defined]
    push.store.set_study_ready(STUDY, "pat-1")
    assert complete_due(push) == [STUDY]
    row = push.store.get_study(STUDY)
    assert row is not None and row.status is StudyStatus.RETRY and row.volume_path is None
    # the late instance opened the study again: its patient's vitals are read ahead again
    assert push.queued == [("prefetch", [STUDY]), ("ingest", [STUDY]),  # type: ignore[attr-defined]
                           ("prefetch", [STUDY]), ("ingest", [STUDY])]


def test_a_pushed_study_known_from_the_pacs_is_left_to_it_and_a_database_outage_postpones(
    push: PushServices, spool: MemorySpool
) -> None:
    push.store.add_study(StudyRef(STUDY, "MRN1", None, NOW), "qido", T0)
    receive_instance(push, instance(spool, 1))
    association_closed(push, 1, released=True)
    assert complete_due(push) == [] and STUDY in spool.complete
    assert push.queued == [("prefetch", [STUDY])]  # type: ignore[attr-defined]

    other = "1.2.826.0.1.3680043.8.498.79"
    receive_instance(push, instance(spool, 7, study=other, association=3))
    association_closed(push, 3, released=False)
    push.clock.t += QUIET  # type: ignore[attr-defined]

    def down(*_: object, **__: object) -> bool:
        raise ConnectionError("database is down")

    push.store.add_study = down  # type: ignore[method-assign]
    assert complete_due(push) == [] and other not in spool.complete
    assert push.arrivals.due(push.clock.now()) == []  # postponed, not lost
    assert other in push.arrivals.pending()


def test_studies_left_pending_by_a_stopped_scp_are_recovered(push: PushServices, spool: MemorySpool) -> None:
    receive_instance(push, instance(spool, 1))
    fresh = PushServices(store=push.store, spool=spool, arrivals=StudyArrivals(QUIET), clock=push.clock)
    assert recover(fresh) == [STUDY]
    fresh.clock.t = NOW - timedelta(minutes=1) + QUIET  # type: ignore[attr-defined]
    assert complete_due(fresh) == [STUDY]


# -- ingest from the spool ----------------------------------------------------------------------------------------


def test_a_pushed_study_is_ingested_from_the_spool_and_from_the_pacs_once_retention_removed_it(tmp_path: Path) -> None:
    clock = FakeClock()
    spool, pacs = MemorySpool(), FakePacs()
    svc = Services(store=FakeStore(clock), pacs=pacs, ehr=FakeEhr(), model=FakeModel, volumes_dir=tmp_path,
                   clock=clock, spool=spool)
    pushed = "1.2.826.0.1.3680043.8.498.1"  # FakePacs holds it too
    spool.series_refs[pushed] = [replace(pacs.series[0])]
    svc.store.add_study(StudyRef(pushed, "MRN1", None, NOW), SCP_SOURCE, NOW)
    assert ingest_study(svc, pushed).status == "ready"
    assert spool.retrieved == [pacs.series[0].series_uid]
    assert pacs.retrievals == 0

    row = svc.store.get_study(pushed)
    assert row is not None and row.volume_path is not None
    svc.store.clear_study_volume(pushed, row.volume_path)
    svc.store.requeue_study(pushed)
    spool.series_refs.clear()  # retention removed the spooled instances
    assert ingest_study(svc, pushed).status == "ready"
    assert pacs.retrievals == 1


# -- retention ------------------------------------------------------------------------------------------------------


def test_spooled_instances_go_once_scored_failed_or_replaced_and_old_enough() -> None:
    keep = timedelta(days=7)
    old = SpooledStudy("k", STUDY, NOW - timedelta(days=8), True, 3)
    recent = replace(old, newest=NOW - timedelta(days=6))
    study = FakeStore(FakeClock())
    study.add_study(StudyRef(STUDY, "MRN1", None, NOW), SCP_SOURCE, NOW - timedelta(days=8))
    row = study.get_study(STUDY)
    assert row is not None

    def removable(spooled: SpooledStudy, **changes: object) -> bool:
        record = replace(row, **changes)  # type: ignore[arg-type]
        return spool_removable(spooled, record, now=NOW, keep_for=keep, latest_ready_uid=STUDY, scored=False)

    ready = {"status": StudyStatus.READY}
    assert not removable(recent, **ready) and not removable(old, **ready)  # ready, not yet scored: kept
    assert spool_removable(old, replace(row, status=StudyStatus.READY), now=NOW, keep_for=keep,
                           latest_ready_uid=STUDY, scored=True)
    assert spool_removable(old, replace(row, status=StudyStatus.READY), now=NOW, keep_for=keep,
                           latest_ready_uid="1.2.3.4", scored=False)  # a newer study replaced it
    assert removable(old, status=StudyStatus.FAILED) and not removable(recent, status=StudyStatus.FAILED)
    assert not removable(old, status=StudyStatus.HELD) and not removable(old, status=StudyStatus.PROCESSING)
    assert removable(old, source="qido")
    assert spool_removable(replace(old, study_uid=None), None, now=NOW, keep_for=keep, latest_ready_uid=None,
                           scored=False)
    assert not spool_removable(replace(old, complete=False), None, now=NOW, keep_for=keep, latest_ready_uid=None,
                               scored=False)  # never registered: the SCP completes it when it runs
