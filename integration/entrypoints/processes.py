"""Start/stop the engine's processes (API + Celery worker with beat) for `strokewatch run` and `demo`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from integration.config import Settings
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


def _spawn(argv: list[str], env: dict[str, str], log_path: Path, detached: bool) -> subprocess.Popen[bytes]:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    out = open(log_path, "ab")  # noqa: SIM115 - handed to the child
    return subprocess.Popen(
        argv, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=detached
    )


def start_engine(
    settings: Settings, env: dict[str, str], *, detached: bool
) -> tuple[EngineProcesses, list[subprocess.Popen[bytes]]]:
    """Start the API (uvicorn) and one worker (with beat). Waits until the API answers."""
    from integration.entrypoints.worker import worker_argv

    data_dir = settings.data_dir.resolve()
    log_dir = data_dir / "logs"
    full_env = {**os.environ, **env}
    worker = _spawn([sys.executable, "-m", *worker_argv(settings)], full_env, log_dir / "worker.log", detached)
    api = _spawn(
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
        ],
        full_env,
        log_dir / "api.log",
        detached,
    )
    procs = EngineProcesses(api.pid, worker.pid, settings.api_base_url, str(data_dir), str(log_dir))
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if api.poll() is not None:
            raise RuntimeError(f"the API exited at start-up; see {log_dir / 'api.log'}")
        if worker.poll() is not None:
            raise RuntimeError(f"the worker exited at start-up; see {log_dir / 'worker.log'}")
        if http_status(f"{settings.api_base_url}/health/live") == 200:
            break
        time.sleep(0.3)
    else:
        stop_pids([api.pid, worker.pid])
        raise RuntimeError(f"the API did not answer within 60 s; see {log_dir / 'api.log'}")
    if detached:
        (data_dir / ENGINE_STATE).write_text(json.dumps(asdict(procs), indent=2))
    return procs, [api, worker]


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
    stop_pids([p for p in (procs.worker_pid, procs.api_pid) if pid_alive(p)])
    (data_dir / ENGINE_STATE).unlink(missing_ok=True)
    return True
