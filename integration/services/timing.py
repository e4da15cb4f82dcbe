"""Stage durations of one task, timed with the Services' monotonic timer and written once at the task's end.

Recording a timing never fails the work: a database error is logged and the observations are dropped.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import ParamSpec, TypeVar

from integration.domain import stages
from integration.domain.redact import describe_exception
from integration.ports import Store

log = logging.getLogger(__name__)

P = ParamSpec("P")
R = TypeVar("R")


class StageTimes:
    """One task's observations (``domain.stages``). A stage is recorded only when it completes."""

    def __init__(self, timer: Callable[[], float]) -> None:
        self.timer = timer
        self.observations: list[stages.Observation] = []

    def add(self, stage: str, seconds: float) -> None:
        self.observations.append((stage, seconds))

    def since(self, stage: str, started: float) -> None:
        """Record ``stage`` as lasting from ``started`` (a reading of ``timer``) until now."""
        self.add(stage, self.timer() - started)

    def timed(self, stage: str, call: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
        """``call(*args, **kwargs)`` recorded as ``stage``. Parts the adapter reports from inside it
        (``stages.report``) are recorded under their own stage and taken out of this one."""
        parts: list[stages.Observation] = []
        started = self.timer()
        with stages.reporting(lambda part, seconds: parts.append((part, seconds))):
            result = call(*args, **kwargs)
        elapsed = self.timer() - started
        self.observations += parts
        self.add(stage, elapsed - sum(seconds for _, seconds in parts))
        return result

    def flush(self, store: Store) -> None:
        """Write what was recorded (one statement) and forget it."""
        observations, self.observations = self.observations, []
        record(store, observations)


def record(store: Store, observations: Sequence[stages.Observation]) -> None:
    """Add ``observations`` to the shared histogram; a failure is logged, never raised (the work goes on)."""
    if not observations:
        return
    try:
        store.observe_stages(observations)
    except Exception as exc:  # the database is down or locked: a timing is not worth failing the work for
        log.warning("stage timings dropped (%d): %s", len(observations), describe_exception(exc, []))


def end_to_end(store: Store, study_uid: str, written: datetime) -> list[stages.Observation]:
    """The study's end-to-end time if this is the first RiskAssessment based on it (``Store.mark_study_published``):
    counted once per study, not for a republish, a re-scoring on new vitals or a re-sent study, whichever worker
    writes it. A database error is logged and nothing is counted."""
    try:
        completed = store.mark_study_published(study_uid, written)
    except Exception as exc:  # the RiskAssessment is written: a timing must not turn that into a failure
        log.warning("end-to-end time of a study dropped: %s", describe_exception(exc, []))
        return []
    return [] if completed is None else [(stages.END_TO_END, (written - completed).total_seconds())]
