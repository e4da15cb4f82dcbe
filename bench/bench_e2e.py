"""End-to-end figures: completion -> RiskAssessment readable in the FHIR server, and the throughput of a backlog.

    .venv/bin/python bench/bench_e2e.py [--arrival scp|orthanc] [--broker redis|embedded] [--image 32x256|160x512]
                                        [--latency-studies 50] [--backlog 300] [--stable-age 1] [--concurrency 2]
                                        [--pacs-results]

Peers are real and local: Orthanc (the PACS), the FHIR sandbox (the EHR), and for ``--broker redis`` the machine's
PostgreSQL (a fresh database) and Redis (database 14, flushed) -- the distributed setup; ``embedded`` is the default
install (SQLite state, SQLite broker). The worker is ``celery worker --concurrency N`` with beat, as `strokewatch run`
starts it; ONNX Runtime in-process.

1. Latency, studies sent one at a time:
   * ``--arrival scp``: C-STORE to the engine's SCP (`strokewatch scp`) in one association; the study is complete
     at its release (A-RELEASE answered), timed by this script. The figure is release -> RiskAssessment readable.
   * ``--arrival orthanc``: STOW-RS to Orthanc; the engine follows its change feed. Printed: last instance stored
     -> RiskAssessment readable (Orthanc's StableAge included, stated), and the engine's own end_to_end histogram
     (from Orthanc's StableStudy event, stamped to the second).
2. Throughput: a backlog of --backlog patients (their vitals in the EHR, their studies complete in the SCP's spool
   or in Orthanc) before the worker starts; studies per minute until every RiskAssessment is readable. Fresh peers.
   Also the CPU time a study cost the worker (its whole pool, start-up included), the FHIR sandbox and PostgreSQL,
   all three on the same machine.
3. After each, the per-stage table from the engine's own ``strokewatch_stage_seconds`` histogram (count, median and
   p95 interpolated within buckets as Prometheus does, exact mean), and the worker processes' peak RSS (VmHWM).

Results in the PACS (``pacs_results``: an SR and a heat-map series for each moderate/high study, written in the
publish after the RiskAssessment) are off unless ``--pacs-results``: the figures are the scoring path's; with it
they show what the results cost the worker.

It prints figures; it asserts nothing.
"""

from __future__ import annotations

import argparse
import copy
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pydicom
from pydicom.uid import generate_uid

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
SENDER = "BENCHSCU"
ADMIN_PG = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
REDIS_DB = 14


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Study:
    uid: str
    patient_fhir_id: str
    files: list[Path]


# -- the patients ------------------------------------------------------------------------------------------------


def big_ct(patient: Any, files: list[Path], slices: int, size: int, cache: dict[str, np.ndarray]) -> list[Path]:
    """Rewrite a patient's 32x256^2 study as ``slices`` x ``size``^2 CT over the same extent: the synthetic volume is
    rendered once at that size (cached) and carried by each patient's own headers (UIDs, PatientID, dates)."""
    from synth import render

    key = f"{slices}x{size}"
    series: dict[str, list[tuple[float, Path]]] = {}
    for f in files:  # the axial series (the study also holds a localizer), ordered along its normal
        h = pydicom.dcmread(f, stop_before_pixels=True)
        o = np.asarray(h.ImageOrientationPatient, dtype=float)
        along = float(np.asarray(h.ImagePositionPatient, dtype=float) @ np.cross(o[:3], o[3:]))
        series.setdefault(str(h.SeriesInstanceUID), []).append((along, f))
    axial = [f for _, f in sorted(max(series.values(), key=len))]
    others = [f for f in files if f not in axial]
    files = axial
    first = pydicom.dcmread(files[0])
    acq = patient.acquisition(for_arrays=False)
    if key not in cache:
        fine = render.Acquisition(acq.centre, slices, acq.slice_mm * acq.n_slices / slices, size,
                                  acq.pixel_mm * acq.size / size)
        volume = patient.render_image(fine)
        cache[key] = np.clip(np.rint(volume.voxels + 1024.0), 0, 4095).astype(np.uint16)
    stored = cache[key]
    ipp0 = [float(v) for v in first.ImagePositionPatient]
    last = pydicom.dcmread(files[-1], stop_before_pixels=True)
    step = (np.asarray([float(v) for v in last.ImagePositionPatient]) - np.asarray(ipp0)) / max(1, len(files) - 1)
    step = step * (len(files) - 1) / max(1, slices - 1)
    spacing = float(first.PixelSpacing[0]) * int(first.Rows) / size
    out_dir = files[0].parent / "big"
    out_dir.mkdir(exist_ok=True)
    paths = []
    del first.PixelData
    for k in range(slices):
        ds = copy.deepcopy(first)  # Dataset.copy() shares its elements: a change would reach every slice
        ds.Modality, ds.SOPClassUID = "CT", "1.2.840.10008.5.1.4.1.1.2"
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid(
            entropy_srcs=[str(first.SOPInstanceUID), str(k)])
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [f"{v:.3f}" for v in np.asarray(ipp0) + k * step]
        ds.SliceThickness = f"{float(np.linalg.norm(step)):.3f}"
        ds.Rows = ds.Columns = size
        ds.PixelSpacing = [f"{spacing:.4f}", f"{spacing:.4f}"]
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
        ds.add_new(0x7FE00010, "OW", stored[k].tobytes())  # PixelData, 16-bit words
        path = out_dir / f"{k:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths + others


def prepare(n: int, seed: int, work: Path, fhir: str, image: str) -> list[Study]:
    """Write the patients' FHIR data now (Patient + vitals), and their DICOM files to disk (sent later)."""
    end = datetime.now(UTC).replace(microsecond=0)
    studies, cache = [], {}
    slices, size = (int(v) for v in image.split("x"))
    for i, p in enumerate(synth.iter_cohort(n, seed)):
        resources = synth.fhir_resources(p, identifier_system=MRN, window_end=end)
        # a fresh server holds no copies: plain creates (conditional ones search the growing store each time)
        answer = post_transaction(fhir, synth.transaction_bundle(resources, conditional=False))
        locations = [e.get("response", {}).get("location", "") for e in answer.get("entry", [])]
        patient_id = next(loc.split("/")[1] for loc in locations if loc.startswith("Patient/"))
        files = synth.write_dicom(p, work / f"p{i}", window_end=end)
        if (slices, size) != (32, 256):
            files = big_ct(p, files, slices, size, cache)
        uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
        studies.append(Study(uid, patient_id, files))
    return studies


# -- sending -----------------------------------------------------------------------------------------------------


def c_store(port: int, files: list[Path]) -> float:
    """One association: every file, then release. Returns the monotonic time the release was answered."""
    from pynetdicom import AE
    from pynetdicom.sop_class import CTImageStorage, MRImageStorage

    datasets = [pydicom.dcmread(f) for f in files]  # read before the association: the sender's own cost
    ae = AE(ae_title=SENDER)
    ae.add_requested_context(CTImageStorage, [str(datasets[0].file_meta.TransferSyntaxUID)])
    ae.add_requested_context(MRImageStorage, [str(datasets[0].file_meta.TransferSyntaxUID)])
    ae.maximum_pdu_size = 0
    assoc = ae.associate("127.0.0.1", port, ae_title="STROKEWATCH")
    if not assoc.is_established:
        raise SystemExit("the SCP refused the association")
    sock = assoc.dul.socket.socket if assoc.dul.socket is not None else None
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        answers = [assoc.send_c_store(ds) for ds in datasets]
        if any("Status" not in a for a in answers):  # an empty answer: none came within the DIMSE timeout
            raise SystemExit(f"{sum('Status' not in a for a in answers)} C-STORE request(s) unanswered within "
                             f"{ae.dimse_timeout} s (the SCU's DIMSE timeout), association "
                             f"{'aborted' if assoc.is_aborted else 'still up'}: the SCP stalled")
        bad = [int(a.Status) for a in answers if int(a.Status) != 0]
        if bad:
            raise SystemExit(f"C-STORE statuses {bad}")
    finally:
        assoc.release()
    return time.monotonic()


def assessed(client: httpx.Client, fhir: str, patient_fhir_id: str) -> bool:
    bundle = client.get(f"{fhir}/RiskAssessment", params={"subject": f"Patient/{patient_fhir_id}",
                                                          "_count": "1"}).raise_for_status().json()
    return bool(bundle.get("entry"))


def count_assessed(client: httpx.Client, fhir: str) -> int:
    bundle = client.get(f"{fhir}/RiskAssessment", params={"_summary": "count"}).raise_for_status().json()
    return int(bundle.get("total", 0))


# -- the engine's processes --------------------------------------------------------------------------------------


class State:
    """Where the engine keeps its state and queue: SQLite files, or a fresh PostgreSQL database and Redis db 14."""

    def __init__(self, broker: str, data_dir: Path) -> None:
        self.broker, self.data_dir = broker, data_dir
        self.db_name = f"swbench_{os.getpid()}_{int(time.time() * 1000) % 10_000_000}"

    @property
    def env(self) -> dict[str, str]:
        if self.broker == "embedded":
            return {}
        return {"STROKEWATCH_DATABASE_URL": f"postgresql+psycopg://postgres@127.0.0.1:5432/{self.db_name}",
                "STROKEWATCH_BROKER_URL": f"redis://127.0.0.1:6379/{REDIS_DB}"}

    @property
    def db_url(self) -> str:
        return self.env.get("STROKEWATCH_DATABASE_URL", f"sqlite:///{self.data_dir / 'strokewatch.db'}")

    def __enter__(self) -> State:
        if self.broker == "redis":
            from sqlalchemy import create_engine, text

            admin = create_engine(ADMIN_PG, isolation_level="AUTOCOMMIT")
            with admin.connect() as conn:
                conn.execute(text(f'CREATE DATABASE "{self.db_name}"'))
            admin.dispose()
            subprocess.run(["redis-cli", "-n", str(REDIS_DB), "FLUSHDB"], check=True, capture_output=True)
            from integration.adapters.db.session import upgrade

            upgrade(self.db_url)
        return self

    def __exit__(self, *_: object) -> None:
        if self.broker == "redis":
            from sqlalchemy import create_engine, text

            admin = create_engine(ADMIN_PG, isolation_level="AUTOCOMMIT")
            with admin.connect() as conn:
                conn.execute(text(f'DROP DATABASE IF EXISTS "{self.db_name}" WITH (FORCE)'))
            admin.dispose()

    def stage_histograms(self) -> dict[str, StageHistogram]:
        if self.broker == "embedded" and not (self.data_dir / "strokewatch.db").exists():
            return {}
        engine = make_engine(self.db_url)
        try:
            return {h.stage: h for h in SqlStore(engine).stage_histograms()}
        finally:
            engine.dispose()


def spawn(argv: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", *argv], env={**os.environ, **env}, cwd=ROOT,
                            stdout=open(log, "ab"), stderr=subprocess.STDOUT, start_new_session=True)


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:  # warm shutdown waits for in-flight tasks; do not wait forever
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


def peak_rss_mib(proc: subprocess.Popen[bytes]) -> float:
    """The largest VmHWM (peak resident set) among the process and its children, MiB."""
    pids = [proc.pid]
    with suppress(OSError):
        pids += [int(p) for p in Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()]
    peak = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    peak = max(peak, int(line.split()[1]))
        except OSError:
            continue
    return peak / 1024


def cpu_seconds(pid: int | None, *, children: bool = False) -> float:
    """A process's CPU time (user + system), s; with ``children``, also its live children's and what its exited
    children used (cutime, cstime): a worker's whole pool, start-up included."""
    if pid is None:
        return 0.0
    tick = os.sysconf("SC_CLK_TCK")
    pids = [pid]
    if children:
        with suppress(OSError):
            pids += [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    total = 0.0
    for i, p in enumerate(pids):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12]) + (int(fields[13]) + int(fields[14]) if children and i == 0
                                                         else 0)) / tick
    return total


def postgres_cpu_seconds() -> float:
    """CPU time of every PostgreSQL process on the machine (the bench's database is its only busy user)."""
    total = 0.0
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with suppress(OSError):
                if (entry / "comm").read_text().strip() == "postgres":
                    total += cpu_seconds(int(entry.name))
    return total


@contextmanager
def engine_processes(env: dict[str, str], work: Path, tag: str, concurrency: int, scp: bool,
                     worker: bool = True) -> Iterator[dict[str, subprocess.Popen[bytes]]]:
    procs: dict[str, subprocess.Popen[bytes]] = {}
    try:
        if "STROKEWATCH_WEBHOOKS__ORTHANC__TOKEN" in env:
            procs["api"] = spawn(["uvicorn", "--factory", "integration.entrypoints.api.app:create_app", "--host",
                                  "127.0.0.1", "--port", env["STROKEWATCH_API_PORT"], "--log-level", "warning"],
                                 env, work / f"api-{tag}.log")
            wait_port(int(env["STROKEWATCH_API_PORT"]), 60)
        if scp:
            procs["scp"] = spawn(["integration.entrypoints.scp"], env, work / f"scp-{tag}.log")
            wait_port(int(env["STROKEWATCH_SCP__PORT"]), 60)
        if worker:
            procs["worker"] = start_worker(env, work, tag, concurrency)
        yield procs
    finally:
        for proc in procs.values():
            stop(proc)


def start_worker(env: dict[str, str], work: Path, tag: str, concurrency: int) -> subprocess.Popen[bytes]:
    from integration.config import Settings
    from integration.entrypoints.worker import worker_argv

    return spawn(worker_argv(Settings(), concurrency=concurrency), env, work / f"worker-{tag}.log")


def wait_port(port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise SystemExit(f"nothing listens on {port} after {timeout} s")


def wait_worker_ready(log: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if log.exists() and "ready." in log.read_text(errors="replace"):
            return
        time.sleep(0.1)
    raise SystemExit(f"the worker did not start; see {log}")


def wait_for_stage(state: State, before: dict[str, StageHistogram], stage: str, n: int, timeout_s: float = 15) -> None:
    """A task records its timings after its EHR write: wait until ``n`` observations of ``stage`` are in (or
    ``timeout_s``) before the worker is stopped, so the table counts the last study too."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        after = state.stage_histograms()
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


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def summary(values: list[float]) -> str:
    return (f"median {statistics.median(values):.3f} s, p95 {percentile(values, 0.95):.3f} s, "
            f"min {min(values):.3f} s, max {max(values):.3f} s")


# -- the runs ----------------------------------------------------------------------------------------------------


WEBHOOK_TOKEN = "bench-webhook-token-0123456789"


@contextmanager
def peers(work: Path, stable_age: int, webhook_url: str | None = None) -> Iterator[tuple[OrthancPeer, FhirPeer]]:
    scripts = []
    if webhook_url is not None:
        from sandbox.orthanc import stable_study_webhook_lua

        work.mkdir(parents=True, exist_ok=True)
        script = work / "webhook.lua"
        script.write_text(stable_study_webhook_lua(webhook_url, WEBHOOK_TOKEN))
        scripts.append(script)
    with OrthancPeer(work / "orthanc", stable_age=stable_age, lua_scripts=scripts) as pacs, \
            FhirPeer(work / "fhir") as ehr:
        yield pacs, ehr


def engine_env(
    args: argparse.Namespace, pacs: OrthancPeer, ehr: FhirPeer, state: State, scp_port: int
) -> dict[str, str]:
    env = {
        "STROKEWATCH_SANDBOX": "true", "STROKEWATCH_DATA_DIR": str(state.data_dir),
        "STROKEWATCH_PACS__DICOMWEB_URL": pacs.dicomweb_url, "STROKEWATCH_PACS__ORTHANC_URL": pacs.url,
        "STROKEWATCH_PACS__KIND": "orthanc", "STROKEWATCH_PACS__POLL_SECONDS": str(args.poll_seconds),
        "STROKEWATCH_EHR__BASE_URL": ehr.base_url, "STROKEWATCH_EHR__PATIENT_IDENTIFIER_SYSTEM": MRN,
        "STROKEWATCH_ASSESSMENT_IDENTIFIER_SYSTEM": SYSTEM, "STROKEWATCH_LOG_LEVEL": "WARNING",
        **state.env,
    }
    if args.arrival == "scp":
        env |= {"STROKEWATCH_SCP__ENABLED": "true", "STROKEWATCH_SCP__PORT": str(scp_port),
                "STROKEWATCH_SCP__ALLOWED_CALLING_AETS": f'["{SENDER}"]'}
    if args.arrival == "orthanc-webhook":
        env |= {"STROKEWATCH_WEBHOOKS__ORTHANC__TOKEN": WEBHOOK_TOKEN, "STROKEWATCH_API_PORT": str(args.api_port),
                "STROKEWATCH_PACS__POLL_SECONDS": "60"}  # the webhook is the path; the feed only the safety net
    if args.inline is not None:
        env["STROKEWATCH_PIPELINE__INLINE"] = args.inline
    # Results in the PACS (issue #19: SR + heat-map series per moderate/high study) are written in the publish,
    # after the RiskAssessment is readable; off unless asked, so the figures are those of the scoring path.
    env["STROKEWATCH_PACS_RESULTS__ENABLED"] = "true" if args.pacs_results else "false"
    return env


def webhook(args: argparse.Namespace) -> str | None:
    if args.arrival != "orthanc-webhook":
        return None
    args.api_port = free_port()
    return f"http://127.0.0.1:{args.api_port}/webhooks/orthanc/stable-study"


def latency(args: argparse.Namespace, work: Path) -> None:
    with peers(work / "lat", args.stable_age, webhook(args)) as (pacs, ehr), \
            State(args.broker, work / "lat" / "data") as state:
        studies = prepare(args.latency_studies, 101, work / "lat" / "dicom", ehr.base_url, args.image)
        env = engine_env(args, pacs, ehr, state, free_port())
        before = state.stage_histograms()
        figures: list[float] = []
        with engine_processes(env, work, "latency", args.concurrency, args.arrival == "scp") as procs, \
                httpx.Client(timeout=30) as client:
            wait_worker_ready(work / "worker-latency.log")
            time.sleep(2)  # beat's first detect and sweep are past
            for study in studies:
                if args.arrival == "scp":
                    t0 = c_store(int(env["STROKEWATCH_SCP__PORT"]), study.files)
                else:
                    stow(pacs.dicomweb_url, study.files)
                    t0 = time.monotonic()
                while not assessed(client, ehr.base_url, study.patient_fhir_id):
                    if time.monotonic() - t0 > 180:
                        raise SystemExit(f"study {study.uid} not assessed in 180 s; see {work}")
                    time.sleep(0.01)
                figures.append(time.monotonic() - t0)
            wait_for_stage(state, before, END_TO_END, len(studies))
            rss = peak_rss_mib(procs["worker"])
        frm = ("C-STORE association released" if args.arrival == "scp"
               else f"last instance stored (STOW-RS answered; Orthanc StableAge {args.stable_age} s)")
        print(f"latency, {frm} -> RiskAssessment readable, {args.image} {args.broker} (n={len(figures)}): "
              f"{summary(figures)}")
        after = state.stage_histograms()
        if END_TO_END in after:
            h = minus(after[END_TO_END], before.get(END_TO_END))
            if h.count:
                print(f"  engine's end_to_end histogram (completion -> written): median "
                      f"{quantile(0.5, h.buckets):.3f} s, p95 {quantile(0.95, h.buckets):.3f} s, "
                      f"mean {h.sum / h.count:.3f} s (n={h.count})")
        print(f"  worker peak RSS (largest process): {rss:.0f} MiB")
        print_stages("stages of the latency run (s):", before, after)


def backlog(args: argparse.Namespace, work: Path) -> None:
    with peers(work / "bl", args.stable_age, webhook(args)) as (pacs, ehr), \
            State(args.broker, work / "bl" / "data") as state:
        studies = prepare(args.backlog, 202, work / "bl" / "dicom", ehr.base_url, args.image)
        env = engine_env(args, pacs, ehr, state, free_port())
        before = state.stage_histograms()
        with ExitStack() as stack:
            # the SCP (pushed into the spool, registered, queued) or the API (the webhook), while no worker runs
            stack.enter_context(engine_processes(env, work, "backlog-in", args.concurrency, args.arrival == "scp",
                                                 worker=False))
            if args.arrival == "scp":
                for study in studies:
                    c_store(int(env["STROKEWATCH_SCP__PORT"]), study.files)
            else:
                for study in studies:
                    stow(pacs.dicomweb_url, study.files)
                time.sleep(args.stable_age + 2)  # complete (StableStudy) before the engine starts
            client = stack.enter_context(httpx.Client(timeout=30))
            t0 = time.monotonic()
            ehr_cpu, pg_cpu = cpu_seconds(ehr.pid), postgres_cpu_seconds()
            worker = start_worker(env, work, "backlog", args.concurrency)
            try:
                while count_assessed(client, ehr.base_url) < len(studies):
                    if time.monotonic() - t0 > 3600:
                        raise SystemExit(f"backlog not done in an hour; see {work}")
                    time.sleep(0.25)
                dt = time.monotonic() - t0
                wait_for_stage(state, before, END_TO_END, len(studies))
                rss = peak_rss_mib(worker)
                worker_cpu = cpu_seconds(worker.pid, children=True)
                ehr_cpu, pg_cpu = cpu_seconds(ehr.pid) - ehr_cpu, postgres_cpu_seconds() - pg_cpu
            finally:
                stop(worker)
        n = len(studies)
        print(f"throughput, backlog of {n} {args.image} studies with their vitals, {args.broker}, "
              f"{args.arrival}, worker concurrency {args.concurrency} (worker start included): {dt:.1f} s, "
              f"{n / dt * 60:.1f} studies/min; worker peak RSS {rss:.0f} MiB")
        print(f"  CPU a study: worker {worker_cpu / n:.3f} s (its start included), FHIR sandbox {ehr_cpu / n:.3f} s, "
              f"PostgreSQL {pg_cpu / n:.3f} s; those three used {(worker_cpu + ehr_cpu + pg_cpu) / dt:.2f} of "
              f"{os.cpu_count()} CPUs")
        print_stages("stages of the backlog run (s):", before, state.stage_histograms())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arrival", choices=("scp", "orthanc", "orthanc-webhook"), default="scp",
                    help="C-STORE to the SCP; STOW-RS to Orthanc, followed by its change feed (polled), or announced "
                         "by Orthanc's Lua OnStableStudy to the engine's webhook (deploy/orthanc/*.lua)")
    ap.add_argument("--broker", choices=("redis", "embedded"), default="redis")
    ap.add_argument("--image", choices=("32x256", "160x512"), default="32x256")
    ap.add_argument("--latency-studies", type=int, default=50)
    ap.add_argument("--backlog", type=int, default=300)
    ap.add_argument("--stable-age", type=int, default=1, help="Orthanc's StableAge, seconds")
    ap.add_argument("--poll-seconds", type=float, default=0.5, help="the Orthanc feed's poll (pacs.poll_seconds)")
    ap.add_argument("--concurrency", type=int, default=2)
    ap.add_argument("--pacs-results", action="store_true",
                    help="also write the SR and heat-map series to the PACS (pacs_results.enabled; off by default)")
    ap.add_argument("--inline", default=None, help='STROKEWATCH_PIPELINE__INLINE, e.g. \'[]\' for a hop per stage')
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="sw-bench-"))  # kept: worker logs stay readable after a failure
    print(f"work dir: {work}; {os.cpu_count()} CPUs; arrival {args.arrival}, broker {args.broker}, image {args.image}")
    if args.latency_studies:
        latency(args, work)
    if args.backlog:
        backlog(args, work)


if __name__ == "__main__":
    main()
