"""Running a peer server as a child process: free ports, start, wait for readiness, stop.

Peers are plain processes here (no Docker engine on the machines that run the tests). Each writes its
output to a log file in its work directory, so a failed start can say why.
"""

from __future__ import annotations

import abc
import base64
import contextlib
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Self


class SandboxError(RuntimeError):
    """A sandbox peer could not be started, reached or stopped; the message says what to do."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free now (another process may still take it before it is used)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def basic_auth_header(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode("ascii")


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


def log_tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


class ManagedProcess:
    """One child process with its output in a log file.

    The child gets its own session, so a sandbox started by one CLI invocation outlives it and a
    Ctrl-C in the parent's terminal does not reach it; `stop()` (or `stop_pid` from another
    process) ends it.
    """

    def __init__(
        self,
        argv: Sequence[str],
        log_path: Path,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.argv = list(argv)
        self.log_path = log_path
        self.env = dict(env) if env is not None else None
        self.cwd = cwd
        self._popen: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self._popen.pid if self._popen else None

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            try:
                self._popen = subprocess.Popen(
                    self.argv,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env={**os.environ, **self.env} if self.env is not None else None,
                    cwd=self.cwd,
                    start_new_session=True,
                )
            except FileNotFoundError as err:
                raise SandboxError(f"cannot run {self.argv[0]!r}: {err.strerror}") from err

    def running(self) -> bool:
        return self._popen is not None and self._popen.poll() is None

    def wait_until(self, ready: Callable[[], bool], timeout: float, what: str) -> None:
        """Polls `ready` until it holds; raises with the log's tail if the process dies or time runs out."""
        deadline = time.monotonic() + timeout
        while True:
            if not self.running():
                code = self._popen.returncode if self._popen else None
                raise SandboxError(f"{what} exited with code {code}; log {self.log_path}:\n{log_tail(self.log_path)}")
            if ready():
                return
            if time.monotonic() > deadline:
                self.stop()
                raise SandboxError(f"{what} not ready after {timeout:.0f} s; log {self.log_path}:\n"
                                   f"{log_tail(self.log_path)}")
            time.sleep(0.05)

    def stop(self, timeout: float = 10.0) -> None:
        if self._popen is None:
            return
        if self._popen.poll() is None:
            self._popen.send_signal(signal.SIGTERM)
            try:
                self._popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self._popen.kill()
                self._popen.wait(timeout)
        self._popen = None

    def detach(self) -> int:
        """Forgets the child without stopping it (it keeps running); returns its pid."""
        if self._popen is None:
            raise SandboxError("process not started")
        pid = self._popen.pid
        # Let Popen not warn about a child it no longer owns; the state file owns it now.
        self._popen.returncode = 0
        self._popen = None
        return pid


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


class Peer(abc.ABC):
    """What every sandbox peer shares: one ManagedProcess, stopped, detached or used as a context manager."""

    _what = "peer"  # for error messages
    _process: ManagedProcess | None = None

    @abc.abstractmethod
    def start(self) -> Self: ...

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    def stop(self) -> None:
        if self._process:
            self._process.stop()
            self._process = None

    def detach(self) -> int:
        """Leaves the peer running after this object is gone; returns its pid."""
        if not self._process:
            raise SandboxError(f"{self._what} is not running")
        pid = self._process.detach()
        self._process = None
        return pid

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
