"""Start/stop the engine's processes (API + Celery worker with beat) for `strokewatch run` and `demo`."""

from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

from integration.config import Settings
from integration.entrypoints.logfiles import rotate_logs
from integration.entrypoints.pids import http_status, pid_alive, stop_pid

ENGINE_STATE = "engine.json"
SANDBOX_ENV_FILE = "engine.env"  # written by `strokewatch sandbox up` (sandbox/state.py)


def sandbox_env(state_dir: Path) -> dict[str, str]:
    """The STROKEWATCH_* settings a running local sandbox left in ``state_dir/engine.env`` ({} when there
    is none, or its PACS does not answer). The engine knows the sandbox only through this file."""
    try:
        lines = (state_dir / SANDBOX_ENV_FILE).read_text().splitlines()
    except OSError:
        return {}
    env = {}
    for line in lines:
        key, sep, value = line.strip().partition("=")
        if sep and key.startswith("STROKEWATCH_"):
            env[key] = value
    pacs = env.get("STROKEWATCH_PACS__ORTHANC_URL")
    if not pacs or http_status(f"{pacs}/system") is None:
        return {}
    return env


@dataclass(frozen=True)
class EngineProcesses:
    api_pid: int
    worker_pid: int
    api_url: str
    data_dir: str
    log_dir: str
    scp_pid: int | None = None  # the DICOM C-STORE SCP, when scp.enabled


def _spawn(argv: list[str], env: dict[str, str], log_path: Path, detached: bool) -> subprocess.Popen[bytes]:
    # Logs, like every file the engine writes, are for the engine's user only: the folder 0700, the log 0600
    # (narrowed if an earlier run left it wider), and the child's umask 077 for what it creates itself.
    log_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.fchmod(fd, 0o600)
    out = os.fdopen(fd, "ab")  # handed to the child
    return subprocess.Popen(
        argv,
        env=env,
        stdout=out,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=detached,
        umask=0o077,
    )


def start_engine(
    settings: Settings, env: dict[str, str], *, detached: bool
) -> tuple[EngineProcesses, list[subprocess.Popen[bytes]]]:
    """Start the API (uvicorn), one worker (with beat) and, with ``scp.enabled``, the DICOM SCP: children in that
    order. Waits until the API answers (and the SCP listens). Refuses (RuntimeError naming the settings) an API without
    authentication outside the sandbox, or listening beyond loopback without it, and an SCP without named senders."""
    from integration.entrypoints.api.security.guard import startup_problem
    from integration.entrypoints.scp import startup_problem as scp_problem

    problem = startup_problem(settings) or (scp_problem(settings) if settings.scp.enabled else None)
    if problem:
        raise RuntimeError(problem)

    data_dir = settings.data_dir.resolve()
    log_dir = data_dir / "logs"
    retention = settings.retention
    rotate_logs(log_dir, retention.log_max_bytes, retention.log_backups)  # then the worker's beat keeps them so
    worker = spawn_child("worker", settings, env, detached=detached)
    api = spawn_child("api", settings, env, detached=detached)
    scp = spawn_child("scp", settings, env, detached=detached) if settings.scp.enabled else None
    children = [api, worker] + ([scp] if scp is not None else [])
    procs = EngineProcesses(api.pid, worker.pid, settings.api_base_url, str(data_dir), str(log_dir),
                            scp.pid if scp is not None else None)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        for kind, child in zip(("API", "worker", "DICOM SCP"), children, strict=False):
            if child.poll() is not None:
                stop_pids([c.pid for c in children if c.poll() is None])
                log_name = {"API": "api", "DICOM SCP": "scp"}.get(kind, kind)
                raise RuntimeError(f"the {kind} exited at start-up; see {log_dir / f'{log_name}.log'}")
        if _api_live(settings) and (scp is None or scp_listening(settings)):
            break
        time.sleep(0.3)
    else:
        stop_pids([c.pid for c in children])
        raise RuntimeError(f"the engine did not start within 60 s; see {log_dir}")
    if detached:
        (data_dir / ENGINE_STATE).write_text(json.dumps(asdict(procs), indent=2))
    return procs, children


def scp_listening(settings: Settings) -> bool:
    """Whether something accepts TCP connections on the SCP's port (the SCP binds only once it is ready)."""
    scp = settings.scp
    host = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}.get(scp.host, scp.host)
    try:
        with socket.create_connection((host, scp.port), timeout=1):
            return True
    except OSError:
        return False


def spawn_child(kind: str, settings: Settings, env: dict[str, str], *, detached: bool) -> subprocess.Popen[bytes]:
    """Start one engine process: ``worker`` (Celery worker with beat), ``api`` (uvicorn) or ``scp`` (the DICOM
    C-STORE SCP), logging to ``data_dir/logs/{kind}.log``. Also used to restart one that died (``strokewatch run``)."""
    from integration.entrypoints.worker import worker_argv

    log_dir = settings.data_dir.resolve() / "logs"
    full_env = {**os.environ, **env}
    if kind == "worker":
        return _spawn([sys.executable, "-m", *worker_argv(settings)], full_env, log_dir / "worker.log", detached)
    if kind == "scp":
        return _spawn([sys.executable, "-m", "integration.entrypoints.scp"], full_env, log_dir / "scp.log", detached)
    return _spawn(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "--factory",
            "integration.entrypoints.api.app:create_app",
            "--host",
            settings.api_host,
            "--port",
            str(settings.api_port),
            "--log-level",
            "warning",
            *uvicorn_tls_args(settings),
        ],
        full_env,
        log_dir / "api.log",
        detached,
    )


def uvicorn_tls_args(settings: Settings) -> list[str]:
    """uvicorn's flags for HTTPS (api_tls.cert/key) and client certificates (api_tls.client_ca: verified when sent;
    required with api_tls.require_client_cert). Files are checked here so a wrong path is named before start."""
    tls = settings.api_tls
    if tls.cert is None:
        return []
    for name, path in (("cert", tls.cert), ("key", tls.key), ("client_ca", tls.client_ca)):
        if path is not None and not path.is_file():
            raise RuntimeError(f"STROKEWATCH_API_TLS__{name.upper()}={path}: no such file")
    args = ["--ssl-certfile", str(tls.cert.resolve())]
    if tls.key is not None:
        args += ["--ssl-keyfile", str(tls.key.resolve())]
    if tls.client_ca is not None:
        required = ssl.CERT_REQUIRED if tls.require_client_cert else ssl.CERT_OPTIONAL
        args += ["--ssl-ca-certs", str(tls.client_ca.resolve()), "--ssl-cert-reqs", str(int(required))]
    return args


def _api_live(settings: Settings) -> bool:
    """Whether the API started here is up. Over HTTPS the poll goes to the local listener and trusts exactly the
    certificate the API was given (pinned, so a hospital-issued certificate for another host name works). An API that
    requires client certificates answers no one without one: a completed TLS handshake with its certificate proves it
    is up (uvicorn listens only once the application has started)."""
    tls = settings.api_tls
    if tls.cert is None:
        return http_status(f"{settings.api_base_url}/health/live") == 200
    host = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}.get(settings.api_host, settings.api_host)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = False  # the pinned certificate is the identity check
    context.load_verify_locations(cafile=str(tls.cert))
    context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    if tls.require_client_cert:
        try:
            with socket.create_connection((host, settings.api_port), timeout=2) as raw, context.wrap_socket(raw):
                return True
        except OSError:
            return False
    url = f"https://{host if ':' not in host else f'[{host}]'}:{settings.api_port}/health/live"
    try:
        with urllib.request.urlopen(url, context=context, timeout=2) as response:
            return int(response.status) == 200
    except OSError:  # HTTPError and URLError included
        return False


def stop_pids(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            continue
    for pid in pids:
        stop_pid(pid, None, timeout=20)


def read_engine(data_dir: Path) -> EngineProcesses | None:
    try:
        return EngineProcesses(**json.loads((data_dir / ENGINE_STATE).read_text()))
    except (OSError, ValueError, TypeError):
        return None


def stop_engine(data_dir: Path) -> bool:
    procs = read_engine(data_dir)
    if procs is None:
        return False
    stop_pids([p for p in (procs.worker_pid, procs.api_pid, procs.scp_pid) if p is not None and pid_alive(p)])
    (data_dir / ENGINE_STATE).unlink(missing_ok=True)
    return True
