"""The dashboard's pure parts: latency percentiles over time from histogram copies, the drivers a note names, the
session cookie and CSRF token, which routes need which credential, and the server-drawn picture."""

from __future__ import annotations

import math
import struct
import zlib
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest

from inference import contract as C
from integration.config import Settings
from integration.domain import latency, stages
from integration.domain.assessment import AssessmentFacts, note_text
from integration.domain.drivers import drivers_in_note
from integration.domain.types import StudyRef
from integration.entrypoints.api.security.dashboard import DashboardAuth, session_key
from integration.entrypoints.api.security.policy import Access, Principal, Role, required_access
from integration.services.context import Services
from integration.services.picture import encode_png, key_slice, render
from integration.services.sweep import sweep
from tests.unit.fakes import NOW, FakeClock, FakeEhr, FakeModel, FakePacs, FakeStore

T0 = datetime(2026, 3, 29, 0, 30, tzinfo=UTC)  # a DST change in Europe: the series are in UTC seconds


def snapshot(minutes: int, observations: list[tuple[str, float]]) -> latency.StageSnapshot:
    rows = stages.fold(observations)
    return latency.StageSnapshot(T0 + timedelta(minutes=minutes), tuple(stages.histograms(rows)))


def test_percentiles_are_those_of_each_interval_with_gaps_where_nothing_ran() -> None:
    fast = [("model", 0.02)] * 10
    slow = fast + [("model", 2.5)] * 10
    snaps = [snapshot(0, []), snapshot(1, fast), snapshot(2, fast), snapshot(3, slow)]
    model = next(s for s in latency.series(snaps) if s.stage == "model")
    assert model.times == [(T0 + timedelta(minutes=m)).timestamp() for m in (1, 2, 3)]
    assert model.counts == [10, 0, 10]
    p50 = model.percentiles[0.5]
    assert p50[0] is not None and 0.01 < p50[0] <= 0.025  # only the fast passes in the first minute
    assert p50[1] is None  # nothing ran: a gap, not a zero
    assert p50[2] is not None and 2.0 < p50[2] <= 3.0  # only the slow ones in the last: not diluted by the past
    assert next(s for s in latency.series(snaps) if s.stage == "publish").counts == [0, 0, 0]


def test_a_counter_reset_starts_afresh_and_snapshots_round_trip() -> None:
    snaps = [snapshot(0, [("vitals", 0.3)] * 4), snapshot(1, [("vitals", 0.04)])]  # the table was emptied
    vitals = next(s for s in latency.series(snaps) if s.stage == "vitals")
    assert vitals.counts == [1] and vitals.percentiles[0.95][0] is not None and vitals.percentiles[0.95][0] <= 0.05
    h = snaps[0].histograms[stages.STAGES.index("vitals")]
    assert latency.from_json("vitals", latency.to_json(h)) == h
    assert latency.from_json("vitals", {"counts": [1, 2], "sum": 0.1}) is None  # other bucket bounds: skipped
    assert latency.from_json("vitals", "garbage") is None


def test_drivers_are_read_back_from_the_note_they_were_written_to() -> None:
    drivers = ["systolic blood pressure history (+13 points)", "brain imaging findings lowered it (-24 points)"]
    facts = AssessmentFacts("urn:x", "id", "p", T0, 0.2, "0.6.0", True, "onnxruntime", "1.2", "CT", ["o1"],
                            drivers=drivers)
    assert drivers_in_note(note_text(facts)) == drivers
    assert drivers_in_note(note_text(AssessmentFacts("urn:x", "id", "p", T0, 0.2, "0.6.0", True, "onnxruntime",
                                                     None, None, []))) == []


def auth(tmp_path: Path, **values: object) -> DashboardAuth:
    settings = Settings.model_validate({"data_dir": tmp_path, **values})
    return DashboardAuth.from_settings(settings, loopback=True)


def test_session_cookies_are_signed_expire_and_survive_a_restart(tmp_path: Path) -> None:
    a = auth(tmp_path)
    operator = Principal("key:ops", "api-key", frozenset({Role.READ, Role.OPERATE}))
    cookie = a.issue(operator, now=1000.0)
    back = a.principal(cookie, now=1000.0 + 8 * 3600 - 1)
    assert back is not None and back.who == "key:ops" and back.may(Access.OPERATE)
    assert a.principal(cookie, now=1000.0 + 8 * 3600 + 1) is None  # expired
    payload, _, mac = cookie.rpartition(".")
    tampered = payload.replace(payload[5], "A" if payload[5] != "A" else "B") + "." + mac
    assert a.principal(tampered, now=1000.0) is None
    assert a.principal("x" * 5000, now=1000.0) is None and a.principal(None) is None
    assert auth(tmp_path).principal(cookie, now=1000.0) is not None  # same key from data_dir
    assert auth(tmp_path / "other").principal(cookie, now=1000.0) is None  # another deployment's key
    assert oct((tmp_path / "dashboard-session.key").stat().st_mode & 0o777) == "0o600"
    assert session_key(tmp_path) == session_key(tmp_path)


def test_csrf_tokens_belong_to_one_browser(tmp_path: Path) -> None:
    a = auth(tmp_path)
    mine, theirs = a.new_csrf_cookie(), a.new_csrf_cookie()
    assert a.csrf_ok(mine, a.csrf_token(mine))
    assert not a.csrf_ok(theirs, a.csrf_token(mine)) and not a.csrf_ok(None, a.csrf_token(mine))
    assert not a.csrf_ok(mine, "") and not a.csrf_ok(mine, None)


def test_open_only_in_the_sandbox_on_loopback(tmp_path: Path) -> None:
    assert not auth(tmp_path).open_access
    assert auth(tmp_path, sandbox=True).open_access
    assert not auth(tmp_path, sandbox=True, dashboard={"open_in_sandbox": False}).open_access
    s = Settings.model_validate({"data_dir": tmp_path, "sandbox": True})
    assert not DashboardAuth.from_settings(s, loopback=False).open_access


@pytest.mark.parametrize(
    ("method", "route", "access"),
    [
        ("GET", "/dashboard", Access.DASHBOARD),
        ("GET", "/dashboard/patients/{fhir_id}", Access.DASHBOARD),
        ("POST", "/dashboard/failures/{failure_id}/replay", Access.DASHBOARD),
        ("GET", "/dashboard/login", Access.PUBLIC),
        ("POST", "/dashboard/login", Access.PUBLIC),
        ("POST", "/dashboard/logout", Access.PUBLIC),
        ("DELETE", "/dashboard/login", Access.DASHBOARD),
        ("GET", "/dashboardx", Access.READ),
    ],
)
def test_which_dashboard_routes_need_a_credential(method: str, route: str, access: Access) -> None:
    assert required_access(method, route, Settings().api) is access


def decode_png(data: bytes) -> np.ndarray:
    width, height = struct.unpack(">II", data[16:24])
    raw = zlib.decompress(data[data.index(b"IDAT") + 4:data.index(b"IEND") - 8])
    return np.frombuffer(raw, dtype=np.uint8).reshape(height, 1 + 3 * width)[:, 1:].reshape(height, width, 3)


def test_png_round_trips_and_the_key_slice_follows_the_heat_map() -> None:
    rng = np.random.default_rng(3)
    rgb = rng.integers(0, 256, size=(5, 7, 3), dtype=np.uint8)
    assert (decode_png(encode_png(rgb)) == rgb).all()

    volume = np.full(C.VOLUME_SHAPE, C.VOLUME_PAD_VALUE, dtype=np.float32)
    volume[10:20, 16:48, 16:48] = 0.2  # tissue on slices 10..19, most of it nowhere in particular
    volume[12, 8:56, 8:56] = 0.2  # slice 12 has the most tissue
    assert key_slice(volume, None) == 12
    overlay = np.zeros(C.VOLUME_SHAPE, dtype=np.float32)
    overlay[17, 20:30, 20:30] = 1.0
    assert key_slice(volume, overlay) == 17
    picture = decode_png(render(volume, overlay, 17))
    assert picture.shape == (C.VOLUME_SHAPE[1] * 4, C.VOLUME_SHAPE[2] * 4, 3)
    hot = picture[25 * 4, 25 * 4]
    assert hot[0] > hot[2] + 100  # red/yellow over the grey
    cold = picture[40 * 4, 40 * 4]
    assert cold[0] == cold[1] == cold[2]  # no heat there: grey
    assert not math.isnan(float(picture.mean()))


class BrokenSnapshots(FakeStore):
    def snapshot_stages(self, now: datetime, every_s: float, keep: int) -> bool:
        raise OSError("disk full")


def services(tmp_path: Path, store: FakeStore, clock: FakeClock) -> Services:
    model = FakeModel()
    return Services(store=store, pacs=FakePacs(), ehr=FakeEhr(), model=lambda: model, volumes_dir=tmp_path,
                    clock=clock, latency_snapshot_s=60.0, latency_snapshots_kept=2)


def test_the_sweep_keeps_the_ring_and_a_failed_copy_never_stops_it(tmp_path: Path) -> None:
    clock = FakeClock()
    svc = services(tmp_path, FakeStore(clock), clock)
    for minutes in (0, 0.5, 1, 2, 3):
        clock.t = NOW + timedelta(minutes=minutes)
        sweep(svc)
    assert [s.taken_at for s in svc.store.stage_snapshots(10)] == [NOW + timedelta(minutes=2),
                                                                   NOW + timedelta(minutes=3)]
    broken = services(tmp_path, BrokenSnapshots(clock), clock)
    broken.store.add_study(StudyRef("1.2.3", "MRN", None, NOW), "api", NOW - timedelta(minutes=5))
    assert sweep(broken).studies == 1  # the due work is still queued
