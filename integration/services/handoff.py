"""Hand-offs between stages: through the queue, or on in the same task when a hop buys nothing.

A task that has just made a study ready holds everything the next stages need (its patient matched, the model
loaded in this process): sending the vitals sync, the assessment and the publish through the broker costs a hop
each, and the next worker to pick them up does nothing this one could not. ``Handoff`` is the Services' ``enqueue``
in a worker: inside a task, the stages named in ``inline`` are kept and run after the task's own work, in this
process, depth first (ingest -> vitals -> assess -> publish); anything else, anything beyond ``max_inline`` runs
of one task, and any run that raises goes through the queue as before. Outside a task (the API, the SCP, beat's
sweep) everything is queued.

Nothing is lost by running on: every stage claims its work in the database (the vitals lease, the patient's and
the assessment's claims) exactly as when it arrives by the queue, so a worker killed mid-way leaves work the sweep
sends again once its lease runs out. Batching is kept: the assessment takes other due patients into its model
call (``assess_batch``).
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress

from integration.domain.redact import describe_exception
from integration.domain.types import DomainError
from integration.services.context import Services

log = logging.getLogger(__name__)

Send = Callable[[str, list[str]], None]
#: The stages that can run on, in the order work flows.
INLINE_STAGES: tuple[str, ...] = ("vitals", "assess", "publish")


def _run_vitals(svc: Services, ids: list[str]) -> None:
    from integration.services.vitals import sync_vitals

    for pid in ids:
        with suppress(DomainError):  # recorded by the service (backoff, failure row); the sweep retries it
            sync_vitals(svc, pid)


def _run_assess(svc: Services, ids: list[str]) -> None:
    from integration.services.assess import assess_batch

    assess_batch(svc, ids)


def _run_publish(svc: Services, ids: list[str]) -> None:
    from integration.services.assess import publish

    for identifier in ids:
        publish(svc, identifier)


RUNNERS: dict[str, Callable[[Services, list[str]], None]] = {
    "vitals": _run_vitals, "assess": _run_assess, "publish": _run_publish,
}


class Handoff:
    """``Services.enqueue`` for a worker process (see the module's notes). Not shared between threads: a prefork
    worker runs one task at a time per process."""

    def __init__(self, send: Send, inline: frozenset[str] | set[str] = frozenset(INLINE_STAGES),
                 max_inline: int = 64, runners: dict[str, Callable[[Services, list[str]], None]] | None = None) -> None:
        self.runners = RUNNERS if runners is None else runners
        unknown = set(inline) - set(self.runners)
        if unknown:
            raise ValueError(f"stages that cannot run on in a task: {sorted(unknown)} (only {list(INLINE_STAGES)})")
        self.send = send
        self.inline = frozenset(inline)
        self.max_inline = max_inline
        self._pending: deque[tuple[str, list[str]]] | None = None

    def __call__(self, stage: str, ids: list[str]) -> None:
        if not ids:
            return
        if self._pending is not None and stage in self.inline:
            self._pending.append((stage, list(ids)))
        else:
            self.send(stage, ids)

    @contextmanager
    def task(self, svc: Services) -> Iterator[None]:
        """Around one task's work: what it hands to an inline stage runs when the work returns (also after it
        raised: what it handed off before is real work), the rest is sent at once. Re-entrant: a nested use is a
        no-op (the outer one runs everything)."""
        if self._pending is not None:
            yield
            return
        self._pending = deque()
        try:
            yield
        finally:
            try:
                self._drain(svc)
            finally:
                self._pending = None

    def _drain(self, svc: Services) -> None:
        assert self._pending is not None
        runs = 0
        while self._pending:
            stage, ids = self._pending.popleft()
            if runs >= self.max_inline:
                self.send(stage, ids)  # a long chain (a batch fanning out) goes back to the queue
                continue
            runs += 1
            try:
                self.runners[stage](svc, ids)
            except Exception as exc:  # a bug, the soft time limit: the stage's own claim/lease makes the queue safe
                log.warning("running %s on in the task failed (%s); queued instead",
                            stage, describe_exception(exc, []))
                self.send(stage, ids)
