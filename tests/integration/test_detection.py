"""Study detection against the real Orthanc: generic QIDO-RS polling and Orthanc's /changes feed."""

from __future__ import annotations

import time
from datetime import datetime
from pathlib import Path
from typing import Any

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
