"""Use case on a timer (and ``strokewatch db prune``): delete, table by table, what the engine no longer needs.

What stays is decided in ``domain.retention``: nothing a current assessment or a re-scoring reads is removed.
Every delete runs in bounded transactions (``RetentionPolicy.batch_size`` rows), so a first prune after months
never holds a lock for long, and a dry run counts the same rows without deleting them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from integration.domain.records import StudyRecord
from integration.domain.retention import RetentionPolicy, spool_removable, volume_removable
from integration.domain.window import WINDOW
from integration.ports import BrokerMessages, Clock, Spool, Store

log = logging.getLogger(__name__)

#: What a prune reports on, in this order.
TABLES = ("vitals", "failures", "assessments", "volumes", "spool", "broker_messages")


@dataclass(frozen=True)
class Housekeeping:
    """What a prune needs (built by ``integration.bootstrap.open_housekeeping``)."""

    store: Store
    volumes_dir: Path
    policy: RetentionPolicy
    clock: Clock
    #: The embedded broker's message table; None with Redis/RabbitMQ (they delete what was acknowledged).
    broker: BrokerMessages | None = None
    #: The C-STORE spool (instances pushed to the SCP); None when there is none.
    spool: Spool | None = None


@dataclass(frozen=True)
class PruneReport:
    dry_run: bool
    #: Rows (files, for volumes) removed, or that would be removed in a dry run, per table.
    removed: dict[str, int]


def prune(hk: Housekeeping, *, dry_run: bool = False) -> PruneReport:
    """Apply the retention policy once: old vitals outside any current window, long-resolved failures, long-
    superseded assessments, volumes no scoring will read again, and messages the embedded broker delivered."""
    now, p = hk.clock.now(), hk.policy
    removed = {
        "vitals": hk.store.prune_vitals(now - p.vitals, WINDOW, p.batch_size, dry_run=dry_run),
        "failures": hk.store.prune_resolved_failures(now - p.resolved_failures, p.batch_size, dry_run=dry_run),
        "assessments": hk.store.prune_superseded_assessments(
            now - p.superseded_assessments, p.batch_size, dry_run=dry_run
        ),
        "volumes": _prune_volumes(hk, now, dry_run),
        "spool": _prune_spool(hk, now, dry_run),
        "broker_messages": (
            hk.broker.delete_delivered(now - p.broker_messages, p.batch_size, dry_run=dry_run) if hk.broker else 0
        ),
    }
    log.info("%s: %s", "would prune" if dry_run else "pruned", ", ".join(f"{k} {v}" for k, v in removed.items()))
    return PruneReport(dry_run, removed)


def _prune_volumes(hk: Housekeeping, now: datetime, dry_run: bool) -> int:
    keep_for, batch = hk.policy.volumes, hk.policy.batch_size
    removed, after = 0, ""
    patients: dict[str, tuple[str | None, bool, datetime | None]] = {}
    while True:
        studies = hk.store.studies_with_volumes(now - keep_for, after, batch)
        for study in studies:
            latest_uid, scored, last_vital = _patient_state(hk, study, now, patients)
            if not volume_removable(
                study, now=now, keep_for=keep_for, latest_ready_uid=latest_uid, scored=scored, last_vital_at=last_vital
            ):
                continue
            if dry_run or _remove_volume(hk, study):
                removed += 1
        if len(studies) < batch:
            break
        after = studies[-1].study_uid
    return removed + _remove_leftovers(hk.volumes_dir, now - keep_for, dry_run)


def _prune_spool(hk: Housekeeping, now: datetime, dry_run: bool) -> int:
    """Instance files of pushed studies no ingest will read again (``domain.retention.spool_removable``), and
    writes that a killed SCP left half done."""
    if hk.spool is None:
        return 0
    keep_for = hk.policy.spool
    removed = 0
    patients: dict[str, tuple[str | None, bool, datetime | None]] = {}
    for spooled in hk.spool.studies():
        study = hk.store.get_study(spooled.study_uid) if spooled.study_uid else None
        latest_uid, scored = None, False
        if study is not None and study.patient_fhir_id is not None:
            latest_uid, latest_scored, _ = _patient_state(hk, study, now, patients)
            scored = latest_scored and latest_uid == study.study_uid
        if spool_removable(spooled, study, now=now, keep_for=keep_for, latest_ready_uid=latest_uid, scored=scored):
            removed += hk.spool.remove(spooled.key, now - keep_for, dry_run=dry_run)
    return removed + hk.spool.remove_partial(now - timedelta(hours=1), dry_run=dry_run)


def _patient_state(
    hk: Housekeeping, study: StudyRecord, now: datetime, seen: dict[str, tuple[str | None, bool, datetime | None]]
) -> tuple[str | None, bool, datetime | None]:
    """(the patient's latest ready study, whether that study was scored, the patient's newest vital), cached."""
    pid = study.patient_fhir_id
    if pid is None:
        return None, False, None
    if pid not in seen:
        latest = hk.store.latest_ready_study(pid)
        current = hk.store.latest_assessment(pid)
        scored = latest is not None and current is not None and current.study_uid == latest.study_uid
        seen[pid] = (latest.study_uid if latest else None, scored, hk.store.latest_vital_time(pid, now))
    return seen[pid]


def _remove_volume(hk: Housekeeping, study: StudyRecord) -> bool:
    """Forget the file in the database first (an ingest then rebuilds it), then delete it. Only files inside
    the volumes folder: a path from the database never deletes anything else."""
    assert study.volume_path is not None
    path = Path(study.volume_path)
    inside = path.suffix == ".npy" and path.resolve().parent == hk.volumes_dir.resolve()
    if not inside:
        log.warning("study %s names a volume outside %s; left alone", study.study_uid, hk.volumes_dir)
        return False
    if not hk.store.clear_study_volume(study.study_uid, study.volume_path):
        return False  # claimed or changed meanwhile
    path.unlink(missing_ok=True)
    return True


def _remove_leftovers(volumes_dir: Path, before: datetime, dry_run: bool) -> int:
    """Half-written volumes (``*.tmp.npy``) of attempts that died before the atomic rename."""
    if not volumes_dir.is_dir():
        return 0
    n = 0
    for tmp in volumes_dir.glob("*.tmp.npy"):
        try:
            if tmp.stat().st_mtime < before.timestamp():
                if not dry_run:
                    tmp.unlink(missing_ok=True)
                n += 1
        except FileNotFoundError:
            continue
    return n
