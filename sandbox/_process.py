"""Running a peer server as a child process: free ports, start, wait for readiness, stop.

Peers are plain processes here (no Docker engine on the machines that run the tests). Each writes its
output to a log file in its work directory, so a failed start can say why.
"""

from __future__ import annotations

import abc
import base64
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Self

from integration.entrypoints.pids import http_status, pid_alive, stop_pid

__all__ = ["ManagedProcess", "Peer", "SandboxError", "basic_auth_header", "free_port", "http_status", "log_tail",
           "pid_alive", "stop_pid"]


class SandboxError(RuntimeError):
    """A sandbox peer could not be started, reached or stopped; the message says what to do."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free now (another process may still take it before it is used)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def basic_auth_header(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode("ascii")


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
