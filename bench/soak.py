"""Fault-injection soak of the distributed engine: PostgreSQL, a broker (Redis or RabbitMQ), the API, beat and three
``celery worker`` processes, a real Orthanc behind a throttling proxy, and the FHIR sandbox (issue 17).

It feeds ``--studies`` synthetic patients (a Patient and four weeks of vitals into the EHR by one FHIR transaction,
then a 32-slice 256x256 head study into Orthanc by STOW-RS) while it injects faults at random moments drawn from a
seeded RNG: SIGKILL of a worker process group mid-task (then restarted) or of one pool child (as the OOM killer
does), broker restart (Redis without persistence: queued messages are lost), Orthanc restart, FHIR server restart
(its state kept, as a real EHR's is), bursts of 429/503 with Retry-After from the FHIR server, a slow PACS, and
Triton stopped and started (``--triton``). Then it lets the backlog drain (``--deadline``) and checks: exactly one
RiskAssessment per study in the EHR (0 lost, 0 duplicate per identifier and per study), no row stuck in
processing/assessing/publishing, each table's rows within a stated bound, broker queues empty, peak RSS per engine
process. It prints the figures and the faults as tables and exits 1 when a check fails.

    .venv/bin/python bench/soak.py --studies 40                    # smoke, ~5 min on 2 cores
    .venv/bin/python bench/soak.py --studies 500 --broker rabbitmq --seed 7

PostgreSQL must run on 127.0.0.1:5432 (trust auth; a fresh database ``soak_<pid>`` is made and dropped); the broker
is a private redis-server / rabbitmq-server on a free port (so restarting it disturbs no one else).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from soak_peers import (  # noqa: E402
    EngineProcs,
    FhirStatePeer,
    RabbitBroker,
    RedisBroker,
    RssSampler,
    ThrottleProxy,
    cpu_ticks,
    process_tree,
    queue_lengths,
)

import synth  # noqa: E402
from integration.entrypoints.worker import QUEUES  # noqa: E402
from sandbox._process import free_port  # noqa: E402
from sandbox.cohort import post_transaction, stow  # noqa: E402
from sandbox.orthanc import OrthancPeer  # noqa: E402

MRN = "urn:oid:1.2.36.146.595.217.0.1"
SYSTEM = "urn:strokewatch:soak"
ADMIN_PG = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
MIB = 1 << 20
T0 = time.monotonic()


def say(msg: str) -> None:
    print(f"[{time.monotonic() - T0:7.1f}s] {msg}", flush=True)


def retry(what: str, fn: Any, timeout: float = 900.0) -> Any:
    """Peers restart under the feeder too: try again until it works (or give up after ``timeout``)."""
    deadline, delay = time.monotonic() + timeout, 0.5
    while True:
        try:
            return fn()
        except Exception as err:  # noqa: BLE001 - any peer error: wait and retry
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what}: still failing after {timeout:.0f} s: {err}") from err
            time.sleep(delay)
            delay = min(delay * 2, 5.0)


# -- feeding the PACS and the EHR ---------------------------------------------------------------------------------


class Feeder(threading.Thread):
    def __init__(self, n: int, seed: int, fhir: FhirStatePeer, orthanc: OrthancPeer, work: Path, pace_s: float):
        super().__init__(daemon=True)
        self.n, self.seed, self.fhir, self.orthanc, self.work, self.pace_s = n, seed, fhir, orthanc, work, pace_s
        self.studies: dict[str, str] = {}  # study UID -> MRN
        self.values = 0  # values the engine may keep (accepted by the engine's own plausibility rules)
        self.rejected_observations = 0  # Observations with a value it must refuse (a failure row each)
        self.observations = 0
        self.error: str | None = None
        self.retries = 0
        self.finished_at: float | None = None

    def _patient_exists(self, client: httpx.Client, mrn: str) -> bool:
        r = client.get(f"{self.fhir.base_url}/Patient", params={"identifier": f"{MRN}|{mrn}", "_summary": "count"})
        r.raise_for_status()
        return int(r.json().get("total", 0)) > 0

    def _post_patient(self, client: httpx.Client, mrn: str, bundle: dict[str, Any]) -> None:
        # The sandbox's transactions are atomic: after a failure (restart, dropped connection) the Patient's presence
        # says whether the whole bundle was stored; plain creates are then never doubled.
        while True:
            try:
                post_transaction(self.fhir.base_url, bundle, client=client)
                return
            except Exception:  # noqa: BLE001
                self.retries += 1
                time.sleep(1)
                if retry("FHIR patient search", lambda: self._patient_exists(client, mrn)):
                    return

    def _count_values(self, resources: list[dict[str, Any]]) -> None:
        from integration.domain.vitals import parse_observations

        observations = [{**r, "id": str(k)} for k, r in enumerate(resources) if r.get("resourceType") == "Observation"]
        parsed = parse_observations(observations)
        self.observations += len(observations)
        self.values += len(parsed.accepted)
        self.rejected_observations += len({r.observation_id for r in parsed.rejected})

    def run(self) -> None:
        try:
            self._run()
        except Exception as err:  # noqa: BLE001 - reported by the main thread
            self.error = repr(err)
        finally:
            self.finished_at = time.monotonic()

    def _run(self) -> None:
        import pydicom

        end = datetime.now(UTC).replace(microsecond=0)
        with httpx.Client(timeout=120) as client:
            for i, patient in enumerate(synth.iter_cohort(self.n, self.seed)):
                started = time.monotonic()
                patient = replace(patient, n_slices=32)
                resources = synth.fhir_resources(patient, identifier_system=MRN, window_end=end)
                self._count_values(resources)
                self._post_patient(client, patient.mrn, synth.transaction_bundle(resources, conditional=False))
                folder = self.work / f"p{i}"
                files = synth.write_dicom(patient, folder, window_end=end)
                uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
                retry("STOW-RS", lambda files=files: stow(self.orthanc.dicomweb_url, files, client=client))
                shutil.rmtree(folder, ignore_errors=True)
                self.studies[uid] = patient.mrn
                if self.pace_s > 0:
                    time.sleep(max(0.0, self.pace_s - (time.monotonic() - started)))


# -- faults -------------------------------------------------------------------------------------------------------


@dataclass
class Fault:
    at: float
    kind: str
    detail: str
    took: float = 0.0


class Injector(threading.Thread):
    def __init__(self, rng: random.Random, every_s: float, ctx: Soak) -> None:
        super().__init__(daemon=True)
        self.rng, self.every_s, self.ctx = rng, every_s, ctx
        self.faults: list[Fault] = []
        self.active = threading.Event()
        self.active.set()
        self.errors: list[str] = []
        self._slow_until = 0.0
        kinds = {
            "worker_sigkill": 3,
            "child_sigkill": 2,
            "broker_restart": 1,
            "orthanc_restart": 1,
            "fhir_restart": 1,
            "fhir_429": 2,
            "fhir_503": 2,
            "slow_pacs": 2,
        }
        if ctx.triton is not None:
            kinds["triton_restart"] = 1
        self.kinds = kinds
        self.unused = list(kinds)
        self.rng.shuffle(self.unused)

    def run(self) -> None:
        while self.active.is_set():
            time.sleep(self.rng.expovariate(1.0 / self.every_s))
            if not self.active.is_set():
                break
            if self.unused:  # every kind once first (a seeded order), then drawn by weight
                kind = self.unused.pop()
            else:
                kind = self.rng.choices(list(self.kinds), weights=list(self.kinds.values()))[0]
            started = time.monotonic()
            try:
                detail = getattr(self, kind)()
            except Exception as err:  # noqa: BLE001 - a fault that failed to inject is reported, not fatal
                detail = f"FAILED TO INJECT: {err!r}"
                self.errors.append(f"{kind}: {err!r}")
            fault = Fault(started - T0, kind, detail, time.monotonic() - started)
            self.faults.append(fault)
            say(f"fault {kind}: {detail} ({fault.took:.1f} s)")

    def _busy_worker(self) -> tuple[str, int | None, int]:
        """The worker (and its pool child) using CPU now: mid-task. Tries for up to ~6 s."""
        workers = [p for p in self.ctx.engine.workers if p.popen is not None]
        best: tuple[str, int | None, int] = (self.rng.choice(workers).name, None, 0)
        for _ in range(20):
            before = {(p.name, c): cpu_ticks(c) for p in workers if p.popen for c in process_tree(p.popen.pid)[1:]}
            time.sleep(0.3)
            deltas = [(cpu_ticks(c) - t, name, c) for (name, c), t in before.items()]
            deltas = [d for d in deltas if d[0] > 0]
            if deltas:
                ticks, name, child = max(deltas)
                return name, child, ticks
        return best

    def worker_sigkill(self) -> str:
        name, child, _ = self._busy_worker()
        claimed = self.ctx.claimed_rows()
        self.ctx.engine.kill(name)
        down = self.rng.uniform(1, 5)
        time.sleep(down)
        self.ctx.engine.start(name)
        return (
            f"{name} process group (busy child: {'yes' if child else 'no'}, rows claimed: {claimed}), "
            f"restarted after {down:.1f} s"
        )

    def child_sigkill(self) -> str:
        name, child, _ = self._busy_worker()
        if child is None:
            return f"{name}: no busy pool child found, nothing killed"
        claimed = self.ctx.claimed_rows()
        try:
            os.kill(child, signal.SIGKILL)
        except ProcessLookupError:
            return f"{name}: busy child {child} already gone"
        return f"{name} pool child {child} (busy, rows claimed: {claimed})"

    def broker_restart(self) -> str:
        self.ctx.broker.stop()
        down = self.rng.uniform(1, 5)
        time.sleep(down)
        self.ctx.broker.start()
        return f"{self.ctx.args.broker} down {down:.1f} s"

    def orthanc_restart(self) -> str:
        self.ctx.orthanc.stop()
        down = self.rng.uniform(1, 5)
        time.sleep(down)
        self.ctx.orthanc.start()
        return f"down {down:.1f} s"

    def fhir_restart(self) -> str:
        self.ctx.fhir.stop()
        down = self.rng.uniform(1, 4)
        time.sleep(down)
        self.ctx.fhir.start()
        return f"down {down:.1f} s (+ state save/load)"

    def _fhir_burst(self, status: int) -> str:
        count = self.rng.randint(5, 40)
        retry_after = self.rng.choice([0, 1, 2, 5, 30])
        path = self.rng.choice(["/fhir/", "RiskAssessment", "Observation", "Patient"])
        self.ctx.fhir.inject_fault(status=status, count=count, retry_after=retry_after, path=path)
        return f"next {count} requests to *{path}* answer {status}, Retry-After {retry_after}"

    def fhir_429(self) -> str:
        return self._fhir_burst(429)

    def fhir_503(self) -> str:
        return self._fhir_burst(503)

    def slow_pacs(self) -> str:
        rate = self.rng.choice([0.25, 0.5, 1.0, 2.0]) * MIB  # per connection; a series is ~4.2 MiB
        delay = self.rng.uniform(0.1, 1.5)
        span = self.rng.uniform(10, 45)
        self.ctx.proxy.slow(rate, delay)
        timer = threading.Timer(span, self.ctx.proxy.fast)
        timer.daemon = True
        timer.start()
        self.ctx.timers.append(timer)
        return f"DICOMweb at {rate / MIB:.2f} MiB/s, first byte +{delay:.1f} s, for {span:.0f} s"

    def triton_restart(self) -> str:
        assert self.ctx.triton is not None
        self.ctx.triton.stop()
        down = self.rng.uniform(3, 15)
        time.sleep(down)
        self.ctx.triton.start()
        return f"down {down:.1f} s"


# -- the run ------------------------------------------------------------------------------------------------------


class Soak:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.work = Path(tempfile.mkdtemp(prefix="sw-soak-"))
        self.db_name = f"soak_{os.getpid()}"
        self.db_url = f"postgresql+psycopg://postgres@127.0.0.1:5432/{self.db_name}"
        self.broker: RedisBroker | RabbitBroker = (
            RedisBroker(self.work / "redis") if args.broker == "redis" else RabbitBroker(self.work / "rabbitmq")
        )
        self.orthanc = OrthancPeer(self.work / "orthanc", http_port=free_port(), dicom_port=free_port(), stable_age=2)
        self.fhir = FhirStatePeer(self.work / "fhir")
        self.proxy: ThrottleProxy
        self.triton: Any = None
        self.engine: EngineProcs
        self.timers: list[threading.Timer] = []
        self._db: Any = None

    # -- database ---------------------------------------------------------------------------------------------
    def create_db(self) -> None:
        from sqlalchemy import create_engine, text

        admin = create_engine(ADMIN_PG, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{self.db_name}"'))
        admin.dispose()
        self._db = create_engine(self.db_url, pool_pre_ping=True)

    def drop_db(self) -> None:
        from sqlalchemy import create_engine, text

        if self._db is not None:
            self._db.dispose()
        admin = create_engine(ADMIN_PG, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{self.db_name}" WITH (FORCE)'))
        admin.dispose()

    def q(self, sql: str) -> list[Any]:
        from sqlalchemy import text

        with self._db.connect() as conn:
            return list(conn.execute(text(sql)))

    def counts(self, table: str, column: str = "status") -> dict[str, int]:
        return {str(k): int(v) for k, v in self.q(f"SELECT {column}, count(*) FROM {table} GROUP BY {column}")}

    def claimed_rows(self) -> int:
        try:
            return int(
                self.q(
                    "SELECT (SELECT count(*) FROM studies WHERE status='processing') + "
                    "(SELECT count(*) FROM patients WHERE status='assessing') + "
                    "(SELECT count(*) FROM assessments WHERE status='publishing')"
                )[0][0]
            )
        except Exception:  # noqa: BLE001
            return -1

    # -- the EHR's view -----------------------------------------------------------------------------------------
    def risk_assessments(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        url: str | None = f"{self.fhir.base_url}/RiskAssessment?identifier={SYSTEM}|&_count=500"
        with httpx.Client(timeout=120) as client:
            while url:
                bundle = client.get(url).raise_for_status().json()
                out.extend(e["resource"] for e in bundle.get("entry", []))
                url = next((lk["url"] for lk in bundle.get("link", []) if lk["relation"] == "next"), None)
        return out

    @staticmethod
    def study_of(ra: dict[str, Any]) -> str | None:
        for b in ra.get("basis", []):
            value = (b.get("identifier") or {}).get("value", "")
            if value.startswith("urn:oid:"):
                return str(value[8:])
        return None

    # -- set-up -------------------------------------------------------------------------------------------------
    def start(self) -> None:
        a = self.args
        say(f"work dir {self.work}; database {self.db_name}; broker {a.broker}")
        self.create_db()
        self.broker.start()
        self.orthanc.start()
        self.fhir.start()
        self.proxy = ThrottleProxy(self.orthanc.http_port)
        self.proxy.start()
        if a.triton:
            from inference.runtime import DEFAULT_MODEL_PATH
            from sandbox.triton import TritonPeer, ensure_venv
            from sandbox.triton_pybackend import write_repository

            repo = self.work / "triton-repo"
            write_repository(repo, DEFAULT_MODEL_PATH)
            self.triton = TritonPeer(repo, venv=ensure_venv(create=False), workdir=self.work / "triton").start()
        env = {
            "STROKEWATCH_SANDBOX": "true",
            "STROKEWATCH_DATA_DIR": str(self.work / "data"),
            "STROKEWATCH_DATABASE_URL": self.db_url,
            "STROKEWATCH_BROKER_URL": self.broker.url,
            "STROKEWATCH_PACS__DICOMWEB_URL": f"http://127.0.0.1:{self.proxy.port}/dicom-web",
            "STROKEWATCH_PACS__ORTHANC_URL": self.orthanc.url,
            "STROKEWATCH_PACS__KIND": "orthanc",
            "STROKEWATCH_PACS__POLL_SECONDS": "2",
            # an Orthanc restart before StableStudy loses the event: the QIDO-RS reconcile finds the study
            # (default every 300 s; sooner here so the drain sees it)
            "STROKEWATCH_PACS__RECONCILE_S": "60",
            "STROKEWATCH_EHR__BASE_URL": self.fhir.base_url,
            "STROKEWATCH_EHR__POLL_SECONDS": str(a.ehr_poll),
            "STROKEWATCH_EHR__PATIENT_IDENTIFIER_SYSTEM": MRN,
            "STROKEWATCH_ASSESSMENT_IDENTIFIER_SYSTEM": SYSTEM,
            "STROKEWATCH_TASK_TIME_LIMIT_S": str(a.task_time_limit),
            "STROKEWATCH_STALE_CLAIM_S": str(a.stale_claim),
            "STROKEWATCH_LOG_LEVEL": "INFO",
        }
        if self.triton is not None:
            env["STROKEWATCH_TRITON_URL"] = self.triton.http_url
        (self.work / "data").mkdir(parents=True, exist_ok=True)
        os.environ.update(env)
        from integration.adapters.db.session import upgrade

        upgrade(self.db_url)
        self.engine = EngineProcs(env, self.work / "logs", a.workers, a.concurrency, free_port())
        self.engine.start_all()
        say(
            f"engine up: API {self.engine.api_url}, beat, {a.workers} workers x concurrency {a.concurrency}; "
            f"task_time_limit_s={a.task_time_limit} stale_claim_s={a.stale_claim}; model served by "
            f"{'Triton at ' + self.triton.http_url if self.triton is not None else 'ONNX Runtime in the workers'}; "
            f"logs {self.work / 'logs'}"
        )

    def stop(self, keep: bool) -> None:
        for t in self.timers:
            t.cancel()
        steps = [
            getattr(self, "engine", None) and self.engine.stop_all,
            getattr(self, "proxy", None) and self.proxy.stop,
            self.fhir.stop,
            self.orthanc.stop,
            self.broker.stop,
        ]
        for step in steps:
            try:
                if step:
                    step()
            except Exception as err:  # noqa: BLE001
                say(f"stopping: {err!r}")
        if self.triton is not None:
            self.triton.close()
        if keep:
            say(f"kept: work dir {self.work}, database {self.db_name}")
        else:
            self.drop_db()
            shutil.rmtree(self.work, ignore_errors=True)

    # -- drain --------------------------------------------------------------------------------------------------
    def quiet(self) -> tuple[bool, str]:
        """Nothing in flight or scheduled in the engine's database."""
        s, p, a = self.counts("studies"), self.counts("patients"), self.counts("assessments")
        pending = int(self.q("SELECT count(*) FROM patients WHERE needs_assessment")[0][0])
        retry_failed = int(
            self.q("SELECT count(*) FROM assessments WHERE status='failed' AND next_attempt_at IS NOT NULL")[0][0]
        )
        busy = (
            s.get("detected", 0)
            + s.get("processing", 0)
            + s.get("held", 0)
            + p.get("assessing", 0)
            + pending
            + a.get("scored", 0)
            + a.get("publishing", 0)
            + retry_failed
        )
        return busy == 0, f"studies {s} patients {p} needs_assessment {pending} assessments {a}"


def check_rows(soak: Soak, feeder: Feeder, injector: Injector, n: int) -> list[tuple[str, int, str, bool]]:
    rows: list[tuple[str, int, str, bool]] = []

    def bound(name: str, value: int, limit: int, why: str) -> None:
        rows.append((name, value, f"<= {limit} ({why})", value <= limit))

    def exact(name: str, value: int, want: int) -> None:
        rows.append((name, value, f"== {want}", value == want))

    def one(sql: str) -> int:
        return int(soak.q(sql)[0][0])

    nfaults = len(injector.faults)
    exact("stuck studies (processing)", one("SELECT count(*) FROM studies WHERE status='processing'"), 0)
    exact("stuck patients (assessing)", one("SELECT count(*) FROM patients WHERE status='assessing'"), 0)
    exact("stuck assessments (publishing)", one("SELECT count(*) FROM assessments WHERE status='publishing'"), 0)
    bound("studies rows", one("SELECT count(*) FROM studies"), n, "one per study fed")
    bound("series_decisions rows", one("SELECT count(*) FROM series_decisions"), 2 * n, "axial + localizer per study")
    bound("patients rows", one("SELECT count(*) FROM patients"), n, "one per patient fed")
    bound("vitals rows", one("SELECT count(*) FROM vitals"), feeder.values, "plausible values fed")
    bound("assessments rows", one("SELECT count(*) FROM assessments"), n, "one per study: vitals precede studies")
    bound(
        "failures open",
        one("SELECT count(*) FROM failures WHERE resolved_at IS NULL"),
        feeder.rejected_observations,
        "Observations fed with an implausible value",
    )
    exact("failures open, retryable", one("SELECT count(*) FROM failures WHERE resolved_at IS NULL AND retryable"), 0)
    bound(
        "failures rows (all)",
        one("SELECT count(*) FROM failures"),
        feeder.rejected_observations + 10 * nfaults,
        "those + 10 per fault",
    )
    bound("cursors rows", one("SELECT count(*) FROM cursors"), 10, "feed positions")
    return rows


def print_table(title: str, header: tuple[str, ...], rows: list[tuple[Any, ...]]) -> None:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=False)]
    line = "+" + "+".join("-" * (w + 2) for w in widths) + "+"
    print(f"\n{title}\n{line}")
    print("| " + " | ".join(str(h).ljust(w) for h, w in zip(header, widths, strict=False)) + " |")
    print(line)
    for r in rows:
        print("| " + " | ".join(str(x).ljust(w) for x, w in zip(r, widths, strict=False)) + " |")
    print(line, flush=True)


def main() -> int:  # noqa: C901, PLR0912, PLR0915 - one script, read top to bottom
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--studies", type=int, default=500)
    ap.add_argument("--seed", type=int, default=None, help="RNG seed (faults and cohort); printed; default: random")
    ap.add_argument("--broker", choices=("redis", "rabbitmq"), default="redis")
    ap.add_argument(
        "--duration",
        type=float,
        default=0.0,
        help="seconds of feeding + faults (feeding paced over 80%% of it); 0: feed as fast as possible, "
        "faults until --fault-tail s after the last study",
    )
    ap.add_argument("--fault-tail", type=float, default=60.0)
    ap.add_argument("--fault-every", type=float, default=20.0, help="mean seconds between faults")
    ap.add_argument(
        "--deadline",
        type=float,
        default=0.0,
        help="seconds for the whole run, drain included (default 900 + 8 per study)",
    )
    ap.add_argument("--settle", type=float, default=30.0, help="seconds to wait after draining before the checks")
    ap.add_argument("--ehr-poll", type=float, default=60.0, help="STROKEWATCH_EHR__POLL_SECONDS")
    ap.add_argument("--workers", type=int, default=3)
    ap.add_argument("--concurrency", type=int, default=2)
    ap.add_argument("--task-time-limit", type=int, default=150, help="STROKEWATCH_TASK_TIME_LIMIT_S (soft: 30 s less)")
    ap.add_argument("--stale-claim", type=int, default=180, help="STROKEWATCH_STALE_CLAIM_S (reaper)")
    ap.add_argument("--rss-bound-mib", type=int, default=1536)
    ap.add_argument("--triton", action="store_true", help="serve the model by Triton (sandbox/triton.py), restart it")
    ap.add_argument("--no-faults", action="store_true")
    ap.add_argument("--keep", action="store_true", help="keep the work dir and the database")
    args = ap.parse_args()
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1, 1_000_000)
    n = args.studies
    deadline = T0 + (args.deadline or 900 + 8 * n)
    say(f"soak: {n} studies, broker {args.broker}, seed {seed} (rerun with --seed {seed})")
    rng = random.Random(seed)
    soak = Soak(args)
    phases: dict[str, float] = {}
    failed_checks: list[str] = []
    ok = False
    try:
        t = time.monotonic()
        soak.start()
        phases["start-up"] = time.monotonic() - t
        pace = (0.8 * args.duration / n) if args.duration else 0.0
        feeder = Feeder(n, seed, soak.fhir, soak.orthanc, soak.work / "feed", pace)
        injector = Injector(rng, args.fault_every, soak)
        sampler = RssSampler(soak.engine)
        sampler.start()
        t_feed = time.monotonic()
        feeder.start()
        if not args.no_faults:
            injector.start()
        last = 0.0
        while True:
            time.sleep(2)
            revived = soak.engine.check_and_revive()
            if revived:
                say(f"ENGINE PROCESS EXITED on its own, restarted: {revived}")
            now = time.monotonic()
            if feeder.finished_at is not None:
                fault_end = (T0 + args.duration) if args.duration else feeder.finished_at + args.fault_tail
            else:
                fault_end = float("inf")
            if now - last > 15:
                last = now
                try:
                    _, state = soak.quiet()
                except Exception as err:  # noqa: BLE001
                    state = f"database unreadable: {err!r}"
                say(f"fed {len(feeder.studies)}/{n}; {state}")
            if feeder.error:
                raise RuntimeError(f"feeder failed: {feeder.error}")
            if now >= fault_end or now > deadline:
                break
        phases["feed (+ faults)"] = (feeder.finished_at or time.monotonic()) - t_feed
        injector.active.clear()
        for timer in soak.timers:
            timer.cancel()
        soak.proxy.fast()
        soak.fhir.clear_faults()
        if injector.is_alive():
            injector.join(120)
        say(f"faults over ({len(injector.faults)} injected); draining")
        t_drain = time.monotonic()
        want = set(feeder.studies)
        quiet_since: float | None = None
        covered = 0
        while time.monotonic() < deadline:
            time.sleep(5)
            revived = soak.engine.check_and_revive()
            if revived:
                say(f"ENGINE PROCESS EXITED on its own, restarted: {revived}")
            try:
                quiet, state = soak.quiet()
                seen = {soak.study_of(ra) for ra in soak.risk_assessments()}
            except Exception as err:  # noqa: BLE001
                say(f"drain check failed: {err!r}")
                continue
            covered = len(want & seen)
            say(f"drain: {covered}/{len(want)} studies have a RiskAssessment; {state}")
            if quiet and covered == len(want):
                break
            quiet_since = (quiet_since or time.monotonic()) if quiet else None
            if quiet_since is not None and time.monotonic() - quiet_since > 120:
                say("engine quiet for 120 s but studies lack a RiskAssessment: stopping the wait")
                break
        phases["drain"] = time.monotonic() - t_drain
        say(f"settling {args.settle:.0f} s before the checks (late duplicates would show)")
        queues: dict[str, int] = {}
        for _ in range(max(1, int(args.settle // 3))):  # the smallest length seen: beat's periodic bursts pass
            time.sleep(3)
            for q, length in queue_lengths(soak.broker.url, QUEUES).items():
                queues[q] = min(queues.get(q, length), length)
        soak.engine.check_and_revive()
        sampler.sample()
        sampler.stop()

        # -- checks ---------------------------------------------------------------------------------------------
        ras = soak.risk_assessments()
        by_identifier = Counter(
            i.get("value") for ra in ras for i in ra.get("identifier", []) if i.get("system") == SYSTEM
        )
        by_study = Counter(soak.study_of(ra) for ra in ras)
        lost = sorted(uid for uid in want if by_study[uid] == 0)
        dup_study = sorted(uid for uid in want if by_study[uid] > 1)
        dup_ident = sorted(k for k, c in by_identifier.items() if c > 1)
        stray = sorted(str(uid) for uid in by_study if uid not in want)
        checks: list[tuple[str, int, str, bool]] = [
            ("studies fed", len(want), f"== {n}", len(want) == n),
            ("RiskAssessments in the EHR", len(ras), f"== {len(want)}", len(ras) == len(want)),
            ("studies without a RiskAssessment (lost)", len(lost), "== 0", not lost),
            ("studies with >1 RiskAssessment", len(dup_study), "== 0", not dup_study),
            ("identifiers on >1 RiskAssessment", len(dup_ident), "== 0", not dup_ident),
            ("RiskAssessments of unknown studies", len(stray), "== 0", not stray),
        ]
        checks += check_rows(soak, feeder, injector, n)
        for q, length in queues.items():  # the EHR poll queues up to one vitals sync per followed patient
            limit, why = (n, "one per patient") if q == "vitals" else (10, "periodic tasks")
            checks.append((f"broker queue {q} (min while settling)", length, f"<= {limit} ({why})", length <= limit))
        kills = sum(f.kind == "worker_sigkill" for f in injector.faults)
        unacked = 2 * args.concurrency * kills + 10  # a SIGKILLed worker's reserved messages: back after the timeout
        for k, v in soak.broker.extra_figures().items():
            checks.append((f"broker {k}", v, f"<= {unacked} (2 x concurrency per worker SIGKILL + 10)", v <= unacked))
        for name in soak.engine.procs:
            peak = sampler.peak_process_kib.get(name, 0) // 1024
            tree = sampler.peak_tree_kib.get(name, 0) // 1024
            checks.append(
                (f"peak RSS {name} (MiB; tree {tree})", peak, f"<= {args.rss_bound_mib}", peak <= args.rss_bound_mib)
            )
        crashes = [c for p in soak.engine.procs.values() for c in p.crashes]
        checks.append(("engine processes exited on their own", len(crashes), "== 0", not crashes))
        api_ok = httpx.get(f"{soak.engine.api_url}/health/live", timeout=5).status_code == 200
        checks.append(("API /health/live at the end", int(api_ok), "== 1", api_ok))
        checks.append(("fault injections that failed", len(injector.errors), "== 0", not injector.errors))
        if not args.no_faults:
            missing = sorted(set(injector.kinds) - {f.kind for f in injector.faults})
            checks.append(("fault kinds never injected" + (f" ({', '.join(missing)})" if missing else ""),
                           len(missing), "== 0 (raise --duration)", not missing))

        fails = Counter(f.kind for f in injector.faults)
        print_table(f"Faults injected (seed {seed})", ("fault", "count"), sorted(fails.items()))
        print_table(
            "Fault timeline", ("t (s)", "fault", "detail"), [(f"{f.at:.0f}", f.kind, f.detail) for f in injector.faults]
        )
        open_by = soak.q(
            "SELECT stage, outcome, retryable, count(*), sum(occurrences) FROM failures "
            "WHERE resolved_at IS NULL GROUP BY stage, outcome, retryable ORDER BY 4 DESC"
        )
        all_by = soak.q(
            "SELECT stage, outcome, count(*), sum(occurrences) FROM failures GROUP BY stage, outcome ORDER BY 3 DESC"
        )
        print_table("Failures (all rows)", ("stage", "outcome", "rows", "occurrences"), [tuple(r) for r in all_by])
        print_table(
            "Failures still open", ("stage", "outcome", "retryable", "rows", "occurrences"), [tuple(r) for r in open_by]
        )
        status_rows = [(t, json.dumps(soak.counts(t))) for t in ("studies", "patients", "assessments")]
        print_table("Row status", ("table", "rows by status"), status_rows)
        tracebacks = sum(
            p.log.read_text(errors="replace").count("Traceback") for p in soak.engine.procs.values() if p.log.exists()
        )
        phases["total"] = time.monotonic() - T0
        print_table(
            "Timings",
            ("phase", "seconds"),
            [(k, f"{v:.0f}") for k, v in phases.items()]
            + [
                ("feeder retries (peer down)", str(feeder.retries)),
                ("Observations fed", str(feeder.observations)),
                ("tracebacks in engine logs", str(tracebacks)),
            ],
        )
        print_table(
            f"Soak checks: {n} studies, broker {args.broker}, seed {seed}",
            ("check", "value", "bound", "ok"),
            [(c, v, b, "ok" if ok else "FAIL") for c, v, b, ok in checks],
        )
        failed_checks = [c for c, _, _, ok in checks if not ok]
        for label, uids in (("lost", lost), ("duplicated per study", dup_study)):
            if uids:
                print(f"{label}: {uids[:20]}{' ...' if len(uids) > 20 else ''}")
                for uid in uids[:5]:
                    row = soak.q(
                        f"SELECT status, outcome, reason, attempts, lost_claims FROM studies WHERE study_uid='{uid}'"
                    )
                    print(f"    {uid}: {row[0] if row else 'no row: the engine never detected it'}")
        if dup_ident:
            print(f"duplicated identifiers: {dup_ident[:10]}")
        say(f"{'PASS' if not failed_checks else 'FAIL: ' + ', '.join(failed_checks)}")
        ok = not failed_checks
    finally:
        soak.stop(keep=args.keep or not ok)  # a failed run keeps its logs and database to be read
    return 1 if failed_checks else 0


if __name__ == "__main__":
    sys.exit(main())
