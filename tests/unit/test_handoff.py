"""Hand-offs in a worker (services.handoff): inline stages run after the task's own work, in order, bounded; the
rest, anything outside a task and any run that raises, go through the queue."""

from __future__ import annotations

from typing import Any

import pytest

from integration.services.handoff import Handoff


class Recorder:
    def __init__(self) -> None:
        self.sent: list[tuple[str, list[str]]] = []
        self.ran: list[tuple[str, list[str]]] = []

    def send(self, stage: str, ids: list[str]) -> None:
        self.sent.append((stage, ids))


def chain(rec: Recorder, handoff_ref: list[Handoff]) -> dict[str, Any]:
    """vitals -> assess -> publish, each handing off to the next like the services do."""

    def vitals(svc: Any, ids: list[str]) -> None:
        rec.ran.append(("vitals", ids))
        handoff_ref[0]("assess", ids)

    def assess(svc: Any, ids: list[str]) -> None:
        rec.ran.append(("assess", ids))
        handoff_ref[0]("publish", [f"ra-{i}" for i in ids])

    def publish(svc: Any, ids: list[str]) -> None:
        rec.ran.append(("publish", ids))

    return {"vitals": vitals, "assess": assess, "publish": publish}


def make(rec: Recorder, **kw: Any) -> Handoff:
    ref: list[Handoff] = []
    handoff = Handoff(rec.send, runners=chain(rec, ref), **kw)
    ref.append(handoff)
    return handoff


def test_inside_a_task_the_next_stages_run_after_the_work_in_flow_order() -> None:
    rec = Recorder()
    handoff = make(rec, inline={"vitals", "assess", "publish"})
    with handoff.task(svc=None):  # type: ignore[arg-type]
        handoff("vitals", ["p1"])
        handoff("ingest", ["1.2.3"])  # not an inline stage: queued at once
        assert rec.ran == []  # nothing runs before the task's own work returns
    assert rec.sent == [("ingest", ["1.2.3"])]
    assert rec.ran == [("vitals", ["p1"]), ("assess", ["p1"]), ("publish", ["ra-p1"])]


def test_outside_a_task_everything_is_queued() -> None:
    rec = Recorder()
    handoff = make(rec)
    handoff("assess", ["p1"])
    handoff("publish", [])
    assert rec.sent == [("assess", ["p1"])] and rec.ran == []


def test_stages_left_out_of_inline_go_through_the_queue() -> None:
    rec = Recorder()
    handoff = make(rec, inline={"vitals"})
    with handoff.task(svc=None):  # type: ignore[arg-type]
        handoff("vitals", ["p1"])
    assert rec.ran == [("vitals", ["p1"])]
    assert rec.sent == [("assess", ["p1"])]


def test_a_run_that_raises_is_queued_and_the_rest_still_runs() -> None:
    rec = Recorder()
    ref: list[Handoff] = []
    runners = chain(rec, ref)

    def broken(svc: Any, ids: list[str]) -> None:
        raise RuntimeError("boom")

    runners["vitals"] = broken
    handoff = Handoff(rec.send, runners=runners)
    ref.append(handoff)
    with handoff.task(svc=None):  # type: ignore[arg-type]
        handoff("vitals", ["p1"])
        handoff("publish", ["ra-9"])
    assert rec.sent == [("vitals", ["p1"])]
    assert rec.ran == [("publish", ["ra-9"])]


def test_what_was_handed_off_before_the_work_raised_still_runs() -> None:
    rec = Recorder()
    handoff = make(rec)
    with pytest.raises(ValueError), handoff.task(svc=None):  # type: ignore[arg-type]
        handoff("publish", ["ra-1"])
        raise ValueError("the task's own work failed after handing off")
    assert rec.ran == [("publish", ["ra-1"])]


def test_runs_beyond_the_bound_are_queued() -> None:
    rec = Recorder()
    handoff = make(rec, max_inline=2)
    with handoff.task(svc=None):  # type: ignore[arg-type]
        handoff("vitals", ["p1"])
        handoff("vitals", ["p2"])
    assert [r[0] for r in rec.ran] == ["vitals", "vitals"]
    assert rec.sent == [("assess", ["p1"]), ("assess", ["p2"])]


def test_nested_tasks_leave_the_running_to_the_outer_one() -> None:
    rec = Recorder()
    handoff = make(rec)
    with handoff.task(svc=None):  # type: ignore[arg-type]
        with handoff.task(svc=None):  # type: ignore[arg-type]
            handoff("publish", ["ra-1"])
        assert rec.ran == []
    assert rec.ran == [("publish", ["ra-1"])]


def test_unknown_inline_stages_are_refused() -> None:
    with pytest.raises(ValueError, match="cannot run on"):
        Handoff(lambda stage, ids: None, inline={"ingest"})
