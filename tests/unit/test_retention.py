"""Retention over the fakes: which volumes a re-scoring still needs, the prune service table by table, and the
log files kept to a size. Every time is relative to the fake clock's ``now``."""

from __future__ import annotations

import os
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import pytest

from integration.domain.records import BuiltVolume, NewAssessment, StudyRecord, StudyStatus
from integration.domain.retention import RetentionPolicy, volume_removable
from integration.domain.types import Outcome, StudyRef, VitalValue
from integration.entrypoints.logfiles import rotate_if_large, rotate_logs
from integration.services.retention import TABLES, Housekeeping, prune
from tests.unit.fakes import NOW, FakeClock, FakeStore

DAY = timedelta(days=1)


def record(status: StudyStatus, seen_days_ago: float, uid: str = "1.1") -> StudyRecord:
    return StudyRecord(uid, "MRN", None, None, "qido", status, NOW - seen_days_ago * DAY, volume_path=f"/v/{uid}.npy")


@pytest.mark.parametrize(
    ("status", "seen", "latest", "scored", "last_vital", "removable"),
    [
        (StudyStatus.READY, 3, "2.2", True, None, False),  # younger than the 7 days: stays
        (StudyStatus.READY, 10, "2.2", False, None, True),  # a newer study replaced it
        (StudyStatus.FAILED, 10, None, False, None, True),  # an operator's retry rebuilds it
        (StudyStatus.HELD, 60, None, False, None, False),  # waiting for its Patient: will be read
        (StudyStatus.READY, 60, "1.1", True, 50, True),  # latest, scored, past the window, patient quiet
        (StudyStatus.READY, 60, "1.1", True, 2, False),  # latest, but new vitals keep coming: re-scored
        (StudyStatus.READY, 60, "1.1", False, 50, False),  # latest and never scored yet
        (StudyStatus.READY, 20, "1.1", True, 15, False),  # latest, inside the 28-day vitals window
    ],
)
def test_a_volume_goes_only_when_no_scoring_will_read_it(
    status: StudyStatus, seen: float, latest: str | None, scored: bool, last_vital: float | None, removable: bool
) -> None:
    vital = NOW - last_vital * DAY if last_vital is not None else None
    got = volume_removable(
        record(status, seen), now=NOW, keep_for=7 * DAY, latest_ready_uid=latest, scored=scored, last_vital_at=vital
    )
    assert got is removable


class World:
    """Patients and studies seen at various ages, each ready study with a real volume file."""

    def __init__(self, tmp: Path) -> None:
        self.clock = FakeClock(NOW)
        self.store = FakeStore(self.clock)
        self.volumes = tmp / "volumes"
        self.volumes.mkdir()
        self.hk = Housekeeping(self.store, self.volumes, RetentionPolicy(batch_size=2), self.clock)

    def study(self, uid: str, pid: str, seen_days_ago: float, status: StudyStatus = StudyStatus.READY) -> Path:
        seen = NOW - seen_days_ago * DAY
        self.store.add_study(StudyRef(uid, pid, None, seen - timedelta(minutes=5)), "qido", seen)
        self.store.claim_study(uid, seen)
        path = self.volumes / f"{uid}.npy"
        np.save(path, np.zeros((2, 2), dtype=np.float32))
        self.store.set_study_volume(uid, BuiltVolume(str(path), "ab" * 32, uid + ".9", "CT"))
        if status is StudyStatus.READY:
            self.store.set_study_ready(uid, pid)
        else:
            self.store.set_study_outcome(uid, status, Outcome.UNMATCHED_PATIENT, "x", None)
        return path

    def scored(self, pid: str, uid: str, window_end: datetime, supersedes: str | None = None) -> str:
        ident = f"a-{pid}-{uid}-{window_end:%j%H}"
        self.store.add_assessment(
            NewAssessment(ident, pid, uid, window_end, "1", "fake", True, 0.3, "moderate", "f" * 64, 1, {}, supersedes)
        )
        return ident

    def vital(self, pid: str, days_ago: float) -> None:
        self.store.upsert_patient(pid, None, None)
        self.store.replace_vitals(pid, [VitalValue("hr", 70.0, NOW - days_ago * DAY, f"{pid}-{days_ago}")], [])


def test_prune_removes_what_nothing_needs_and_keeps_what_a_rescoring_reads(tmp_path: Path) -> None:
    w = World(tmp_path)
    # patient a: an old study replaced by a newer one, which is scored and whose patient is still active
    old_a = w.study("1.1", "a", 30)
    new_a = w.study("1.2", "a", 20)
    w.scored("a", "1.2", NOW - 20 * DAY)
    w.vital("a", 1)
    # patient b: one scored study 60 days ago, nothing since 50 days: its volume goes (rebuilt if ever needed)
    quiet_b = w.study("2.1", "b", 60)
    w.scored("b", "2.1", NOW - 50 * DAY)
    w.vital("b", 50)
    # patient c: scored 10 days ago: inside the vitals window, kept
    recent_c = w.study("3.1", "c", 10)
    w.scored("c", "3.1", NOW - 10 * DAY)
    failed = w.study("4.1", "d", 10, StudyStatus.FAILED)
    held = w.study("5.1", "e", 60, StudyStatus.HELD)
    young = w.study("6.1", "g", 2)  # seen two days ago: kept whatever its state
    leftover = w.volumes / "7.1.tmp.npy"
    leftover.write_bytes(b"half a volume")
    os.utime(leftover, (NOW.timestamp() - 30 * 86400,) * 2)
    # vitals: patient b's current window is kept; a's vital 500 days ago goes
    w.vital("a", 500)
    # failures and assessments
    w.store.record_failure("ingest", "9.1", Outcome.PACS_UNAVAILABLE, "down", True)
    w.store.resolve_failures("ingest", "9.1", NOW - 100 * DAY)
    w.store.record_failure("ingest", "9.2", Outcome.PACS_UNAVAILABLE, "down", True)
    w.store.resolve_failures("ingest", "9.2", NOW - 10 * DAY)
    w.clock.t = NOW - 400 * DAY  # an assessment scored 400 days ago, then superseded
    first = w.scored("c", "3.0", NOW - 401 * DAY)
    w.clock.t = NOW
    w.scored("c", "3.1", NOW - 9 * DAY, supersedes=first)

    dry = prune(w.hk, dry_run=True)
    assert dry.dry_run and all(p.exists() for p in (old_a, quiet_b, failed, leftover))
    report = prune(w.hk)
    assert report.removed == dry.removed
    assert list(report.removed) == list(TABLES)
    assert report.removed == {"vitals": 1, "failures": 1, "assessments": 1, "volumes": 4, "spool": 0,
                              "broker_messages": 0}
    assert not old_a.exists() and not quiet_b.exists() and not failed.exists() and not leftover.exists()
    assert new_a.exists() and recent_c.exists() and held.exists() and young.exists()
    assert w.store.get_study("1.1").volume_path is None  # type: ignore[union-attr]  # an ingest rebuilds it
    assert w.store.get_study("1.2").volume_path == str(new_a)  # type: ignore[union-attr]
    assert w.store.get_assessment(first) is None
    assert prune(w.hk).removed == dict.fromkeys(TABLES, 0)  # nothing left to do


def test_a_volume_path_outside_the_volumes_folder_is_never_deleted(tmp_path: Path) -> None:
    w = World(tmp_path)
    outside = tmp_path / "elsewhere.npy"
    np.save(outside, np.zeros(1))
    w.store.add_study(StudyRef("8.1", "f", None, NOW - 30 * DAY), "qido", NOW - 30 * DAY)
    w.store.claim_study("8.1", NOW)
    w.store.set_study_volume("8.1", BuiltVolume(str(outside), "ab" * 32, "8.1.9", "CT"))
    w.store.set_study_outcome("8.1", StudyStatus.FAILED, Outcome.NO_ELIGIBLE_SERIES, "x", None)
    assert prune(w.hk).removed["volumes"] == 0
    assert outside.exists() and w.store.get_study("8.1").volume_path == str(outside)  # type: ignore[union-attr]


def test_a_log_beyond_its_size_is_copied_aside_and_truncated_under_its_writer(tmp_path: Path) -> None:
    log = tmp_path / "worker.log"
    writer = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)  # as processes._spawn hands it over
    try:
        for generation in range(4):
            os.write(writer, f"gen{generation} ".encode() * 100)
            assert rotate_if_large(log, max_bytes=100, backups=2)
            assert log.stat().st_size == 0
        os.write(writer, b"after")
        assert log.read_bytes() == b"after"  # the writer's next line lands at the new start, no hole
        assert not rotate_if_large(log, max_bytes=100, backups=2)
    finally:
        os.close(writer)
    assert (tmp_path / "worker.log.1").read_bytes().startswith(b"gen3 ")
    assert (tmp_path / "worker.log.2").read_bytes().startswith(b"gen2 ")
    assert not (tmp_path / "worker.log.3").exists()  # two backups kept
    assert (tmp_path / "worker.log.1").stat().st_mode & 0o077 == 0
    (tmp_path / "api.log").write_bytes(b"x" * 500)
    (tmp_path / "small.log").write_bytes(b"x")
    assert rotate_logs(tmp_path, 100, 0) == ["api.log"]
    assert (tmp_path / "api.log").stat().st_size == 0 and not (tmp_path / "api.log.1").exists()
    assert rotate_logs(tmp_path / "missing", 100, 1) == []


def test_the_beat_prunes_daily_and_checks_the_log_sizes_every_minute_by_default(tmp_path: Path) -> None:
    from integration.config import Settings
    from integration.entrypoints.worker import app, celery_config

    beat = celery_config(Settings(data_dir=tmp_path))["beat_schedule"]
    assert beat["prune"] == {"task": "strokewatch.prune", "schedule": timedelta(hours=24)}
    assert beat["rotate-logs"] == {"task": "strokewatch.rotate_logs", "schedule": timedelta(seconds=60)}
    assert {"strokewatch.prune", "strokewatch.rotate_logs"} <= set(app.tasks)
