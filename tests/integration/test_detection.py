"""Study detection against the real Orthanc: generic QIDO-RS polling and Orthanc's /changes feed."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import httpx
from pydicom.uid import generate_uid

from integration.bootstrap import bootstrap
from integration.config import Settings
from integration.services.studies import ORTHANC_CURSOR, detect_studies
from tests.integration.test_dicomweb_orthanc import ct_series, store


def engine_for(tmp_path: Path, orthanc: Any, fhir: Any, kind: str, from_beginning: bool = False) -> Any:
    return bootstrap(Settings(sandbox=True, data_dir=tmp_path / kind,
                              pacs={"dicomweb_url": orthanc.dicomweb_url, "kind": kind, "lookback_hours": 48,
                                    "changes_from_beginning": from_beginning},
                              ehr={"base_url": fhir.base_url}))


def poll(eng: Any, timeout: float = 30) -> list[str]:
    """Detect until something is found (StableStudy comes StableAge after the last instance)."""
    deadline = time.monotonic() + timeout
    found: list[str] = []
    while not found and time.monotonic() < deadline:
        found = detect_studies(eng.services)
        time.sleep(0.5)
    return found


def stable_in_orthanc(orthanc: Any, n: int, timeout: float = 15) -> None:
    """Wait until Orthanc's change log holds n StableStudy events (the studies are complete)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        changes = httpx.get(f"{orthanc.url}/changes", params={"since": 0, "limit": 1000}, timeout=10).json()
        if sum(c["ChangeType"] == "StableStudy" for c in changes["Changes"]) >= n:
            return
        time.sleep(0.2)
    raise AssertionError(f"Orthanc did not report {n} stable studies")


def test_first_start_finds_studies_of_sites_at_both_edges_of_the_civil_zones(
    tmp_path: Path, fresh_orthanc_peer: Any, fresh_fhir_peer: Any
) -> None:
    """Taken 30 min ago at UTC+14 (already tomorrow there, most of the day) and UTC-12 (still yesterday
    there, most of the day), stored before the engine's first start: both found by the lookback, once."""
    taken = datetime.now(UTC) - timedelta(minutes=30)
    edges = {}
    for offset, hours in (("+1400", 14), ("-1200", -12)):
        local = taken.astimezone(timezone(timedelta(hours=hours)))
        series = ct_series(generate_uid(), study_date=f"{local:%Y%m%d}", study_time=f"{local:%H%M%S}")
        for ds in series:
            ds.TimezoneOffsetFromUTC = offset
        store(fresh_orthanc_peer, series)
        edges[offset] = series[0].StudyInstanceUID
    stable_in_orthanc(fresh_orthanc_peer, 2)
    for kind in ("orthanc", "generic"):
        eng = engine_for(tmp_path, fresh_orthanc_peer, fresh_fhir_peer, kind)
        try:
            assert sorted(detect_studies(eng.services)) == sorted(edges.values()), kind
            assert detect_studies(eng.services) == [], kind
        finally:
            eng.close()


def today() -> tuple[str, str]:
    now = datetime.now().astimezone()
    return now.strftime("%Y%m%d"), now.strftime("%H%M%S")


def test_qido_polling_finds_new_studies_once(tmp_path: Path, fresh_orthanc_peer: Any, fresh_fhir_peer: Any) -> None:
    date, tod = today()
    old = ct_series(generate_uid(), study_date="20010101")  # outside the lookback window
    new = ct_series(generate_uid(), study_date=date, study_time=tod)
    store(fresh_orthanc_peer, old + new)
    eng = engine_for(tmp_path, fresh_orthanc_peer, fresh_fhir_peer, "generic")
    try:
        assert eng.services.feed is None
        assert detect_studies(eng.services) == [new[0].StudyInstanceUID]
        assert detect_studies(eng.services) == []  # de-duplicated by StudyInstanceUID
        assert eng.store.get_study(new[0].StudyInstanceUID).source == "qido"
    finally:
        eng.close()


def test_orthanc_change_feed_finds_stable_studies_with_a_persisted_cursor(
    tmp_path: Path, fresh_orthanc_peer: Any, fresh_fhir_peer: Any
) -> None:
    series = ct_series(generate_uid(), study_date="20010101")  # the feed does not care about dates
    store(fresh_orthanc_peer, series)
    eng = engine_for(tmp_path, fresh_orthanc_peer, fresh_fhir_peer, "orthanc", from_beginning=True)
    try:
        assert eng.services.feed is not None
        found = poll(eng)
        assert found == [series[0].StudyInstanceUID]
        cursor = int(eng.store.get_cursor(ORTHANC_CURSOR))
        assert cursor > 0
        assert detect_studies(eng.services) == []
        assert eng.store.get_study(found[0]).source == "orthanc-changes"
    finally:
        eng.close()
    # a restarted engine resumes from the stored cursor
    again = engine_for(tmp_path, fresh_orthanc_peer, fresh_fhir_peer, "orthanc", from_beginning=True)
    try:
        assert detect_studies(again.services) == []
        assert int(again.store.get_cursor(ORTHANC_CURSOR)) >= cursor
    finally:
        again.close()


def test_first_start_on_orthanc_takes_the_lookback_window_not_the_whole_history(
    tmp_path: Path, fresh_orthanc_peer: Any, fresh_fhir_peer: Any
) -> None:
    date, tod = today()
    ancient = ct_series(generate_uid(), study_date="20010101")
    recent = ct_series(generate_uid(), study_date=date, study_time=tod)
    store(fresh_orthanc_peer, ancient + recent)
    time.sleep(2.5)  # both are stable and in Orthanc's change log before the engine first starts
    eng = engine_for(tmp_path, fresh_orthanc_peer, fresh_fhir_peer, "orthanc")
    try:
        assert detect_studies(eng.services) == [recent[0].StudyInstanceUID]  # by QIDO-RS, once
        later = ct_series(generate_uid(), study_date="20010102")
        store(fresh_orthanc_peer, later)
        assert poll(eng) == [later[0].StudyInstanceUID]  # then by the feed, whatever its date
        assert eng.store.get_study(ancient[0].StudyInstanceUID) is None  # history not replayed
    finally:
        eng.close()
