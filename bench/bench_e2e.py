"""End-to-end figures for the embedded default (SQLite state, SQLite broker, ONNX Runtime in-process).

1. Latency: time from a study's last instance stored in Orthanc (STOW-RS answered) to its RiskAssessment
   readable in the FHIR server; median and p95 over --latency-studies studies sent one at a time.
2. Throughput: a backlog of --backlog patients stored before the worker starts; studies per minute until every
   RiskAssessment is readable.

After each, the per-stage table: count, median, p95 and mean seconds of each stage (README "Metrics"), from the
engine's own histogram (``strokewatch_stage_seconds``, read from its database) as it grew over that run. Median
and p95 are interpolated within the histogram's buckets, as Prometheus's histogram_quantile does (exact to a
bucket's width); the mean is exact.

Run: .venv/bin/python bench/bench_e2e.py [--latency-studies 20] [--backlog 50]
Orthanc's StableAge (2 s here, 60 s by default) is part of the latency: the engine waits for a study to be
complete before reading it. It prints figures; it asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import synth  # noqa: E402
from integration.adapters.db.session import make_engine  # noqa: E402
from integration.adapters.db.store import SqlStore  # noqa: E402
from integration.domain.stages import END_TO_END, STAGES, StageHistogram, minus, quantile  # noqa: E402
from sandbox.cohort import post_transaction, stow  # noqa: E402
from sandbox.fhir import FhirPeer  # noqa: E402
from sandbox.orthanc import OrthancPeer  # noqa: E402

SYSTEM = "urn:strokewatch:bench"
MRN = "urn:oid:1.2.36.146.595.217.0.1"


def assessments_by_study(fhir: str) -> dict[str, float]:
    """study UID -> first time seen, for every RiskAssessment in the FHIR server."""
    out: dict[str, float] = {}
    url: str | None = f"{fhir}/RiskAssessment?identifier={SYSTEM}|&_count=500"
    with httpx.Client(timeout=30) as client:
        while url:
            bundle = client.get(url).raise_for_status().json()
            for e in bundle.get("entry", []):
                for b in e["resource"].get("basis", []):
                    ident = (b.get("identifier") or {}).get("value", "")
                    if ident.startswith("urn:oid:"):
                        out[ident[8:]] = time.monotonic()
            url = next((lk["url"] for lk in bundle.get("link", []) if lk["relation"] == "next"), None)
    return out


def stage_histograms(data_dir: Path) -> dict[str, StageHistogram]:
    """The engine's stage histogram as its database holds it now (empty before its first start)."""
    db = data_dir / "strokewatch.db"
    if not db.exists():
        return {}
    engine = make_engine(f"sqlite:///{db}")
    try:
        return {h.stage: h for h in SqlStore(engine).stage_histograms()}
    finally:
        engine.dispose()


def wait_for_stage(
    data_dir: Path, before: dict[str, StageHistogram], stage: str, n: int, timeout_s: float = 15
) -> None:
    """A task records its timings after its EHR write: wait until ``n`` observations of ``stage`` are in (or
    ``timeout_s``) before the worker is stopped, so the table counts the last study too."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        after = stage_histograms(data_dir)
        if stage in after and minus(after[stage], before.get(stage)).count >= n:
            return
        time.sleep(0.2)


def print_stages(title: str, before: dict[str, StageHistogram], after: dict[str, StageHistogram]) -> None:
    """Per stage: observations over the run, median and p95 (bucket-interpolated), mean (exact), in seconds."""
    print(f"{title}\n  {'stage':<11} {'count':>6} {'median':>8} {'p95':>8} {'mean':>8}")
    for stage in STAGES:
        if stage not in after:
            continue
        h = minus(after[stage], before.get(stage))
        if h.count == 0:
            print(f"  {stage:<11} {0:>6} {'-':>8} {'-':>8} {'-':>8}")
            continue
        median, p95 = quantile(0.5, h.buckets), quantile(0.95, h.buckets)
        print(f"  {stage:<11} {h.count:>6} {median:>8.3f} {p95:>8.3f} {h.sum / h.count:>8.3f}")


def start_worker(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    from integration.config import Settings
    from integration.entrypoints.worker import worker_argv

    argv = worker_argv(Settings(), concurrency=2)
    return subprocess.Popen([sys.executable, "-m", *argv], env={**os.environ, **env}, cwd=ROOT,
                            stdout=open(log, "ab"), stderr=subprocess.STDOUT, start_new_session=True)


def stop_worker(worker: subprocess.Popen[bytes]) -> None:
    os.killpg(worker.pid, signal.SIGTERM)
    try:
        worker.wait(30)
    except subprocess.TimeoutExpired:  # warm shutdown waits for in-flight tasks; do not wait forever
        os.killpg(worker.pid, signal.SIGKILL)
        worker.wait(10)


def prepare(n: int, seed: int, work: Path, fhir: str) -> list[tuple[str, list[Path]]]:
    """Write the patients' FHIR data now, and their DICOM files to disk (sent later)."""
    end = datetime.now(UTC).replace(microsecond=0)
    studies = []
    for i, p in enumerate(synth.iter_cohort(n, seed)):
        resources = synth.fhir_resources(p, identifier_system=MRN, window_end=end)
        # a fresh server holds no copies: plain creates (conditional ones search the growing store each time)
        post_transaction(fhir, synth.transaction_bundle(resources, conditional=False))
        files = synth.write_dicom(p, work / f"p{i}", window_end=end)
        import pydicom

        studies.append((str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID), files))
    return studies


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--latency-studies", type=int, default=20)
    ap.add_argument("--backlog", type=int, default=50)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="sw-bench-"))  # kept: worker logs stay readable after a failure
    print(f"work dir: {work}")
    if True:
        with OrthancPeer(work / "orthanc", stable_age=2) as pacs, FhirPeer(work / "fhir") as ehr:
            env = {
                "STROKEWATCH_SANDBOX": "true", "STROKEWATCH_DATA_DIR": str(work / "data"),
                "STROKEWATCH_PACS__DICOMWEB_URL": pacs.dicomweb_url, "STROKEWATCH_PACS__ORTHANC_URL": pacs.url,
                "STROKEWATCH_PACS__KIND": "orthanc", "STROKEWATCH_PACS__POLL_SECONDS": "0.5",
                "STROKEWATCH_EHR__BASE_URL": ehr.base_url, "STROKEWATCH_EHR__PATIENT_IDENTIFIER_SYSTEM": MRN,
                "STROKEWATCH_ASSESSMENT_IDENTIFIER_SYSTEM": SYSTEM, "STROKEWATCH_LOG_LEVEL": "WARNING",
            }
            # -- latency ---------------------------------------------------------------------------
            studies = prepare(args.latency_studies, 101, work / "lat", ehr.base_url) if args.latency_studies else []
            before = stage_histograms(work / "data")
            worker = start_worker(env, work / "worker1.log")
            time.sleep(5)  # worker up
            lat = []
            try:
                for uid, files in studies:
                    stow(pacs.dicomweb_url, files)
                    t0 = time.monotonic()
                    while uid not in assessments_by_study(ehr.base_url):
                        if time.monotonic() - t0 > 180:
                            raise SystemExit(f"study {uid} not assessed in 180 s; see {work / 'worker1.log'}")
                        time.sleep(0.05)
                    lat.append(time.monotonic() - t0)
                wait_for_stage(work / "data", before, END_TO_END, len(studies))
            finally:
                stop_worker(worker)
            lat.sort() if lat else lat.append(float("nan"))
            p95 = lat[min(len(lat) - 1, int(round(0.95 * (len(lat) - 1))))]
            print(f"latency, stored -> RiskAssessment readable (n={len(lat)}, Orthanc StableAge 2 s): "
                  f"median {statistics.median(lat):.2f} s, p95 {p95:.2f} s, min {lat[0]:.2f} s, max {lat[-1]:.2f} s")
            print_stages("stages of the latency run (s; detect and end_to_end from Orthanc's StableStudy event, "
                         "stamped to the second: +-0.5 s):", before, stage_histograms(work / "data"))

            # -- throughput on a backlog ---------------------------------------------------------------
            backlog = prepare(args.backlog, 202, work / "backlog", ehr.base_url)
            for _uid, files in backlog:
                stow(pacs.dicomweb_url, files)
            time.sleep(3)  # let Orthanc mark them stable: the backlog is complete before the engine starts
            env2 = {**env, "STROKEWATCH_DATA_DIR": str(work / "data2")}
            want = {uid for uid, _ in backlog}
            before = stage_histograms(work / "data2")
            t0 = time.monotonic()
            worker = start_worker(env2, work / "worker2.log")
            try:
                while not want <= set(assessments_by_study(ehr.base_url)):
                    if time.monotonic() - t0 > 1800:
                        raise SystemExit("backlog not done in 30 min")
                    time.sleep(0.5)
                dt = time.monotonic() - t0
                wait_for_stage(work / "data2", before, END_TO_END, len(want))
            finally:
                stop_worker(worker)
            print(f"throughput, backlog of {len(want)} patients (worker start included): {dt:.1f} s, "
                  f"{len(want) / dt * 60:.1f} studies/min")
            print_stages("stages of the backlog run (s):", before, stage_histograms(work / "data2"))


if __name__ == "__main__":
    main()
