"""Studies pushed by DICOM C-STORE: what a received instance is, what the SCP answers, and when a study is complete.

Pure: no I/O, no clocks of its own (times are passed in). The SCP entrypoint feeds ``StudyArrivals`` with
arrivals and association ends; ``due`` says which studies are complete.

The completion rule (README "DICOM push"): a study is complete once no association that brought instances of it is
still open, and
- at once when the last of them was *released* by a sender that sends a study over one association, or
- ``quiet_period`` after its last instance otherwise: an association that was aborted or dropped, an SCP that was
  restarted (instances found in the spool), or a sender listed as one that uses one association per series.
An instance that arrives after completion reopens the study (it is completed again, and ingested again).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import IntEnum

#: ``Study.source`` of a study registered by the C-STORE SCP: its ingest reads the spool, not the PACS.
SCP_SOURCE = "scp"


class StoreStatus(IntEnum):
    """C-STORE response statuses (PS3.4 B.2.3, PS3.7 C)."""

    SUCCESS = 0x0000
    OUT_OF_RESOURCES = 0xA700  # refused: too large for the limits, disk full, spool unwritable
    DATASET_MISMATCH = 0xA900  # error: the data set does not match the SOP class / the command's UIDs
    CANNOT_UNDERSTAND = 0xC000  # error: unreadable data set, or a UID that is not one


@dataclass(frozen=True)
class ReceivedInstance:
    """One C-STORE request as the SCP received it: the command's facts and the encoded data set (not decoded).

    ``dataset`` is the data set exactly as sent, in ``transfer_syntax`` (no file meta information). It may be a view
    of the network buffer: valid only while the request is handled."""

    calling_aet: str
    association: int  # identifies the association within this SCP process
    sop_class_uid: str  # (0000,0002) Affected SOP Class UID
    sop_instance_uid: str  # (0000,1000) Affected SOP Instance UID
    transfer_syntax: str  # of the accepted presentation context
    dataset: bytes | memoryview


@dataclass(frozen=True)
class InstanceHeader:
    """What the SCP reads from a received data set's header before it keeps it (never the pixels)."""

    study_uid: str
    series_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    rows: int | None = None
    columns: int | None = None
    frames: int = 1


@dataclass(frozen=True)
class SpooledStudy:
    """A study as the spool holds it. ``key`` names it there (derived from the UID, never the UID itself);
    ``study_uid`` is None when no instance of it can be read any more."""

    key: str
    study_uid: str | None
    newest: datetime  # when its newest instance was written
    complete: bool  # completed and registered (an instance arriving later reopens it)
    files: int = 0


@dataclass(frozen=True)
class StoreResult:
    """The answer to one C-STORE: a status and, for a refusal, why (the response's Error Comment, at most 64
    characters, no PHI)."""

    status: StoreStatus
    comment: str = ""
    stored: bool = False  # a new instance was kept (False: a duplicate, a discarded non-image, or refused)

    @property
    def ok(self) -> bool:
        return self.status is StoreStatus.SUCCESS


@dataclass
class _Pending:
    last_arrival: datetime
    generation: int = 0
    open: set[int] = field(default_factory=set)
    complete_at: datetime | None = None  # set once no association of it is open
    completed_at: datetime | None = None  # when it became complete (kept while its completion is retried)


class StudyArrivals:
    """Which pushed studies are complete (see the module docstring). Not thread-safe: callers serialise.

    ``generation`` counts arrivals per study: a completion that started before an arrival must not mark the study
    complete (``completed`` checks the generation it began with)."""

    def __init__(self, quiet_period: timedelta, per_series_senders: frozenset[str] = frozenset()) -> None:
        if quiet_period < timedelta(0):
            raise ValueError("quiet_period must not be negative")
        self.quiet_period = quiet_period
        self.per_series_senders = per_series_senders
        self._studies: dict[str, _Pending] = {}
        self._associations: dict[int, tuple[str, set[str]]] = {}  # association -> (calling AE, studies it brought)

    def arriving(self, study_uid: str, association: int, sender: str, now: datetime) -> bool:
        """An instance of ``study_uid`` is being received on ``association`` (call before it is written). True when
        the study was not pending before (its first instance since it last completed, or since the start)."""
        pending = self._studies.get(study_uid)
        first = pending is None
        if pending is None:
            pending = self._studies[study_uid] = _Pending(last_arrival=now)
        pending.generation += 1
        pending.last_arrival = max(pending.last_arrival, now)
        pending.open.add(association)
        pending.complete_at = pending.completed_at = None
        self._associations.setdefault(association, (sender, set()))[1].add(study_uid)
        return first

    def association_closed(self, association: int, *, released: bool, now: datetime) -> list[str]:
        """The association ended (released, or not). Returns the studies it brought that no association holds open
        any more."""
        sender, studies = self._associations.pop(association, ("", set()))
        at_once = released and sender not in self.per_series_senders
        closed: list[str] = []
        for uid in sorted(studies):
            pending = self._studies.get(uid)
            if pending is None:
                continue
            pending.open.discard(association)
            if pending.open:
                continue
            pending.complete_at = pending.completed_at = now if at_once else pending.last_arrival + self.quiet_period
            closed.append(uid)
        return closed

    def recovered(self, study_uid: str, last_arrival: datetime) -> None:
        """A study found in the spool at start-up, not yet complete: its senders are gone, so the quiet period
        after its last instance decides (an instance arriving meanwhile takes over)."""
        if study_uid not in self._studies:
            complete_at = last_arrival + self.quiet_period
            self._studies[study_uid] = _Pending(last_arrival=last_arrival, complete_at=complete_at,
                                                completed_at=complete_at)

    def due(self, now: datetime) -> list[str]:
        """Studies complete at ``now``, oldest first."""
        ready = [(p.complete_at, uid) for uid, p in self._studies.items()
                 if not p.open and p.complete_at is not None and p.complete_at <= now]
        return [uid for _, uid in sorted(ready)]

    def take_due(self, now: datetime) -> list[str]:
        """``due``, taken for completion: each is handed out once (a concurrent caller does not get it again) until
        ``postpone`` puts it back or an association ends with it anew."""
        taken = self.due(now)
        for uid in taken:
            self._studies[uid].complete_at = None
        return taken

    def completed_since(self, study_uid: str) -> datetime | None:
        """When the study became complete (its association's release, or the end of its quiet period); None when it
        is not complete, or not pending."""
        pending = self._studies.get(study_uid)
        return pending.completed_at if pending is not None else None

    def generation(self, study_uid: str) -> int | None:
        pending = self._studies.get(study_uid)
        return pending.generation if pending is not None else None

    def completed(self, study_uid: str, generation: int | None) -> bool:
        """Forget the study if nothing arrived since ``generation`` was read; False (kept pending) otherwise."""
        pending = self._studies.get(study_uid)
        if pending is None:
            return True
        if pending.generation != generation:
            return False
        del self._studies[study_uid]
        return True

    def postpone(self, study_uid: str, until: datetime) -> None:
        """Completion failed (the database is down, the study is being ingested): try again at ``until``."""
        pending = self._studies.get(study_uid)
        if pending is not None and not pending.open:
            pending.complete_at = until

    def pending(self) -> list[str]:
        return sorted(self._studies)

    def open_associations(self) -> int:
        return len(self._associations)
