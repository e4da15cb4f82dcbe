"""`strokewatch run` keeps its children alive: a worker killed (the OOM killer, a broker client that gave up) is
started again; SIGTERM stops everything."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from sandbox import free_port


def children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def worker_of(pid: int) -> int | None:
    return next((c for c in children(pid) if "celery" in cmdline(c)), None)


def wait_for(what: str, probe: object, timeout: float = 60.0) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = probe()  # type: ignore[operator]
        if found:
            return found
        time.sleep(0.3)
    raise AssertionError(f"{what} within {timeout} s")


def test_a_killed_worker_is_started_again_and_sigterm_stops_all(engine_env: dict[str, str], tmp_path: Path) -> None:
    env = {**os.environ, **engine_env, "STROKEWATCH_API_PORT": str(free_port())}
    out = (tmp_path / "run.log").open("wb")
    run = subprocess.Popen([sys.executable, "-m", "integration.entrypoints.cli", "run"], env=env, stdout=out,
                           stderr=subprocess.STDOUT, start_new_session=True)
    try:
        log = tmp_path / "run.log"
        wait_for("the engine running", lambda: "StrokeWatch is running" in log.read_text())
        first = wait_for("a worker", lambda: worker_of(run.pid))
        os.kill(first, signal.SIGKILL)  # type: ignore[arg-type]
        second = wait_for("a new worker", lambda: (w := worker_of(run.pid)) and w != first and w)
        assert run.poll() is None  # the engine kept running
        said = " ".join(log.read_text().split())  # rich wraps lines when not on a terminal
        assert "the worker exited (code -9); starting it again (1 of 5" in said
        run.send_signal(signal.SIGTERM)
        assert run.wait(60) == 0
        time.sleep(0.5)
        assert not Path(f"/proc/{second}").exists() or "celery" not in cmdline(second)  # type: ignore[str-format]
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
        out.close()
