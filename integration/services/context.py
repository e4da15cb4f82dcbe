"""What every service function needs, built once by integration.bootstrap (fakes in unit tests)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from integration.domain.limits import ImageLimits
from integration.domain.policy import RiskPolicy
from integration.domain.results import ResultsPolicy
from integration.domain.series import SeriesRules
from integration.ports import ChangeFeed, Clock, Ehr, Pacs, ResultsArchive, RiskModel, SourceImages, Store


class SystemClock:
    def now(self) -> datetime:
        return datetime.now(UTC)


@dataclass
class Services:
    store: Store
    pacs: Pacs
    ehr: Ehr
    model: Callable[[], RiskModel]  # lazily built: workers that never assess never load the model
    volumes_dir: Path
    policy: RiskPolicy = field(default_factory=RiskPolicy)
    rules: SeriesRules = field(default_factory=SeriesRules)
    feed: ChangeFeed | None = None
    clock: Clock = field(default_factory=SystemClock)
    #: Monotonic seconds, for the stage durations (``services.timing``); a fake in unit tests.
    timer: Callable[[], float] = time.perf_counter
    identifier_system_for: Callable[[str | None], str | None] = lambda issuer: None
    assessment_identifier_system: str = "urn:strokewatch:risk-assessment"
    lookback_hours: float = 24.0
    #: Modality clocks run fast: detection looks this far past now as well.
    clock_skew_s: float = 900.0
    #: Orthanc feed on first start: replay the whole change log (True) or lookback window + feed end (False).
    changes_from_beginning: bool = False
    #: Orthanc feed: how often the lookback window is also read by QIDO-RS for studies whose StableStudy event
    #: was lost (a PACS restart); 0 turns it off.
    feed_reconcile_s: float = 300.0
    retry_backoff_s: float = 5.0
    held_retry_s: float = 60.0
    max_retries: int = 8
    #: Name the inputs that drove each score (occlusion through the served model) in the RiskAssessment note.
    explain: bool = True
    #: Device id in the EHR per model version (filled on first publish).
    device_ids: dict[str, str] = field(default_factory=dict)
    #: The one way follow-up work reaches the next stage: called with (stage, ids) by the services (never by
    #: routes or tasks); the worker and the API wire Celery here. Ids only; an empty list is a no-op.
    enqueue: Callable[[str, list[str]], None] = lambda stage, ids: None
    #: Reaper: claims older than this are considered dead and released.
    stale_claim_s: float = 600.0
    #: Claims lost to dying workers before the work is failed as ``worker_lost`` (an operator replays it).
    max_lost_claims: int = 3
    #: What the sweep and the EHR poll enqueue is not due again for this long (its message is in the queue; a
    #: lost one is re-sent after it): longer than a queued message normally waits.
    redeliver_after_s: float = 120.0
    #: Sizes of series and images (checked before a series is retrieved, and by the PACS adapter while it is).
    limits: ImageLimits = field(default_factory=ImageLimits)
    #: The C-STORE spool read as a PACS: studies registered by the SCP (source "scp") are ingested from it.
    spool: Pacs | None = None
    #: The same spool, read whole: the source instances of a pushed study for the results written to the PACS.
    spooled_sources: SourceImages | None = None
    #: Exceptions that interrupt a task from outside (the worker's soft time limit): the work is retried later
    #: (``timed_out``, retryable), not failed as a crash. The worker fills it in; empty elsewhere.
    interruptions: tuple[type[BaseException], ...] = ()
    #: The sweep keeps a copy of the stage histogram this often (seconds), at most ``latency_snapshots_kept`` of
    #: them: the dashboard's latency percentiles over time (``domain.latency``).
    latency_snapshot_s: float = 60.0
    latency_snapshots_kept: int = 1440
    #: Results written back to the source PACS (DICOM SR + heat-map series): where, and when (``services.results``).
    archive: ResultsArchive | None = None
    results: ResultsPolicy = field(default_factory=ResultsPolicy)
    #: A FHIR Flag on the patient while the latest score is at or above ``policy.alert_at_or_above``
    #: (``services.alerts``).
    alert_flags: bool = True
