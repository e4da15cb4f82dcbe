"""Processes known by pid (the engine's API and worker, a detached sandbox): alive?, stop, HTTP probe.

Shared by `strokewatch run`/`stop` and the sandbox; standard library only.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path


def http_status(url: str, headers: Mapping[str, str] | None = None, timeout: float = 2.0) -> int | None:
    """The HTTP status of a GET, or None if nothing answered."""
    request = urllib.request.Request(url, headers=dict(headers or {}))
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return int(response.status)
    except urllib.error.HTTPError as err:
        return int(err.code)
    except (OSError, ValueError):
        return None


def pid_alive(pid: int, expect_in_cmdline: str | None = None) -> bool:
    """Whether `pid` runs (not a zombie) and, if given, its command line contains the marker.

    The marker guards against a recycled pid when a state file outlives its processes.
    """
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return expect_in_cmdline is None
    proc = Path(f"/proc/{pid}")
    if not proc.exists():
        return True  # no procfs: trust the signal check
    try:
        if "\nState:\tZ" in (proc / "status").read_text():
            return False
        if expect_in_cmdline is not None:
            return expect_in_cmdline in (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return False
    return True


def _reap(pid: int) -> None:
    with contextlib.suppress(ChildProcessError):  # not our child: its own parent (or init) reaps it
        os.waitpid(pid, os.WNOHANG)


def stop_pid(pid: int, expect_in_cmdline: str | None = None, timeout: float = 10.0) -> bool:
    """SIGTERM, then SIGKILL after `timeout`, a process known only by pid. Returns whether it was running."""
    if not pid_alive(pid, expect_in_cmdline):
        return False
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return True
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            _reap(pid)
            if not pid_alive(pid):
                return True
            time.sleep(0.05)
    return True
