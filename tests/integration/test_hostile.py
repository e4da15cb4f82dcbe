"""The hostile corpus (tests/hostile/corpus.py) through the engine's real ingest path, in a process of its own.

Each object is stored in the real Orthanc where Orthanc accepts it, and served by a stub DICOMweb PACS on
127.0.0.1 (tests/hostile/stub_pacs.py) where only a hostile server would write it (a lying QIDO-RS answer, a
broken multipart answer, a deflate bomb, a transfer syntax Orthanc refuses to parse). One child process detects
and ingests everything with the default limits, the healthy control study last. Checked: every case records its
named outcome (in the studies row and the failure ledger), the process survives to ingest the control, its peak
RSS stays under ``RSS_BOUND_MIB``, a series refused from its QIDO-RS answer is never requested, and nothing is
written outside ``data_dir``, where volume files have derived names.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from typing import Any

import httpx
import pytest

from integration.adapters.dicomweb import DicomWebPacs
from integration.adapters.fhir import FhirEhr
from integration.domain.limits import ImageLimits
from integration.domain.types import DomainError, Outcome
from integration.domain.vitals import vital_codes
from tests.hostile.corpus import Case, corpus
from tests.hostile.stub_pacs import StubPacs
from tests.integration.test_ingest_outcomes import add_patient, vital

pytestmark = [pytest.mark.peers, pytest.mark.slow]

#: Peak resident memory of the ingest process: the bombs declare tens of GiB; the corpus needs ~0.2 GiB.
RSS_BOUND_MIB = 1536
REPO = Path(__file__).resolve().parents[2]


def tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def store_in_orthanc(url: str, cases: list[Case]) -> int:
    """All Orthanc cases as one ZIP upload (Orthanc stores each file of it); returns the instances stored."""
    blob = io.BytesIO()
    with zipfile.ZipFile(blob, "w") as archive:
        for case in cases:
            for k, instance in enumerate(case.instances):
                archive.writestr(f"{case.name}/{k:04d}.dcm", instance)
    response = httpx.post(
        f"{url}/instances", content=blob.getvalue(), headers={"Content-Type": "application/zip"}, timeout=300
    )
    assert response.status_code == 200, response.text[:500]
    return sum(1 for item in response.json() if item.get("Status") in ("Success", "AlreadyStored"))


def wait_stable(url: str, n_studies: int, timeout_s: float = 60.0) -> None:
    """Until Orthanc's change log holds a StableStudy event for every study (StableAge is 1 s in the tests)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        changes = httpx.get(f"{url}/changes", params={"limit": 10000}, timeout=30).json()["Changes"]
        if len({c["ID"] for c in changes if c["ChangeType"] == "StableStudy"}) >= n_studies:
            return
        time.sleep(0.5)
    raise AssertionError(f"Orthanc did not mark {n_studies} studies stable in {timeout_s} s")


@pytest.fixture(scope="module")
def cases() -> list[Case]:
    return corpus()


def test_hostile_corpus_gets_named_outcomes_in_bounded_memory(
    tmp_path: Path, cases: list[Case], fresh_orthanc_peer: Any, fresh_fhir_peer: Any
) -> None:
    in_orthanc = [c for c in cases if "orthanc" in c.via]
    in_stub = [c for c in cases if "stub" in c.via]
    assert store_in_orthanc(fresh_orthanc_peer.url, in_orthanc) == sum(len(c.instances) for c in in_orthanc)
    wait_stable(fresh_orthanc_peer.url, len(in_orthanc))
    for patient_id in dict.fromkeys(c.patient_id for c in cases if c.expected is None):
        add_patient(fresh_fhir_peer.base_url, patient_id)  # ingested: their Patient is in the EHR, they end "ready"

    run = tmp_path / "run"
    data = run / "data"
    run.mkdir()
    with StubPacs(in_stub) as stub:
        ingestible = [c for c in cases if not c.detect_only]
        config = {
            "data_dir": str(data),
            "ehr_url": fresh_fhir_peer.base_url,
            "pacs": [
                {
                    "dicomweb_url": fresh_orthanc_peer.dicomweb_url,
                    "orthanc_url": fresh_orthanc_peer.url,
                    "studies": [c.study_uid for c in ingestible if "orthanc" in c.via],
                },
                {
                    "dicomweb_url": stub.dicomweb_url,
                    "orthanc_url": None,
                    "studies": [c.study_uid for c in ingestible if "stub" in c.via],
                },
            ],
        }
        config_path = tmp_path / "config.json"
        config_path.write_text(json.dumps(config))
        before = tree(tmp_path)
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        env = {k: v for k, v in env.items() if not k.startswith("STROKEWATCH_")}
        done = subprocess.run(
            [sys.executable, "-m", "tests.hostile.ingest_child", str(config_path), "--measure"],
            cwd=run,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
        retrievals = dict(stub.retrievals)
    assert done.returncode == 0, done.stderr[-3000:]
    measured = json.loads(done.stdout.splitlines()[-1])
    assert measured["returncode"] == 0, measured["stderr_tail"]
    report = measured["report"]

    # The process survived every case: the healthy controls, ingested last on each PACS, are ready.
    for healthy in (c for c in cases if c.name == "healthy"):
        assert report["results"][healthy.study_uid]["status"] == "ready", report["results"][healthy.study_uid]

    # Each case has its named outcome, on its studies row and in the failure ledger.
    rows = {r["study_uid"]: r for r in report["studies"]}
    failures = {(f["subject"], f["outcome"]) for f in report["failures"] if f["stage"] == "ingest"}
    seen: dict[tuple[str, str], str | None] = {}
    for case in ingestible:
        result = report["results"][case.study_uid]
        seen[case.name, case.via[0]] = result["outcome"]
        if case.expected is None:
            assert result["status"] == "ready", (case.name, result)
            continue
        assert result["outcome"] == case.expected.value, (case.name, result)
        assert rows[case.study_uid]["outcome"] == case.expected.value
        assert (case.study_uid, case.expected.value) in failures, case.name
        assert rows[case.study_uid]["volume_path"] is None
    assert seen["no_closing_boundary", "stub"] == Outcome.PACS_UNAVAILABLE.value  # retried: a cut answer may recover
    assert len(seen) == len(ingestible)  # every case ingested once, on its own PACS
    # Hostile StudyInstanceUIDs never become studies: recorded at detection under derived subjects, per PACS.
    for case in (c for c in cases if c.detect_only):
        subject = f"uid:{hashlib.sha256(case.study_uid.encode()).hexdigest()[:40]}"
        assert any(
            f["stage"] == "detect" and f["subject"] == subject and f["outcome"] == Outcome.INVALID_UID.value
            for f in report["failures"]
        ), case.name
        assert case.study_uid not in rows
    # A series refused from its QIDO-RS answer was never requested; the others were, once.
    declared = next(c for c in in_stub if c.name == "declares_100k_instances")
    assert declared.series_uid not in retrievals
    assert retrievals[next(c for c in in_stub if c.name == "part_not_dicom").series_uid] == 1

    # Bounded memory: the ingest process's peak RSS, as its parent saw it (RUSAGE_CHILDREN).
    peak_mib = measured["maxrss_kib"] / 1024
    print(f"\nhostile corpus: {len(ingestible)} studies ingested, peak RSS {peak_mib:.0f} MiB (bound {RSS_BOUND_MIB})")
    assert 0 < peak_mib < RSS_BOUND_MIB

    # Nothing outside data_dir; inside it, volume files named by the SHA-256 of their study UID.
    written = tree(tmp_path) - before
    assert written and all(p == "run/data" or p.startswith("run/data/") for p in written), sorted(written)[:20]
    assert not Path("/tmp/escaped.npy").exists() and not any(tmp_path.rglob("*escaped*"))
    ready = [c.study_uid for c in ingestible if report["results"][c.study_uid]["status"] == "ready"]
    volumes = {p.name for p in (data / "volumes").iterdir()}
    assert volumes == {f"{hashlib.sha256(uid.encode()).hexdigest()}.npy" for uid in ready}
    for uid in ready:
        assert Path(rows[uid]["volume_path"]).resolve().parent == (data / "volumes").resolve()


def test_the_pacs_adapter_enforces_its_limits_on_the_wire(cases: list[Case]) -> None:
    """Content-Length beyond the series limit: refused before the body is read; more images than the limit,
    whatever QIDO-RS declared: refused while reading."""
    healthy = next(c for c in cases if c.name == "healthy" and c.via == ("stub",))
    with StubPacs([healthy]) as stub:
        tight = DicomWebPacs(stub.dicomweb_url, limits=ImageLimits(max_series_bytes=10_000))
        few = DicomWebPacs(stub.dicomweb_url, limits=ImageLimits(max_slices_per_series=10))
        try:
            err = pytest.raises(DomainError, tight.retrieve_series, healthy.study_uid, healthy.series_uid).value
            assert err.outcome is Outcome.TOO_LARGE and "announces" in err.message
            err = pytest.raises(DomainError, few.retrieve_series, healthy.study_uid, healthy.series_uid).value
            assert err.outcome is Outcome.TOO_LARGE and "MAX_SLICES_PER_SERIES" in err.message
            assert len(DicomWebPacs(stub.dicomweb_url).retrieve_series(healthy.study_uid, healthy.series_uid)[1]) == 20
        finally:
            tight.close()
            few.close()


def test_a_vitals_search_beyond_its_resource_limit_is_refused_not_truncated(fresh_fhir_peer: Any) -> None:
    patient = add_patient(
        fresh_fhir_peer.base_url,
        "HOSTILE-vitals",
        [vital("8867-4", 60 + k, "/min", hours_ago=k + 1) for k in range(12)],
    )
    with FhirEhr(fresh_fhir_peer.base_url, page_size=5, max_resources=11) as ehr:
        err = pytest.raises(DomainError, ehr.search_observations, patient, vital_codes(), None, None).value
        assert err.outcome is Outcome.TOO_LARGE and "MAX_FHIR_RESOURCES_PER_SYNC" in err.message
    with FhirEhr(fresh_fhir_peer.base_url, page_size=5, max_resources=12) as ehr:
        assert len(ehr.search_observations(patient, vital_codes(), None, None)) == 12
