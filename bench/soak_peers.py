"""The peers and engine processes bench/soak.py runs, each one it can kill and restart.

- ``RedisBroker`` / ``RabbitBroker``: a private broker server on a free loopback port (restarting the machine's
  shared one would break everyone else's tests); Redis without persistence, so a restart loses every queued and
  unacknowledged message (the engine's database must be the source of truth).
- ``FhirStatePeer``: the FHIR sandbox with ``--state-file``, so a restart keeps its resources and ids, as a real
  EHR's does.
- ``ThrottleProxy``: a TCP proxy in its own process in front of Orthanc's DICOMweb; ``slow(rate, delay)`` makes it
  a slow PACS.
- ``EngineProcs``: the distributed engine as docker-compose runs it: API (uvicorn), beat, N ``celery worker``s.
- ``RssSampler``: peak RSS per engine process (VmHWM from /proc, psutil is not needed).
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sandbox._process import ManagedProcess, free_port  # noqa: E402
from sandbox.fhir import FhirPeer  # noqa: E402


def wait_for(check: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except Exception:  # noqa: BLE001 - not up yet
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{what} not ready after {timeout:.0f} s")


# -- brokers ---------------------------------------------------------------------------------------------------


class RedisBroker:
    def __init__(self, workdir: Path, db: int = 3) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.db = db
        self._proc: ManagedProcess | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/{self.db}"

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        argv = [
            "redis-server",
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(self.workdir),
        ]
        self._proc = ManagedProcess(argv, self.workdir / "redis.log")
        self._proc.start()
        wait_for(lambda: self.cli("PING").strip() == "PONG", 20, "redis")

    def stop(self) -> None:
        if self._proc:
            self._proc.stop()
            self._proc = None

    def cli(self, *args: str) -> str:
        done = subprocess.run(
            ["redis-cli", "-p", str(self.port), "-n", str(self.db), *args],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
        return done.stdout

    def extra_figures(self) -> dict[str, int]:
        """Redis-specific: the unacked messages kombu keeps in its 'unacked' hash."""
        try:
            return {"unacked (redis hash)": int(self.cli("HLEN", "unacked").strip() or 0)}
        except (ValueError, subprocess.SubprocessError):
            return {}


class RabbitBroker:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.dist_port = free_port()
        self.node = f"soak{os.getpid()}@localhost"
        self._proc: ManagedProcess | None = None

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}//"

    def _env(self) -> dict[str, str]:
        return {
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_MNESIA_BASE": str(self.workdir / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.workdir / "log"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.workdir / "enabled_plugins"),
            "RABBITMQ_CONFIG_FILE": str(self.workdir / "rabbitmq"),
            "RABBITMQ_PID_FILE": str(self.workdir / "pid"),
            "HOME": str(self.workdir),  # the Erlang cookie
        }

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "enabled_plugins").write_text("[].\n")
        (self.workdir / "rabbitmq.conf").write_text("loopback_users = none\n")
        self._proc = ManagedProcess(
            ["/usr/lib/rabbitmq/bin/rabbitmq-server"], self.workdir / "rabbitmq.out", env=self._env()
        )
        self._proc.start()
        wait_for(self._answers, 90, "rabbitmq")

    def _answers(self) -> bool:
        from kombu import Connection  # type: ignore[attr-defined]

        with Connection(self.url, connect_timeout=1) as conn:  # type: ignore[no-untyped-call]
            conn.connect()
        return True

    def ctl(self, *args: str) -> str:
        done = subprocess.run(
            ["/usr/lib/rabbitmq/bin/rabbitmqctl", "-n", self.node, *args],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            env={**os.environ, **self._env()},
        )
        return done.stdout

    def stop(self) -> None:
        if self._proc:
            self.ctl("stop")
            self._proc.stop(timeout=30)
            self._proc = None

    def extra_figures(self) -> dict[str, int]:
        total = 0
        for line in self.ctl("list_queues", "-q", "name", "messages_unacknowledged").splitlines():
            parts = line.split()
            if len(parts) == 2 and parts[1].isdigit() and "pidbox" not in parts[0]:
                total += int(parts[1])
        return {"unacked (all queues)": total}


def queue_lengths(broker_url: str, queues: tuple[str, ...]) -> dict[str, int]:
    """Ready messages per queue (kombu passive declare: Redis list length, AMQP message_count)."""
    from kombu import Connection  # type: ignore[attr-defined]

    out: dict[str, int] = {}
    with Connection(broker_url, connect_timeout=5) as conn:  # type: ignore[no-untyped-call]
        channel = conn.channel()
        for q in queues:
            try:
                out[q] = int(channel.queue_declare(q, passive=True).message_count)
            except Exception:  # noqa: BLE001 - a queue never declared holds nothing
                out[q] = 0
                channel = conn.channel()
    return out


# -- FHIR with state kept across restarts ----------------------------------------------------------------------


class FhirStatePeer(FhirPeer):
    """The FHIR sandbox on a fixed port with ``--state-file``: restart() keeps every resource and id."""

    def __init__(self, workdir: Path) -> None:
        super().__init__(workdir, port=free_port(), test_controls=True)
        self.state_file = Path(workdir) / "state.json"

    def command(self, app_dir: Path) -> list[str]:
        return [*super().command(app_dir), "--state-file", str(self.state_file)]

    def stop(self) -> None:
        if self._process:
            self._process.stop(timeout=120)  # it writes its state before exiting
            self._process = None


# -- slow PACS ---------------------------------------------------------------------------------------------------


def _proxy_main(listen_port: int, target: tuple[str, int], rate: Any, delay: Any) -> None:
    async def pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, throttled: bool) -> None:
        first = True
        try:
            while True:
                data = await reader.read(256 * 1024 if not throttled else 64 * 1024)
                if not data:
                    break
                bps = rate.value if throttled else 0.0
                if throttled and first and delay.value > 0:
                    await asyncio.sleep(delay.value)
                first = False
                if bps > 0:
                    await asyncio.sleep(len(data) / bps)
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            with contextlib.suppress(Exception):
                writer.close()

    async def handle(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        try:
            up_r, up_w = await asyncio.open_connection(*target)
        except OSError:
            client_w.close()
            return
        await asyncio.gather(pump(client_r, up_w, False), pump(up_r, client_w, True))

    async def serve() -> None:
        server = await asyncio.start_server(handle, "127.0.0.1", listen_port)
        async with server:
            await server.serve_forever()

    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    asyncio.run(serve())


class ThrottleProxy:
    """TCP proxy (own process, so the soak's own threads cannot slow it) with a switchable bandwidth cap and a
    first-byte delay on answers: a slow PACS."""

    def __init__(self, target_port: int) -> None:
        self.port = free_port()
        ctx = mp.get_context("fork")
        self._rate = ctx.Value("d", 0.0)
        self._delay = ctx.Value("d", 0.0)
        self._proc = ctx.Process(
            target=_proxy_main, args=(self.port, ("127.0.0.1", target_port), self._rate, self._delay), daemon=True
        )

    def start(self) -> None:
        self._proc.start()
        wait_for(
            lambda: httpx.get(f"http://127.0.0.1:{self.port}/system", timeout=2).status_code == 200, 20, "PACS proxy"
        )

    def slow(self, bytes_per_s: float, delay_s: float) -> None:
        self._rate.value, self._delay.value = bytes_per_s, delay_s

    def fast(self) -> None:
        self.slow(0.0, 0.0)

    def stop(self) -> None:
        if self._proc.is_alive():
            self._proc.terminate()
            self._proc.join(5)


# -- the engine's processes ------------------------------------------------------------------------------------


@dataclass
class Proc:
    name: str
    argv: list[str]
    log: Path
    popen: subprocess.Popen[bytes] | None = None
    starts: int = 0
    killed_by_us: int = 0
    crashes: list[str] = field(default_factory=list)


class EngineProcs:
    """API + beat + ``workers`` celery worker processes, each its own process group (killable as a whole)."""

    def __init__(self, env: dict[str, str], log_dir: Path, workers: int, concurrency: int, api_port: int) -> None:
        from integration.entrypoints.worker import QUEUES

        self.env = {**os.environ, **env}
        self.api_url = f"http://127.0.0.1:{api_port}"
        py = sys.executable
        celery = [py, "-m", "celery", "-A", "integration.entrypoints.worker:app"]
        self.procs: dict[str, Proc] = {
            "api": Proc(
                "api",
                [
                    py,
                    "-m",
                    "uvicorn",
                    "--factory",
                    "integration.entrypoints.api.app:create_app",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(api_port),
                    "--log-level",
                    "warning",
                ],
                log_dir / "api.log",
            ),
            "beat": Proc(
                "beat",
                [
                    *celery,
                    "beat",
                    "--loglevel",
                    "INFO",
                    "--schedule",
                    str(Path(env["STROKEWATCH_DATA_DIR"]) / "celerybeat-schedule"),
                ],
                log_dir / "beat.log",
            ),
        }
        for i in range(1, workers + 1):
            self.procs[f"worker{i}"] = Proc(
                f"worker{i}",
                [
                    *celery,
                    "worker",
                    "--loglevel",
                    "INFO",
                    "--concurrency",
                    str(concurrency),
                    "-Q",
                    ",".join(QUEUES),
                    "--hostname",
                    f"soak-w{i}@%h",
                    "--without-gossip",
                    "--without-mingle",
                ],
                log_dir / f"worker{i}.log",
            )
        self._lock = threading.Lock()

    @property
    def workers(self) -> list[Proc]:
        return [p for name, p in self.procs.items() if name.startswith("worker")]

    def start(self, name: str) -> None:
        p = self.procs[name]
        p.log.parent.mkdir(parents=True, exist_ok=True)
        with open(p.log, "ab") as log:
            p.popen = subprocess.Popen(
                p.argv,
                env=self.env,
                cwd=ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        p.starts += 1

    def start_all(self) -> None:
        for name in self.procs:
            self.start(name)
        wait_for(lambda: httpx.get(f"{self.api_url}/health/live", timeout=2).status_code == 200, 60, "engine API")

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        with self._lock:
            p = self.procs[name]
            if p.popen is None:
                return
            p.killed_by_us += 1
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.popen.pid, sig)
            p.popen.wait(30)
            p.popen = None

    def check_and_revive(self) -> list[str]:
        """Restart any process that exited without us killing it (as a supervisor would); returns their names."""
        revived = []
        with self._lock:
            for name, p in self.procs.items():
                if p.popen is not None and p.popen.poll() is not None:
                    p.crashes.append(f"{name} exited {p.popen.returncode}")
                    self.start(name)
                    revived.append(name)
        return revived

    def stop_all(self) -> None:
        for p in self.procs.values():  # SIGTERM to the main process only: celery's warm shutdown
            if p.popen is not None and p.popen.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p.popen.pid, signal.SIGTERM)
        for p in self.procs.values():
            if p.popen is None:
                continue
            try:
                p.popen.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(p.popen.pid, signal.SIGKILL)
                p.popen.wait(10)
            p.popen = None


# -- /proc --------------------------------------------------------------------------------------------------------


def _children_map() -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        out.setdefault(ppid, []).append(int(entry))
    return out


def process_tree(pid: int) -> list[int]:
    children = _children_map()
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def _status_kib(pid: int, key: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def cpu_ticks(pid: int) -> int:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])  # utime + stime
    except (OSError, ValueError, IndexError):
        return 0


class RssSampler(threading.Thread):
    """Every second: per engine process name, the highest VmHWM of any of its processes (the main one and its pool
    children, which come and go) and the highest summed VmRSS of its process tree."""

    def __init__(self, procs: EngineProcs) -> None:
        super().__init__(daemon=True)
        self.procs = procs
        self.peak_process_kib: dict[str, int] = {}
        self.peak_tree_kib: dict[str, int] = {}
        self._stop = threading.Event()

    def run(self) -> None:
        while not self._stop.wait(1.0):
            self.sample()

    def sample(self) -> None:
        for name, p in list(self.procs.procs.items()):
            popen = p.popen
            if popen is None:
                continue
            pids = process_tree(popen.pid)
            hwm = max((_status_kib(q, "VmHWM") for q in pids), default=0)
            tree = sum(_status_kib(q, "VmRSS") for q in pids)
            self.peak_process_kib[name] = max(self.peak_process_kib.get(name, 0), hwm)
            self.peak_tree_kib[name] = max(self.peak_tree_kib.get(name, 0), tree)

    def stop(self) -> None:
        self._stop.set()
